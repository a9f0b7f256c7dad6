"""REG: representation entanglement for generation (Wu et al., NeurIPS 2025). See docs/methods/reg.md.

The frozen teacher's class token c (DINOv2's CLS; for the built-in teacher, which has none, the mean of its
patch tokens) is noised with the image at the same t, with its own noise, and entered as one more input token
of the backbone; the network predicts both velocities, and aligns its block-k tokens -- the class token's
among them -- to the teacher's [c ; patch tokens], as REPA does:

    x_t = alpha_t x + sigma_t eps,   c_t = alpha_t c + sigma_t eps_c        one t, independent noise
    tokens = [ LN(W_in c_t + b) ; patch_embed(x_t) + pos ]                 the class token first, no position
    v, v_c = heads(tokens after the last block)                             v_c = W_out h_0 (zero-initialised)
    L = L_v(v, eps - x) + lambda_c L_v(v_c, eps_c - c) + lambda L_REPA(h_k, [c ; y*])

At sampling the class token starts from its own noise, is integrated jointly with the image (both in one packed
state, so every sampler of the zoo carries it) under CFG with its own scale, and is dropped at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from zoo.backbones.layers import as_tokens, modulate, unpatchify
from zoo.backbones.sit import BackboneOutput, SiT, architecture, resolve_size
from zoo.errors import ConfigError
from zoo.flow.guidance import Guidance
from zoo.teachers import Encoder, match_grid, require_one_encoder
from zoo.teachers.alignment import repa_loss
from methods.repa import REPA, REPAConfig
from zoo.teachers.teacher import Teacher
from zoo.training.method import NoisyBatch, SamplingOption, Term
from zoo.training.registry import register

CLASS_TOKENS = ("auto", "cls", "mean")


@dataclass
class REGConfig(REPAConfig):        # exactly one encoder; the paper: dinov2-vit-b. REPA's encoder_depth,
                                    # projector_dim and proj_coeff (lambda, official --proj-coeff), then REG's own
    class_weight: float = 0.03      # lambda_c: weight of the class token's velocity loss (official --cls)
    class_token: str = "auto"       # what serves as c: cls (the encoder's CLS token) | mean (the mean of its patch
                                    # tokens) | auto (cls where the encoder has one, else mean: the built-in teacher)
    class_cfg_scale: float = 0.0    # CFG scale of the class token; 0: the image's (sample.cfg_scale); 1: none


@dataclass
class REGNoisyBatch(NoisyBatch):
    """The noisy image and the noisy class token, which share t."""
    class_token: Optional[Tensor] = None    # c, [B, D]
    class_eps: Optional[Tensor] = None      # eps_c
    class_t: Optional[Tensor] = None        # c_t


@dataclass
class REGOutput(BackboneOutput):
    class_velocity: Optional[Tensor] = None  # v_c, [B, D]


class REGSiT(SiT):
    """SiT with one more input token: the noisy class token, projected to the width and LayerNorm'd (official
    `cls_projectors2`, `wg_norm`), placed before the patch tokens without a position, and read out by its own
    linear head after the shared adaLN-modulated final norm (official `final_layer.linear_cls`).
    `hidden[k]` holds the 1 + N tokens, the class token's first."""

    def __init__(self, *, class_dim: int, **sit):
        super().__init__(**sit)
        self.class_dim = class_dim
        self.class_in = nn.Linear(class_dim, self.hidden_size)
        self.class_norm = nn.LayerNorm(self.hidden_size, elementwise_affine=True, eps=1e-6)
        self.class_out = nn.Linear(self.hidden_size, class_dim)
        nn.init.xavier_uniform_(self.class_in.weight)   # the official initialisation: xavier, zero bias; head zero
        nn.init.zeros_(self.class_in.bias)
        nn.init.zeros_(self.class_out.weight)
        nn.init.zeros_(self.class_out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, hidden_layers=(), stop_after: Optional[int] = None,
                class_token: Optional[Tensor] = None) -> REGOutput:
        if class_token is None:
            raise ValueError("REG's backbone needs the noisy class token (class_token=[B, class_dim])")
        wanted = set(self.check_layers(hidden_layers))
        cls = self.class_norm(self.class_in(class_token.to(x.dtype)))
        tokens = torch.cat([cls[:, None], self.x_embedder(x) + self.pos_embed.to(x.dtype)], dim=1)
        c = self.condition(t, y)
        hidden = {}
        for k, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c)
            if k in wanted:
                hidden[k] = tokens
            if stop_after is not None and k >= stop_after:
                return REGOutput(None, hidden)
        final = self.final_layer   # its norm and modulation are shared by the patch and class heads (official)
        shift, scale = as_tokens(final.adaLN_modulation(c)).chunk(2, dim=-1)
        h = modulate(final.norm_final(tokens), shift, scale)
        velocity = unpatchify(final.linear(h[:, 1:]), self.patch, self.out_channels)
        return REGOutput(self.time.velocity(velocity), hidden, self.time.velocity(self.class_out(h[:, 0])))


