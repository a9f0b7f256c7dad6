"""Encoder sharing at sampling: reuse a backbone's self-condition z across sampler steps (DDT, Wang et al., 2025).

Any backbone that splits its forward into an expensive condition and a cheap velocity can share:

    z = backbone.encode_condition(x_t, t, y)      # DDT: the condition encoder
    v = backbone.decode_velocity(x_t, t, z)       # DDT: the velocity decoder

A schedule says at which outer sampler steps (0 = the first, at pure noise) z is recomputed; every
other step reuses the last z. `--share` spells it:
  none        recompute at every step (plain sampling);
  uniform:K   K recomputations spread evenly over the N steps: steps floor(i N / K), i = 0..K-1
              (every N/K steps when K divides N);
  every:R     recompute at the steps i with i % R == 0 (the released code's `state_refresh_rate` R: ceil(N / R)
              recomputations, the paper's "uniform" at refresh rate R, whether or not R divides N);
  dp:K        K recomputations chosen by the statistical dynamic programme: sample a few images with
              full recomputation, build the N x N matrix sim[a][b] of the cosine similarity between the
              z of steps a and b (per token, averaged over tokens and images), and choose the steps
              0 = s_1 < ... < s_K that minimise sum over segments of cost(s, e) = sum_{m=s..e} (1 - sim[m][s]),
              the reuse cost of step s's z over steps s..e (the released code: K = int(N / R)).
Every evaluation at a scheduled step recomputes (Heun evaluates twice per step), so K = N is plain
sampling. With classifier-free guidance (scale > 1) a scheduled step encodes the conditional and the
unconditional batch, as the released code does (it always runs both): the batch is doubled for the
decoder inside the guidance interval only, and a step inside the interval reuses the unconditional z of
the last scheduled step too, so the encoder runs exactly K times (`SharedConditionField.encoder_calls`).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.cache import fingerprint
from zoo.errors import ConfigError
from zoo.flow.guidance import Guidance, guided

SHARE_KINDS = ("none", "uniform", "every", "dp")
CALIBRATION_SAMPLES = 8     # the official code calibrates on 8 samples
CALIBRATION_SEED = 0
FILE_FORMAT = "repa-zoo-share/1"


@dataclass(frozen=True)
class ShareSpec:
    kind: str = "none"      # none | uniform | dp
    k: int = 0              # recomputations in total

    @classmethod
    def parse(cls, spec) -> "ShareSpec":
        text = str(spec).strip().lower()
        if text in ("none", ""):
            return cls()
        kind, _, k = text.partition(":")
        if kind not in SHARE_KINDS[1:] or not k.isdigit() or int(k) < 1:
            raise ConfigError(f"--share {spec!r}: valid values are none, uniform:K, dp:K (K >= 1 recomputations "
                              f"of the encoder in total) and every:R (recompute every R >= 1 steps)")
        return cls(kind, int(k))

    def __str__(self) -> str:
        return self.kind if self.kind == "none" else f"{self.kind}:{self.k}"


def check_shareable(backbone, sampler) -> None:
    if not (hasattr(backbone, "encode_condition") and hasattr(backbone, "decode_velocity")):
        raise ConfigError(f"encoder sharing needs a backbone with encode_condition/decode_velocity; "
                          f"{type(backbone).__name__} has none")
    if sampler is None or getattr(sampler, "name", "") == "dopri5":
        raise ConfigError("encoder sharing needs a fixed-step sampler (ode with euler or heun, or sde), "
                          "not the adaptive dopri5")


def check_k(k: int, steps: int) -> None:
    if not 1 <= k <= steps:
        raise ConfigError(f"--share with K={k} recomputations needs 1 <= K <= the {steps} sampler steps")


# ---------------------------------------------------------------- schedules
def uniform_schedule(steps: int, k: int) -> list[int]:
    """K steps spread evenly over `steps`, the first at 0."""
    check_k(k, steps)
    return [i * steps // k for i in range(k)]


def every_schedule(steps: int, rate: int) -> list[int]:
    """The steps i with i % rate == 0: the released code's uniform sharing at refresh rate `rate`."""
    if rate < 1:
        raise ConfigError(f"--share every:{rate} needs a refresh rate R >= 1")
    return list(range(0, steps, rate))


def reuse_costs(sim) -> np.ndarray:
    """cost[s, e] = sum_{m=s..e} (1 - sim[m][s]) for s <= e (inf below the diagonal)."""
    err = 1.0 - np.asarray(sim, dtype=np.float64)
    n = err.shape[0]
    cost = np.full((n, n), np.inf)
    for s in range(n):
        cost[s, s:] = np.cumsum(err[s:, s])
    return cost


