"""REPA-E: the VAE tuned end to end with the diffusion transformer (Leng et al., 2025). See docs/methods/repa_e.md.

Each training step makes three updates, each with its own AdamW (the trainer's phases, in order):
  1. vae            L1 + LPIPS (or its built-in stand-in) + 1e-6 KL + 0.1 GAN + 1.5 L_REPA, the last through the
                    frozen SiT on the NON-detached latent (BN with its running statistics, SiT and projectors in
                    eval mode); the GAN term through the discriminator in training mode (batch statistics), as
                    officially
  2. discriminator  PatchGAN hinge loss 0.5 (relu(1 - D(x)) + relu(1 + D(x_rec))) against update 1's reconstructions
  3. sit            L_v + 0.5 L_REPA on BN(z.detach()) (BN in training mode: its statistics move here only), with
                    the t and noise that update 1 drew
The diffusion loss is stop-gradiented to the VAE: back-propagating it collapses the latent space.
BatchNorm2d (no affine) replaces the fixed latent scale; sampling skips it and de-normalises with the
(EMA) running statistics before decoding. The EMA averages SiT and BN but copies the VAE, which the official
code never averages: sampling decodes with the tuned VAE itself.
"""
from __future__ import annotations

import copy
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.repa import REPA, REPAConfig
from zoo.teachers.alignment import repa_loss
from zoo.training.method import Phase, Term
from zoo.training.registry import register
from zoo.latents.discriminator import PatchDiscriminator, hinge_loss
from zoo.latents.perceptual import TeacherPerceptual, check_perceptual, perceptual_network
from zoo.latents.vae import kl_to_standard_normal, latent_shape, load_vae, vae_architecture


@dataclass
class REPAEConfig(REPAConfig):
    vae: str = "builtin"            # the VAE to tune: builtin (zoo prepare vae) | a diffusers AutoencoderKL folder;
                                    # data.vae, when set, takes its place (the latent space every method of a table shares)
    vae_proj_coeff: float = 1.5     # weight of L_REPA in the VAE update (proj_coeff is SiT's)
    l1_weight: float = 1.0
    lpips_weight: float = 1.0       # the perceptual term's weight, whichever network `perceptual` picks
    lpips_weights: str = ""         # local LPIPS-VGG weights (zoo/latents/lpips.py)
    perceptual: str = "auto"        # the perceptual term's network: lpips (LPIPS-VGG, the paper's) | builtin (the
                                    # built-in teacher's features, zoo/latents/perceptual.py; no download) | none |
                                    # auto (lpips when lpips_weights is given, else builtin)
    lpips_rescale: bool = False     # feed LPIPS x * 2 - 1 of images already in [-1, 1], as the official code does
    kl_weight: float = 1e-6
    gan_weight: float = 0.1
    disc_channels: int = 64         # PatchGAN width
    disc_layers: int = 3            # PatchGAN strided layers (2 on 32 px images)
    vae_lr: float = 1e-4
    disc_lr: float = 1e-4
    bn_eps: float = 1e-4
    bn_momentum: float = 0.1


@contextlib.contextmanager
def frozen(*modules: nn.Module, eval_mode: bool = True):
    """No parameter gradients (and eval mode, unless `eval_mode=False`) inside; gradients still flow to the inputs."""
    states = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    for m in modules:
        m.requires_grad_(False)
        if eval_mode:
            m.eval()
    try:
        yield
    finally:
        for m, training, flags in states:
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