class WithClassToken(Encoder):
    """An encoder that returns its class token before its patch tokens: [B, 1 + grid*grid, D]. What the feature
    cache then holds, so the CLS token is computed once per (image, flip) like the patch tokens."""

    def __init__(self, inner: Encoder):
        super().__init__(inner.grid)
        self.inner, self.name, self.dim = inner, inner.name, inner.dim

    @staticmethod
    def has_class_token(encoder: Encoder) -> bool:
        from zoo.teachers.pretrained import DINOv2HubEncoder, TimmEncoder

        return isinstance(encoder, DINOv2HubEncoder) or (isinstance(encoder, TimmEncoder)
                                                         and bool(getattr(encoder.net, "has_class_token", False)))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        from zoo.teachers.pretrained import DINOv2HubEncoder

        pixels = self.inner.preprocess(images)
        if isinstance(self.inner, DINOv2HubEncoder):
            out = self.inner.net.forward_features(pixels)
            cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]
        else:  # timm: after the final norm, CLS first (DINOv2's x_norm_clstoken), then registers, then patches
            out = self.inner.net.forward_features(pixels)
            cls, patches = out[:, 0], out[:, self.inner.net.num_prefix_tokens:]
        return torch.cat([cls[:, None], match_grid(patches, self.grid)], dim=1)

    def identity(self) -> dict:
        return {**self.inner.identity(), "class_token": "cls"}


class ClassTokenTeacher(Teacher):
    """The teacher whose encoders give [c ; patch tokens] (`tokens`): their CLS token where `class_token` asks for
    it, else (`mean`) plain patch tokens, the mean of which `REG.targets` puts first."""

    def __init__(self, options, cfg, grid: int, owner: str):
        super().__init__(options, cfg, grid, owner)
        self.uses_cls = False

    def load_encoders(self) -> list:
        encoders = super().load_encoders()
        mode, has_cls = self.options.class_token, [WithClassToken.has_class_token(e) for e in encoders]
        if mode == "cls" and not all(has_cls):
            raise ConfigError(f"reg.class_token=cls: encoder {self.options.encoder} has no class token; valid for it: "
                              "mean (the mean of its patch tokens), auto")
        self.uses_cls = mode == "cls" or (mode == "auto" and all(has_cls))
        return [WithClassToken(e) for e in encoders] if self.uses_cls else encoders