def schedule_cost(sim, schedule: Iterable[int]) -> float:
    """Total reuse cost of recomputing at `schedule` (sorted, first 0) and reusing up to the next one."""
    cost, schedule = reuse_costs(sim), sorted(schedule)
    ends = [*(s - 1 for s in schedule[1:]), cost.shape[0] - 1]
    return float(sum(cost[s, e] for s, e in zip(schedule, ends)))


def dp_schedule(sim, k: int) -> list[int]:
    """The K recomputation steps (first at 0) of least total reuse cost, by dynamic programming.

    best[r][e]: least cost of steps 0..e with r recomputations, the last segment ending at e;
    best[r][e] = min_s best[r-1][s-1] + cost[s, e]. Ties go to the earliest s.
    """
    cost = reuse_costs(sim)
    n = cost.shape[0]
    check_k(k, n)
    best = np.full((k + 1, n), np.inf)
    start = np.zeros((k + 1, n), dtype=np.int64)
    best[1] = cost[0]
    for r in range(2, k + 1):
        before = np.concatenate([[np.inf], best[r - 1][:-1]])    # before[s] = best[r-1][s-1]
        total = before[:, None] + cost                            # [s, e]
        start[r] = np.argmin(total, axis=0)
        best[r] = total[start[r], np.arange(n)]
    schedule, end = [], n - 1
    for r in range(k, 1, -1):
        s = int(start[r][end])
        schedule.append(s)
        end = s - 1
    return [0, *reversed(schedule)]


def similarity_matrix(zs: Tensor) -> Tensor:
    """sim[a][b] = mean over tokens (and images) of cos(z_a[n], z_b[n]), from zs [steps, images, tokens, C]."""
    unit = F.normalize(zs.float(), dim=-1).flatten(1)
    return (unit @ unit.T / (zs.shape[1] * zs.shape[2])).double().cpu()


# ---------------------------------------------------------------- the field
class SharedConditionField:
    """field(x, t, step): the guided velocity from the decoder, with z recomputed at scheduled steps only.

    `both_halves` (default: guidance scale > 1) encodes the unconditional batch beside the conditional one at
    every recomputation, so that steps inside the guidance interval find both halves cached.
    """

    def __init__(self, backbone, labels: Tensor, guidance: Guidance, schedule: Iterable[int],
                 on_encode: Optional[Callable[[int, Tensor], None]] = None, both_halves: Optional[bool] = None):
        self.backbone, self.labels, self.guidance = backbone, labels, guidance
        self.schedule = frozenset(schedule)
        self.on_encode = on_encode
        self.both_halves = guidance.scale > 1 if both_halves is None else both_halves
        self.encoder_calls: list[tuple[int, int]] = []   # (step, rows encoded) of every recomputation
        self._z = self._z_labels = None
        self._step = 0

    def __call__(self, x: Tensor, t: Tensor, step: int, guide_at: Optional[Tensor] = None) -> Tensor:
        self._step = step
        return guided(self._velocity, x, t, self.labels, self.backbone.null_label, self.guidance, guide_at)

    def _velocity(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        z = None if self._step in self.schedule else self._cached(y)
        if z is None:
            yy, z = y, self.backbone.encode_condition(x, t, y)
            if self.both_halves and len(y) == len(self.labels):  # a conditional request: encode the null half too
                # in a call of its own: the conditional rows stay bit-equal to unshared sampling's, whose batch
                # outside the guidance interval is the conditional one alone
                null = torch.full_like(y, self.null_label)
                yy, z = torch.cat([y, null]), torch.cat([z, self.backbone.encode_condition(x, t, null)])
            self._z, self._z_labels = z, yy
            self.encoder_calls.append((self._step, len(yy)))
            if self.on_encode is not None:
                self.on_encode(self._step, self._z)
            z = self._z[:len(y)]
        return self.backbone.decode_velocity(x, t, z)

    @property
    def null_label(self) -> int:
        return self.backbone.null_label

    def _cached(self, y: Tensor) -> Optional[Tensor]:
        """The cached z's rows for labels `y`, if the cached batch starts with exactly these labels."""
        if self._z is None or len(y) > len(self._z_labels) or not torch.equal(self._z_labels[:len(y)], y):
            return None
        return self._z[:len(y)]


# ---------------------------------------------------------------- calibration
@torch.no_grad()
def calibrate(backbone, sampler, path, guidance: Guidance, shape: tuple, samples: int = CALIBRATION_SAMPLES,
              seed: int = CALIBRATION_SEED) -> Tensor:
    """The [N, N] similarity of z between steps, from `samples` images sampled with full recomputation.

    Seeded noise and balanced labels, drawn from a CPU generator of its own: the caller's RNG is untouched.
    As in the released code, every step encodes the conditional and the unconditional batch, and the
    similarity averages over both (the trajectory is guided inside the guidance interval only).
    """
    device = next(backbone.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, *shape), generator=gen).to(device)
    labels = (torch.arange(samples) % backbone.num_classes).to(device)
    first = {}

    def keep(step: int, z: Tensor) -> None:
        first.setdefault(step, z.float())

    field = SharedConditionField(backbone, labels, guidance, range(sampler.steps), keep, both_halves=True)
    sampler.sample(field, noise, path, gen)
    return similarity_matrix(torch.stack([first[i] for i in range(sampler.steps)]))


