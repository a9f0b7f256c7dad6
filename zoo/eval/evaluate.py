"""Evaluate a checkpoint (or a folder / .npz of samples): sample, extract features, score, save JSON.

A record holds the metrics and, beside them, everything that produced them: checkpoint and step,
sampler, solver, steps, CFG scale and interval, the method's sampling options (DDT's --share), seed,
number of samples, batch size, EMA or raw weights, the feature extractor and the identity of its weights, and the reference split. Records
are saved as `RUN/eval/step_NNNNNNN-<extractor>-<key>.json`, where `key` hashes the settings, so
an evaluation that is already there is found again instead of being recomputed.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

from zoo.cache import fingerprint
from zoo.errors import ConfigError, DataError
from zoo.eval.extractors import build_extractor
from zoo.eval.metrics import class_accuracy, feature_metrics
from zoo.eval.reference import reference_description, reference_features


@dataclass
class EvalSettings:
    """How samples are drawn and scored. None: take the value from the checkpoint's `sample.*` config."""
    num_samples: int = 500          # class-balanced: sample i has class i mod num_classes
    sampler: Optional[str] = None
    solver: Optional[str] = None
    steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    cfg_interval: Optional[tuple] = None
    last_step: Optional[float] = None  # the ODE grid's last step (sample.last_step)
    seed: int = 0
    batch_size: int = 100           # part of the noise seeding, so part of the settings
    use_ema: bool = True
    extractor: str = "judge"        # judge | inception | dinov2 | dinov2-vit-{s,b,l,g}-14
    weights: Optional[str] = None   # the extractor's weights file; None: its default place
    reference_num: int = 5000       # real images the samples are compared with
    options: dict = field(default_factory=dict)  # the method's sampling options by keyword, e.g. {"share": "dp:4"}

    def resolved(self, sample_cfg, method: Optional[str] = None) -> "EvalSettings":
        """None fields from the checkpoint's `sample.*`; with `method`, its options checked and defaults dropped."""
        fill = {"sampler": sample_cfg.sampler, "solver": sample_cfg.solver, "steps": sample_cfg.steps,
                "cfg_scale": sample_cfg.cfg_scale, "cfg_interval": tuple(sample_cfg.cfg_interval),
                "last_step": sample_cfg.last_step}
        out = dataclasses.replace(self, **{k: v for k, v in fill.items() if getattr(self, k) is None})
        return dataclasses.replace(out, options=method_options(method, self.options)) if method else out

    def key_fields(self) -> dict:
        """What the record's key hashes: every setting; the options and the last step only when there are any,
        so that records saved before they existed keep their keys."""
        fields = dataclasses.asdict(self)
        for key in ("options", "last_step"):
            if not fields[key]:
                del fields[key]
        return fields


def method_options(method: str, options: dict) -> dict:
    """`options` checked against the method's `sampling_options()`, without those equal to their default
    (so `--share none` and no flag share one record)."""
    from zoo.training.registry import get_method_class

    known = {o.dest: o for o in get_method_class(method).sampling_options()}
    unknown = sorted(set(options) - set(known))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        valid = ", ".join(o.flag for o in known.values()) or "none"
        raise ConfigError(f"{flags}: not a sampling option of method {method!r} (its options: {valid})")
    return {k: v for k, v in options.items() if v != known[k].default}