@register
class REG(REPA):
    name = "reg"
    description = "REG: the teacher's class token, noised with the image, denoised jointly as one more token; REPA"
    config_class = REGConfig
    teacher_class = ClassTokenTeacher
    config_file = Path(__file__).resolve().parents[1] / "configs" / "reg.yaml"

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        o = self.options
        require_one_encoder("reg", o.encoder, "REG entangles the class token of")
        if o.class_token not in CLASS_TOKENS:
            raise ConfigError(f"reg.class_token={o.class_token!r}; valid: {', '.join(CLASS_TOKENS)}")
        if o.class_cfg_scale < 0:
            raise ConfigError(f"reg.class_cfg_scale={o.class_cfg_scale} must be >= 0 (0: the image's CFG scale)")

    # ---------------------------------------------------------------- building
    def class_dim(self) -> int:
        return self.teacher.dims()[0]

    def build_backbone(self) -> REGSiT:
        if self.cfg.model.rope:
            raise ConfigError("model.rope=true: REG's class token has no place on the grid that 2D RoPE rotates; "
                              "valid for reg: model.rope=false")
        c, size, _ = self.state_shape()
        return REGSiT(input_size=size, in_channels=c, num_classes=self.data.num_classes, patch=self.cfg.model.patch,
                      class_dim=self.class_dim(), **architecture(self.cfg.model), **resolve_size(self.cfg.model))

    # ---------------------------------------------------------------- training
    def targets(self, batch: dict) -> dict:
        """[c ; y*]: the teacher's class token and patch tokens (the official `dense_z`), and c alone."""
        tokens = self.teacher.tokens(batch)[0]
        if not self.teacher.uses_cls:
            tokens = with_mean_token(tokens)
        return {"tokens": [tokens], "class_token": tokens[:, 0]}

    def noised(self, model, batch: dict, t=None, eps=None, class_eps=None) -> REGNoisyBatch:
        """One t for the image and its class token, independent noise. The draws, in the official order: t, eps,
        eps_c, then the labels' dropout."""
        x, targets = self.clean(model, batch)
        c = targets["class_token"].to(x.dtype)
        if t is None or eps is None:
            drawn_t, drawn_eps = self.noise(x)
            t, eps = drawn_t if t is None else t, drawn_eps if eps is None else eps
        class_eps = torch.randn_like(c) if class_eps is None else class_eps
        return REGNoisyBatch(x, eps, t, self.path.interpolate(x, eps, t), self.drop_labels(model, batch["label"]),
                             targets, batch, class_token=c, class_eps=class_eps,
                             class_t=self.path.interpolate(c, class_eps, t))

    def losses(self, model, noisy: REGNoisyBatch, ctx) -> dict:
        """L_v on the image, lambda_c L_v on the class token, lambda L_REPA on the block-k tokens (class token too)."""
        o = self.options
        out = model.backbone(noisy.x_t, noisy.t, noisy.y, hidden_layers=self.hidden_layers(), class_token=noisy.class_t)
        target = self.path.velocity_target(noisy.x, noisy.eps, noisy.t)
        class_target = self.path.velocity_target(noisy.class_token, noisy.class_eps, noisy.t)
        return {"flow": Term(self.flow_loss(out.velocity, target)),
                "cls": Term(self.flow_loss(out.class_velocity, class_target), o.class_weight),
                "repa": Term(repa_loss(out.hidden[o.encoder_depth], model.extras["projectors"],
                                       noisy.targets["tokens"]), o.proj_coeff)}

    # ---------------------------------------------------------------- sampling
    @classmethod
    def sampling_options(cls) -> list:
        return [SamplingOption("--class-cfg", float, None, "CFG scale of the class token (0: the image's; 1: none; "
                               "default: reg.class_cfg_scale)")]

    def class_guidance(self, guidance: Guidance, class_cfg: Optional[float] = None) -> float:
        """The class token's CFG scale: its own, or (0) the image's. It applies only where the image is guided."""
        scale = self.options.class_cfg_scale if class_cfg is None else float(class_cfg)
        if scale < 0:
            raise ConfigError(f"--class-cfg {scale} must be >= 0 (0: the image's CFG scale)")
        return guidance.scale if scale == 0 else scale

    def velocity_field(self, model, labels: Tensor, guidance: Guidance, sampler=None, class_cfg=None, **options):
        """The field on the packed state [x ; c] (`pack`): both velocities, CFG on each inside the interval."""
        if options:
            raise ConfigError(f"reg has no sampling option(s) {', '.join(options)}; valid: class_cfg")
        backbone, shape = model.backbone, self.state_shape()
        class_scale = self.class_guidance(guidance, class_cfg)

        def field(x, t, step, guide_at=None):
            image, cls = unpack(x, shape)
            return pack(*guided_pair(backbone, image, cls, t, labels, guidance, class_scale, guide_at))

        return field

    @torch.no_grad()
    def generate(self, model, labels: Tensor, sampler, guidance: Guidance = Guidance(),
                 generator: Optional[torch.Generator] = None, **options) -> Tensor:
        """As `Method.generate`, with the class token beside the image: its noise drawn after the image's (as the
        official generate.py), both integrated as one packed state, the class token dropped before decoding."""
        device, n = labels.device, labels.shape[0]
        where = generator.device if generator is not None else device
        noise = torch.randn((n, *self.state_shape()), generator=generator, device=where).to(device)
        class_noise = torch.randn((n, self.class_dim()), generator=generator, device=where).to(device)
        field = self.velocity_field(model, labels, guidance, sampler=sampler, **options)
        state = sampler.sample(field, pack(noise, class_noise), self.path, generator)
        return self.decode(model, unpack(state, self.state_shape())[0]).clamp(-1, 1)

    # ---------------------------------------------------------------- official weights
    def from_official(self, official: dict) -> tuple[dict, list]:
        """Martinser/REG's SiT: REPA's keys, its `pos_embed` with a zero row for the class token first, and the class
        token's `cls_projectors2` (in), `wg_norm` (its LayerNorm) and `final_layer.linear_cls` (out)."""
        from zoo.backbones.official import check_position_table, prefixed, sit_state, take

        official = dict(official)
        table = official.pop("pos_embed", None)
        if table is not None:
            if table.reshape(-1, table.shape[-1])[0].abs().max() != 0:
                raise ConfigError("the checkpoint's pos_embed has a non-zero first row: not REG's (whose class token "
                                  "has no position)")
            check_position_table(table[:, 1:])
        renames = {"cls_projectors2.": "class_in.", "wg_norm.": "class_norm.", "final_layer.linear_cls.": "class_out."}
        head = {k: official.pop(k) for k in list(official) if k.startswith(tuple(renames))}
        state, unused = sit_state(official, self.state_shape()[0])
        for old, new in renames.items():
            state.update({new + k[len(old):]: v for k, v in head.items() if k.startswith(old)})
        projector_state, unused = take({k: official[k] for k in unused}, "projectors.", "extras.projectors.")
        return {**prefixed(state, "backbone."), **projector_state}, unused