def calibration_settings(sampler, guidance: Guidance, shape: tuple, weights: str) -> dict:
    """Everything the similarity matrix depends on besides the weights file itself."""
    integrator = {k: v for k, v in vars(sampler).items() if isinstance(v, (int, float, str))}
    return {"weights": weights, "sampler": sampler.name, **integrator, "state_shape": list(shape),
            "guidance": [guidance.scale, guidance.low, guidance.high],
            "calibration": {"samples": CALIBRATION_SAMPLES, "seed": CALIBRATION_SEED}}


def schedule_file(checkpoint: Path, settings: dict) -> Path:
    """RUN/checkpoints/step_N-share-<key>.json, beside the checkpoint whose z it measured."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}-share-{fingerprint(settings)[:10]}.json")


class DPSchedules:
    """DP schedules of one model: calibrated once per sampler setting, kept in memory and in a JSON file
    beside the checkpoint (`file`), which later runs reuse. Without a file (a live model) nothing is kept."""

    def __init__(self):
        self._memo: dict[str, dict] = {}

    def get(self, k: int, backbone, sampler, path, guidance: Guidance, shape: tuple,
            checkpoint: Optional[Path] = None, weights: str = "ema") -> list[int]:
        check_k(k, sampler.steps)
        settings = calibration_settings(sampler, guidance, shape, weights)
        file = schedule_file(checkpoint, settings) if checkpoint is not None else None
        record = self._load(file, settings)
        if record is None:
            begin = time.perf_counter()
            sim = calibrate(backbone, sampler, path, guidance, shape)
            record = {"format": FILE_FORMAT, "checkpoint": str(checkpoint) if checkpoint else None, **settings,
                      "calibration_seconds": round(time.perf_counter() - begin, 3),
                      "schedules": {}, "similarity": [[round(v, 7) for v in row] for row in sim.tolist()]}
        if str(k) not in record["schedules"]:
            steps = dp_schedule(record["similarity"], k)
            record["schedules"][str(k)] = {"steps": steps, "cost": schedule_cost(record["similarity"], steps),
                                           "uniform_cost": schedule_cost(record["similarity"],
                                                                         uniform_schedule(sampler.steps, k))}
            if file is not None:
                try:
                    self._save(file, record)
                except OSError as exc:  # a read-only run folder: the schedule still holds for this process
                    warnings.warn(f"could not save the sharing schedule to {file}: {exc}", stacklevel=2)
        if file is not None:
            self._memo[str(file)] = record
        return list(record["schedules"][str(k)]["steps"])

    def _load(self, file: Optional[Path], settings: dict) -> Optional[dict]:
        if file is None:
            return None
        if str(file) in self._memo:
            return self._memo[str(file)]
        if not file.exists():
            return None
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError):
            return None     # unreadable: calibrate again and overwrite it
        if record.get("format") != FILE_FORMAT or any(record.get(k) != v for k, v in settings.items()):
            return None
        return record

    @staticmethod
    def _save(file: Path, record: dict) -> None:
        """Indented JSON with one line per row of the similarity matrix (N lines, not N^2)."""
        from zoo.training.checkpoint import atomic_write

        head = json.dumps({k: v for k, v in record.items() if k != "similarity"}, indent=1)
        rows = ",\n".join("  " + json.dumps(row) for row in record["similarity"])
        text = f'{head[:-2]},\n "similarity": [\n{rows}\n ]\n}}\n'
        atomic_write(file, lambda f: f.write(text.encode()))