@register
class REPAE(REPA):
    name = "repa_e"
    description = "REPA-E: tune the VAE end to end with SiT through the REPA loss (three updates per step)"
    config_class = REPAEConfig
    reads_store_latents = False  # it encodes the store's images with the VAE it tunes

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        check_perceptual(self.options.perceptual, "repa_e.perceptual")
        self.initial_vae, self.lpips = None, None

    @property
    def tuned_vae(self) -> str:
        """The VAE this run starts from and tunes: data.vae when set (as every other method of the run's table
        diffuses in its latents), else repa_e.vae."""
        return self.cfg.data.vae or self.options.vae

    def state_shape(self) -> tuple:
        return latent_shape(self.cfg, self.tuned_vae)

    def used(self) -> dict:
        key = "data.vae" if self.cfg.data.vae else "repa_e.vae"
        return {**super().used(), "space": f"latents ({key}={self.tuned_vae}), tuned end to end"}

    def setup(self, device, training: bool = True) -> None:
        super().setup(device, training)  # REPA's teachers and feature caches
        if training:  # the pretrained VAE the model starts from; sampling reads the tuned one from the checkpoint
            self.initial_vae = load_vae(self.cfg, self.tuned_vae)
            o = self.options
            if o.lpips_weight:
                net = perceptual_network(o.perceptual, o.lpips_weights, self.cfg, "repa_e")
                self.lpips = net.to(self.device) if net is not None else None

    def build_extras(self, backbone) -> dict:
        o = self.options
        vae = copy.deepcopy(self.initial_vae) if self.initial_vae is not None else vae_architecture(self.cfg, self.tuned_vae)
        bn = nn.BatchNorm2d(vae.latent_channels, eps=o.bn_eps, momentum=o.bn_momentum, affine=False)
        with torch.no_grad():  # start as the VAE's fixed scale would: (z - shift) * scale
            bn.running_mean.copy_(vae.shift.flatten().expand(vae.latent_channels))
            bn.running_var.copy_((1 / vae.scale.flatten() ** 2).expand(vae.latent_channels))
        return {**super().build_extras(backbone), "vae": vae.train(), "bn": bn,
                "discriminator": PatchDiscriminator(o.disc_channels, o.disc_layers)}

    def unaveraged(self) -> tuple:
        return ("extras.vae.",)

    def from_official(self, official: dict) -> tuple[dict, list]:
        """REPA-E's SiT: REPA's keys plus the latent BatchNorm `bn`. The tuned VAE is released as a diffusers
        folder of its own: with `repa_e.vae` set to such a folder its weights fill `extras.vae`; the discriminator,
        which no released file holds in the zoo's layout, starts fresh (seeded) for fine-tuning."""
        from zoo.backbones.official import prefixed, take

        state, unused = super().from_official(official)
        bn, unused = take({k: official[k] for k in unused}, "bn.", "extras.bn.")
        state = {**state, **bn}
        if self.tuned_vae != "builtin":
            vae = load_vae(self.cfg, self.tuned_vae, progress=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                disc = PatchDiscriminator(self.options.disc_channels, self.options.disc_layers)
            state.update(prefixed(vae.state_dict(), "extras.vae."))
            state.update(prefixed(disc.state_dict(), "extras.discriminator."))
        return state, unused

    def phases(self, model) -> list:
        o, ex = self.options, model.extras
        return [Phase("vae", list(ex["vae"].parameters()), self.vae_losses, lr=o.vae_lr),
                Phase("discriminator", list(ex["discriminator"].parameters()), self.discriminator_losses, lr=o.disc_lr),
                Phase("sit", [*model.backbone.parameters(), *ex["projectors"].parameters()], self.loss_terms)]

    # ---------------------------------------------------------------- 1. the VAE update
    def vae_losses(self, model, batch: dict, ctx) -> dict:
        ex = model.extras
        mean, std = ex["vae"].posterior(batch["image"])
        z = mean + std * torch.randn_like(std)
        recon = ex["vae"].decode_latent(z)
        align, t, eps, targets = self.latent_alignment(model, z, batch)
        # what updates 2 and 3 of this step read (the step's phases share ctx): update 3 reuses t, eps and the
        # teacher's tokens of the same images (computed once per step)
        ctx.carry["vae"] = {"z": z.detach(), "recon": recon.detach(), "t": t, "eps": eps, "targets": targets}
        terms = self.reconstruction_terms(model, batch["image"], recon, mean, std)
        terms["repa_vae"] = Term(align, self.options.vae_proj_coeff)
        return terms

    def latent_alignment(self, model, z, batch: dict) -> tuple:
        """(L_REPA of the non-detached latent z through the frozen SiT, its t, its noise, the teacher's targets): BN
        with its running statistics, SiT and projectors in eval mode and without parameter gradients; no label
        dropout."""
        ex = model.extras
        bn = ex["bn"]
        state = F.batch_norm(z, bn.running_mean, bn.running_var, training=False, eps=bn.eps)  # statistics fixed
        with frozen(model.backbone, ex["projectors"]):
            with torch.no_grad():
                targets = self.targets(batch)
            t, eps = self.noise(state)
            x_t = self.path.interpolate(state, eps, t)
            k = self.options.encoder_depth
            hidden = model.backbone(x_t, t, batch["label"], hidden_layers=(k,), stop_after=k).hidden[k]
            return repa_loss(hidden, ex["projectors"], targets["tokens"]), t, eps, targets

    def reconstruction_terms(self, model, images, recon, mean, std) -> dict:
        """L1 (a pixel mean), KL (summed over the latent, averaged over the batch), the generator's GAN term through
        the discriminator in training mode (batch statistics, as the official generator step) and LPIPS."""
        o, disc = self.options, model.extras["discriminator"]
        with frozen(disc, eval_mode=False):
            fake_logits = disc(recon)
        terms = {"l1": Term((recon - images).abs().mean(), o.l1_weight),
                 "kl": Term(kl_to_standard_normal(mean, std), o.kl_weight),
                 "gan": Term(-fake_logits.mean(), o.gan_weight)}
        if self.lpips is not None:  # the official x * 2 - 1 is LPIPS-VGG's quirk: the teacher reads [-1, 1]
            quirk = o.lpips_rescale and not isinstance(self.lpips, TeacherPerceptual)
            rescale = (lambda x: x * 2 - 1) if quirk else (lambda x: x)
            terms["lpips"] = Term(self.lpips(rescale(recon), rescale(images)).mean(), o.lpips_weight)
        return terms

    # ---------------------------------------------------------------- 2. the discriminator update
    def discriminator_losses(self, model, batch: dict, ctx) -> dict:
        disc = model.extras["discriminator"]
        return {"disc": Term(hinge_loss(disc(batch["image"]), disc(ctx.carry["vae"]["recon"])))}

    # ---------------------------------------------------------------- 3. the SiT update
    def loss_terms(self, model, batch: dict, ctx) -> dict:
        """Method.losses on BN(z.detach()) of the VAE update's latent, noised with that update's t and noise (the
        official code draws them once per step)."""
        vae = ctx.carry["vae"]
        carried = {**batch, "latent": vae["z"], "targets": vae["targets"]}
        return self.losses(model, self.noised(model, carried, t=vae["t"], eps=vae["eps"]), ctx)

    def clean(self, model, batch: dict) -> tuple:
        """BN of the VAE update's latent, detached (the diffusion loss never reaches the VAE), and the teacher's
        tokens that update computed."""
        return model.extras["bn"](batch["latent"]), batch["targets"]

    # ---------------------------------------------------------------- sampling
    def decode(self, model, state):
        """Skip BN: de-normalise with its running statistics (the EMA's at sampling), then decode."""
        bn = model.extras["bn"]
        z = state * (bn.running_var + bn.eps).sqrt().view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)
        return model.extras["vae"].decode_latent(z)

    def export_vae(self, model):
        """The tuned VAE with BN's statistics as its per-channel latent mean and std (diffusers' fields)."""
        bn, vae = model.extras["bn"], copy.deepcopy(model.extras["vae"].autoencoder)
        vae.register_to_config(latents_mean=bn.running_mean.tolist(),
                               latents_std=(bn.running_var + bn.eps).sqrt().tolist(), scaling_factor=1.0,
                               shift_factor=None)
        return vae