def with_mean_token(tokens: Tensor) -> Tensor:
    """[B, N, D] patch tokens -> [B, 1 + N, D]: their mean first, the class token of a teacher that has none."""
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


def pack(image: Tensor, cls: Tensor) -> Tensor:
    """[B, C, H, W] and [B, D] -> [B, C*H*W + D]: one state the zoo's samplers integrate elementwise."""
    return torch.cat([image.flatten(1), cls.to(image.dtype)], dim=1)


def unpack(state: Tensor, shape: tuple) -> tuple[Tensor, Tensor]:
    """The inverse of `pack`: (image [B, *shape], class token [B, D])."""
    size = shape[0] * shape[1] * shape[2]
    return state[:, :size].reshape(state.shape[0], *shape), state[:, size:]


def guided_pair(backbone, image: Tensor, cls: Tensor, t: Tensor, y: Tensor, guidance: Guidance, class_scale: float,
                guide_at: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(v, v_c) at (x_t, c_t, t, y). Inside the guidance interval (scale > 1), as the official sampler: the batch is
    doubled with the null label, v = v_u + w (v_c - v_u) on the image and the same with `class_scale` on the class
    token (1: its conditional velocity, the official cls_cfg_scale <= 0); outside it, one conditional pass."""
    if not guidance.active(t if guide_at is None else guide_at):
        out = backbone(image, t, y, class_token=cls)
        return out.velocity, out.class_velocity
    null = torch.full_like(y, backbone.null_label)
    out = backbone(torch.cat([image, image]), torch.cat([t, t]), torch.cat([y, null]),
                   class_token=torch.cat([cls, cls]))
    (v_cond, v_uncond), (c_cond, c_uncond) = out.velocity.chunk(2), out.class_velocity.chunk(2)
    return v_uncond + guidance.scale * (v_cond - v_uncond), c_uncond + class_scale * (c_cond - c_uncond)
