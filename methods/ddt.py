"""DDT: decoupled diffusion transformer (Wang et al., 2025). See docs/methods/ddt.md.

    z = SiLU(t_emb + Enc(x_t, t, y))      condition encoder, E blocks (zoo/backbones/ddt.py)
    v = Dec(x_t, z)                        velocity decoder, D blocks, adaLN per token from z
    L = L_v + lambda L_REPA                REPA on encoder block k (methods/repa.py)

At sampling, `--share uniform:K | dp:K` reuses z across steps with K encoder runs in total (`every:R`: every R steps)
(methods/ddt_sharing.py); the DP schedule is calibrated once and saved beside the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

from methods.repa import REPA, REPAConfig
from zoo.backbones.ddt import build_ddt, split_depth
from zoo.errors import ConfigError
from zoo.training.method import SamplingOption
from zoo.training.registry import register
from methods.ddt_sharing import DPSchedules, SharedConditionField, ShareSpec, check_shareable, every_schedule, uniform_schedule


@dataclass
class DDTConfig(REPAConfig):
    decoder_depth: int = 6          # D velocity-decoder blocks; the encoder has model.depth - D (XL: 22 + 6)
    projector_dim: int = 1152       # REPA's projector hidden width; DDT-XL uses its model width
    # REPA's other options apply to the encoder; `encoder_depth` is the encoder block k that is aligned
    # (REPA's name for it), not the size of the encoder.


@register
class DDT(REPA):
    name = "ddt"
    description = "DDT: condition encoder + velocity decoder (per-token adaLN), REPA on the encoder, --share at sampling"
    config_class = DDTConfig

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        self.dp_schedules = DPSchedules()

    def build_backbone(self):
        c, size = self.state_shape()[0], self.state_shape()[-1]
        return build_ddt(self.cfg.model, decoder_depth=self.options.decoder_depth, input_size=size, in_channels=c,
                         num_classes=self.data.num_classes)

    def build_extras(self, backbone) -> dict:
        k = self.options.encoder_depth
        if not 1 <= k <= backbone.encoder_depth:
            raise ConfigError(f"ddt.encoder_depth={k}: REPA aligns an encoder block, and this DDT's encoder has "
                              f"blocks 1..{backbone.encoder_depth} (model.depth - ddt.decoder_depth)")
        return super().build_extras(backbone)

    def from_official(self, official: dict) -> tuple[dict, list]:
        """The released DDT's denoiser (zoo/backbones/official.py) and, under `proj.0.`, its REPA projector."""
        from zoo.backbones.official import ddt_state, prefixed, take

        _, encoder_depth, _ = split_depth(self.cfg.model, self.options.decoder_depth)
        state, unused = ddt_state(official, encoder_depth, self.state_shape()[0])
        projector, unused = take({k: official[k] for k in unused}, "proj.0.", "extras.projectors.0.")
        return {**prefixed(state, "backbone."), **projector}, unused

    @classmethod
    def sampling_options(cls) -> list:
        return [SamplingOption("--share", str, "none", "encoder sharing: none (default), uniform:K or dp:K -- K "
                               "computations of the encoder's z in total, reused by the steps between them -- or "
                               "every:R (recompute every R steps, the released code's refresh rate)")]

    def velocity_field(self, model, labels, guidance, sampler=None, share="none", **options):
        spec = ShareSpec.parse(share)
        if spec.kind == "none":
            return super().velocity_field(model, labels, guidance, sampler=sampler, **options)
        check_shareable(model.backbone, sampler)
        if spec.kind == "uniform":
            schedule = uniform_schedule(sampler.steps, spec.k)
        elif spec.kind == "every":
            schedule = every_schedule(sampler.steps, spec.k)
        else:
            schedule = self.dp_schedules.get(spec.k, model.backbone, sampler, self.path, guidance, self.state_shape(),
                                             checkpoint=self.checkpoint, weights=self.checkpoint_weights or "live")
        return SharedConditionField(model.backbone, labels, guidance, schedule)