# The comparison protocol (docs/benchmarks.md): the same sampler for every method, whatever its config says.
PROTOCOL = EvalSettings(sampler="ode", solver="euler", steps=32, cfg_scale=1.0, cfg_interval=(0.0, 1.0),
                        last_step=0.0)


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num) % num_classes


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sample_uint8(method, model, labels: torch.Tensor, settings: EvalSettings, device, progress: bool = True,
                 desc: str = "sampling") -> torch.Tensor:
    """uint8 [N, 3, H, W] samples for `labels` with the settings' sampler, drawn chunk by chunk."""
    from tqdm import tqdm

    from zoo.training.generate import iter_generate

    chunks = iter_generate(method, model, labels, sampler=settings.sampler, solver=settings.solver,
                           steps=settings.steps, cfg_scale=settings.cfg_scale, cfg_interval=tuple(settings.cfg_interval),
                           seed=settings.seed, batch_size=settings.batch_size, device=device,
                           last_step=settings.last_step or 0.0, **settings.options)
    out = []
    with tqdm(total=len(labels), desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for chunk in chunks:
            out.append(to_uint8_nchw(chunk))
            bar.update(len(chunk))
    return torch.cat(out)


def run_dir_of(ckpt_path: Path) -> Path:
    ckpt_path = Path(ckpt_path)
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


class Evaluator:
    """Scores checkpoints or sample sets with one feature extractor; reference features are built once."""

    def __init__(self, settings: EvalSettings = EvalSettings(), device: str = "auto", progress: bool = True):
        from zoo.training.distributed import pick_device

        self.settings, self.device, self.progress = settings, pick_device(device), progress
        self._extractors, self._references = {}, {}

    def extractor(self, data_cfg):
        """Built once; the default judge is the one trained on this data, so it is kept per data."""
        from zoo.data import data_identity

        per_data = self.settings.extractor == "judge" and not self.settings.weights
        key = fingerprint(data_identity(data_cfg)) if per_data else "any"
        if key not in self._extractors:
            self._extractors[key] = build_extractor(self.settings.extractor, self.settings.weights, data_cfg,
                                                    self.device, progress=self.progress)
        return self._extractors[key]

    def reference(self, data_cfg) -> dict:
        key = fingerprint([reference_description(data_cfg, self.settings.reference_num),
                           self.extractor(data_cfg).identity])
        if key not in self._references:
            self._references[key] = reference_features(data_cfg, self.settings.reference_num, self.extractor(data_cfg),
                                                       progress=self.progress)
        return self._references[key]

    # ---------------------------------------------------------------- scoring
    def score(self, images: torch.Tensor, labels: Optional[torch.Tensor], data_cfg) -> dict:
        """Metrics of uint8 samples against the data's reference split (class accuracy when labels are known)."""
        if len(images) == 0:
            raise DataError("there are no samples to evaluate")
        extractor, reference = self.extractor(data_cfg), self.reference(data_cfg)
        start = time.perf_counter()
        feats = extractor.extract(images, progress=self.progress, desc="sample features")
        metrics = feature_metrics(feats["features"], reference["features"], seed=self.settings.seed)
        if labels is not None and "logits" in feats:
            metrics["class_accuracy"] = class_accuracy(feats["logits"], labels)
        metrics["feature_seconds"] = round(time.perf_counter() - start, 2)
        return metrics

    def describe(self, data_cfg) -> dict:
        extractor, reference = self.extractor(data_cfg), self.reference(data_cfg)
        out = {"extractor": extractor.short_name, "extractor_weights": str(extractor.weights),
               "extractor_id": extractor.identity["weights"],
               "reference": {**reference_description(data_cfg, self.settings.reference_num), "key": reference["key"]}}
        if extractor.short_name == "judge":
            acc = getattr(extractor.module, "record", {}).get("reference_accuracy")
            out["judge_reference_accuracy"] = acc
        return out

    # ---------------------------------------------------------------- checkpoints
    def record_path(self, ckpt_state: dict, out_dir=None) -> Path:
        from zoo.config import config_from_dict

        cfg = config_from_dict(ckpt_state["config"])
        settings = self.settings.resolved(cfg.sample, cfg.method)
        key = fingerprint({"settings": settings.key_fields(), "extractor": self.extractor(cfg.data).identity,
                           "reference": reference_description(cfg.data, settings.reference_num)})[:10]
        folder = Path(out_dir) if out_dir else run_dir_of(Path(ckpt_state["path"])) / "eval"
        return folder / f"step_{ckpt_state['step']:07d}-{settings.extractor}-{key}.json"

    def evaluate_checkpoint(self, ckpt, out_dir=None, skip_existing: bool = True, grid_per_class: int = 8) -> dict:
        """Sample from a checkpoint, score the samples and save the record (and a sample grid) as JSON + PNG."""
        from zoo.training.checkpoint import load_checkpoint
        from zoo.figures import save_grid
        from zoo.training.generate import load_for_sampling

        state = load_checkpoint(ckpt)
        path = self.record_path(state, out_dir)
        if skip_existing and path.exists():
            return json.loads(path.read_text())
        method, model, cfg, _ = load_for_sampling(state["path"], self.device, use_ema=self.settings.use_ema)
        settings = self.settings.resolved(cfg.sample, cfg.method)
        labels = balanced_labels(settings.num_samples, method.data.num_classes)
        start = time.perf_counter()
        images = sample_uint8(method, model, labels, settings, self.device, self.progress,
                              desc=f"sampling step {state['step']}")
        sample_seconds = time.perf_counter() - start
        metrics = self.score(images, labels, cfg.data)
        record = {"checkpoint": state["path"], "method": cfg.method, "step": state["step"],
                  "train_seed": cfg.train.seed, **dataclasses.asdict(settings), **self.describe(cfg.data),
                  "metrics": {k: v for k, v in metrics.items() if k != "feature_seconds"},
                  "seconds": {"sampling": round(sample_seconds, 2), "features": metrics["feature_seconds"]},
                  "device": str(self.device), "time": datetime.now().isoformat(timespec="seconds")}
        record["cfg_interval"] = list(record["cfg_interval"])
        path.parent.mkdir(parents=True, exist_ok=True)
        per_class = min(grid_per_class, settings.num_samples // method.data.num_classes)
        if per_class > 0:
            order = torch.arange(per_class * method.data.num_classes).view(per_class, -1).t().reshape(-1)
            grid = save_grid(images[order].float() / 127.5 - 1, path.with_name(path.stem + "-grid.png"), nrow=per_class,
                             scale=2 if images.shape[-1] <= 64 else 1)
            record["grid"] = str(grid)
        path.write_text(json.dumps(record, indent=2) + "\n")
        record["path"] = str(path)
        return record


def load_samples(path) -> tuple:
    """(uint8 images [N, 3, H, W], labels or None) from a folder of PNG/JPEG files or an ADM-style .npz."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise DataError(f"samples {path} do not exist")
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"samples must be a folder of images or an .npz file, got {path}")
        with np.load(path) as data:
            if "arr_0" not in data:
                raise DataError(f"{path} has no arr_0 (expected ADM's layout: arr_0 uint8 N x H x W x 3)")
            arr, labels = data["arr_0"], data["arr_1"] if "arr_1" in data else None
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise DataError(f"{path}: arr_0 must be uint8 N x H x W x 3, got {arr.dtype} {arr.shape}")
        if len(arr) == 0:
            raise DataError(f"{path} holds no samples (arr_0 is empty)")
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        return images, torch.from_numpy(labels).long() if labels is not None else None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise DataError(f"sample folder {path} has no images (.png, .jpg, .jpeg)")
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    if len({a.shape for a in arrays}) > 1:
        raise DataError(f"the images in {path} do not all have the same size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), None


def print_record(record: dict, file=sys.stdout) -> None:
    m = record["metrics"]
    acc = f", class accuracy {m['class_accuracy']:.3f}" if "class_accuracy" in m else ""
    print(f"FID {m['fid']:.4f} ({record['extractor']}), KID {m['kid_mean']:.5f} +- {m['kid_std']:.5f}, "
          f"precision {m['precision']:.3f}, recall {m['recall']:.3f}{acc}", file=file)
