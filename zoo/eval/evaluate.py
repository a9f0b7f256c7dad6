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

from zoo.cache import cache_dir, fingerprint
from zoo.training.checkpoint import atomic_save, atomic_write_text
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
    ref: Optional[str] = None       # an ADM reference batch (.npz): score the ADM way (Inception FID, sFID, IS, P/R)

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
        for key in ("options", "last_step", "ref"):
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


def own_chunks(num: int, batch_size: int, proc=None) -> list:
    """The sampling chunks this process draws: chunk c of every `batch_size` labels goes to process c mod N.
    A chunk's noise depends only on (seed, c), so any number of processes draws the same samples."""
    rank, world = (proc.rank, proc.world_size) if proc is not None else (0, 1)
    return list(range(rank, (num + batch_size - 1) // batch_size, world))


def sample_chunks(method, model, labels: torch.Tensor, settings: EvalSettings, device, proc=None,
                  progress: bool = True, desc: str = "sampling"):
    """(chunk number, uint8 [B, 3, H, W]) for this process's chunks of `labels`, drawn with the settings' sampler."""
    from tqdm import tqdm

    from zoo.training.generate import iter_generate

    mine = own_chunks(len(labels), settings.batch_size, proc)
    chunks = iter_generate(method, model, labels, sampler=settings.sampler, solver=settings.solver,
                           steps=settings.steps, cfg_scale=settings.cfg_scale, cfg_interval=tuple(settings.cfg_interval),
                           seed=settings.seed, batch_size=settings.batch_size, device=device,
                           last_step=settings.last_step or 0.0, chunks=set(mine), **settings.options)
    total = sum(len(c) for i, c in enumerate(labels.split(settings.batch_size)) if i in set(mine))
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for number, chunk in zip(mine, chunks):
            bar.update(len(chunk))
            yield number, to_uint8_nchw(chunk)


def sample_uint8(method, model, labels: torch.Tensor, settings: EvalSettings, device, progress: bool = True,
                 desc: str = "sampling") -> torch.Tensor:
    """uint8 [N, 3, H, W] samples for `labels` with the settings' sampler, drawn chunk by chunk in this process."""
    return torch.cat([c for _, c in sample_chunks(method, model, labels, settings, device, None, progress, desc)])


def in_chunk_order(parts: list) -> dict:
    """{key: tensor} of every process's {chunk: {key: tensor}}, concatenated in chunk order."""
    merged = {number: values for part in parts for number, values in part.items()}
    keys = next(iter(merged.values())).keys()
    return {k: torch.cat([merged[n][k] for n in sorted(merged)]) for k in keys}


def run_dir_of(ckpt_path: Path) -> Path:
    ckpt_path = Path(ckpt_path)
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


class Evaluator:
    """Scores checkpoints or sample sets with one feature extractor; reference features are built once."""

    def __init__(self, settings: EvalSettings = EvalSettings(), device: str = "auto", progress: bool = True,
                 proc=None):
        from zoo.training.distributed import ProcessInfo, pick_device

        self.proc = proc or ProcessInfo()
        self.settings, self.progress = settings, progress and self.proc.is_main
        self.device = pick_device(device, self.proc.local_rank)
        self._extractors, self._references = {}, {}

    def extractor(self, data_cfg):
        """Built once; the default judge is the one trained on this data, so it is kept per data."""
        from zoo.data import data_identity

        if self.settings.ref:
            if "adm" not in self._extractors:
                from zoo.eval.adm import AdmInception
                from zoo.eval.extractors import inception_weights

                self._extractors["adm"] = AdmInception(inception_weights(self.settings.weights), self.device)
            return self._extractors["adm"]
        per_data = self.settings.extractor == "judge" and not self.settings.weights
        key = fingerprint(data_identity(data_cfg)) if per_data else "any"
        if key not in self._extractors:
            self._extractors[key] = build_extractor(self.settings.extractor, self.settings.weights, data_cfg,
                                                    self.device, progress=self.progress)
        return self._extractors[key]

    def features(self, images: torch.Tensor, data_cfg) -> dict:
        """The extractor's features of one batch of uint8 images (all of it in one call: the same batches in any
        number of processes give the same numbers)."""
        return self.extractor(data_cfg).extract(images, batch_size=len(images))

    def metrics(self, feats: dict, labels: Optional[torch.Tensor], data_cfg) -> dict:
        """Metrics of sample features against the reference: the ADM batch's, or the data's reference split."""
        if self.settings.ref:
            from zoo.eval.adm import adm_metrics

            return adm_metrics(feats, *self.adm_reference())
        reference = self.reference(data_cfg)
        metrics = feature_metrics(feats["features"], reference["features"], seed=self.settings.seed)
        if labels is not None and "logits" in feats:
            metrics["class_accuracy"] = class_accuracy(feats["logits"], labels)
        return metrics

    def adm_reference(self) -> tuple:
        """(the reference batch, its Inception features), the features cached per file and weights."""
        if "adm" not in self._references:
            from zoo.eval.adm import read_reference
            from zoo.eval.extractors import file_identity

            ref = read_reference(self.settings.ref)
            inception = self.extractor(None)
            key = fingerprint({"format": "adm-reference/1", "ref": file_identity(Path(self.settings.ref)),
                               "weights": file_identity(inception.weights)})
            path = cache_dir("reference") / f"adm-{key}.pt"
            feats = None
            if path.exists():
                try:
                    feats = torch.load(path, map_location="cpu", weights_only=True)
                except Exception:  # a corrupt cache entry is recomputed
                    path.unlink(missing_ok=True)
            if feats is None:
                if self.progress:
                    print(f"computing the Inception features of the {len(ref['images'])} reference images "
                          f"(cached at {path})", file=sys.stderr)
                feats = inception.extract(ref["images"])
                atomic_save(feats, path)
            self._references["adm"] = (ref, feats)
        return self._references["adm"]

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
        start = time.perf_counter()
        feats = in_chunk_order([{i: self.features(chunk, data_cfg)
                                 for i, chunk in enumerate(images.split(self.settings.batch_size))}])
        metrics = self.metrics(feats, labels, data_cfg)
        metrics["feature_seconds"] = round(time.perf_counter() - start, 2)
        return metrics

    def describe(self, data_cfg) -> dict:
        if self.settings.ref:
            from zoo.eval.extractors import file_identity

            ref, _ = self.adm_reference()
            inception = self.extractor(data_cfg)
            return {"extractor": "inception-adm", "extractor_weights": str(inception.weights),
                    "extractor_id": file_identity(inception.weights),
                    "reference": {"npz": str(Path(self.settings.ref).resolve()), "num": len(ref["images"]),
                                  "statistics": "the npz's mu/sigma" if "mu" in ref else "computed from arr_0"}}
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
        if settings.ref:
            from zoo.eval.extractors import file_identity

            ref = {"ref": file_identity(Path(settings.ref)), "weights": file_identity(self.extractor(cfg.data).weights)}
            key, name = fingerprint({"settings": settings.key_fields(), **ref})[:10], "adm"
        else:
            key = fingerprint({"settings": settings.key_fields(), "extractor": self.extractor(cfg.data).identity,
                               "reference": reference_description(cfg.data, settings.reference_num)})[:10]
            name = settings.extractor
        folder = Path(out_dir) if out_dir else run_dir_of(Path(ckpt_state["path"])) / "eval"
        return folder / f"step_{ckpt_state['step']:07d}-{name}-{key}.json"

    def evaluate_checkpoint(self, ckpt, out_dir=None, skip_existing: bool = True, grid_per_class: int = 8) -> dict:
        """Sample from a checkpoint, score the samples and save the record (and a sample grid) as JSON + PNG."""
        from zoo.config import config_from_dict
        from zoo.figures import save_grid
        from zoo.training.checkpoint import load_checkpoint
        from zoo.training.generate import load_for_sampling

        from zoo.training.distributed import barrier, gather_to_main

        state = load_checkpoint(ckpt)
        cfg = config_from_dict(state["config"])
        if self.proc.is_main:  # the main process builds what is missing (a judge to train) before the others read it
            path = self.record_path(state, out_dir)
        barrier(self.proc)
        path = self.record_path(state, out_dir)
        if skip_existing and path.exists():
            return json.loads(path.read_text())
        method, model, cfg, _ = load_for_sampling(state["path"], self.device, use_ema=self.settings.use_ema)
        settings = self.settings.resolved(cfg.sample, cfg.method)
        labels = balanced_labels(settings.num_samples, method.data.num_classes)
        per_class = min(grid_per_class, settings.num_samples // method.data.num_classes)
        grid_index = torch.arange(per_class * method.data.num_classes).view(per_class, -1).t().reshape(-1)
        start = time.perf_counter()
        feats, grid_rows, feature_seconds = {}, {}, 0.0
        for number, chunk in sample_chunks(method, model, labels, settings, self.device, self.proc, self.progress,
                                           desc=f"sampling step {state['step']}"):
            begin = time.perf_counter()
            feats[number] = self.features(chunk, cfg.data)
            feature_seconds += time.perf_counter() - begin
            first = number * settings.batch_size
            grid_rows.update({i: chunk[i - first] for i in grid_index.tolist() if first <= i < first + len(chunk)})
        parts = gather_to_main((feats, grid_rows), self.proc)
        if not self.proc.is_main:
            return None
        sample_seconds = time.perf_counter() - start - feature_seconds  # the main process's
        grid_rows = {i: image for _, rows in parts for i, image in rows.items()}
        start = time.perf_counter()
        metrics = self.metrics(in_chunk_order([f for f, _ in parts]), labels, cfg.data)
        metrics["feature_seconds"] = round(feature_seconds + time.perf_counter() - start, 2)
        record = {"checkpoint": state["path"], "method": cfg.method, "step": state["step"],
                  "train_seed": cfg.train.seed, **dataclasses.asdict(settings), **self.describe(cfg.data),
                  "metrics": {k: v for k, v in metrics.items() if k != "feature_seconds"},
                  "seconds": {"sampling": round(sample_seconds, 2), "features": metrics["feature_seconds"]},
                  "device": str(self.device), "time": datetime.now().isoformat(timespec="seconds")}
        record["cfg_interval"] = list(record["cfg_interval"])
        path.parent.mkdir(parents=True, exist_ok=True)
        if per_class > 0:
            images = torch.stack([grid_rows[i] for i in grid_index.tolist()])
            grid = save_grid(images.float() / 127.5 - 1, path.with_name(path.stem + "-grid.png"), nrow=per_class,
                             scale=2 if images.shape[-1] <= 64 else 1)
            record["grid"] = str(grid)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")  # a comparison reads it back as the truth
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
    if "sfid" in m:
        print(f"FID {m['fid']:.3f}, sFID {m['sfid']:.3f}, Inception Score {m['inception_score']:.2f}, "
              f"precision {m['precision']:.3f}, recall {m['recall']:.3f} (ADM's evaluation, {record['extractor']})",
              file=file)
        return
    acc = f", class accuracy {m['class_accuracy']:.3f}" if "class_accuracy" in m else ""
    print(f"FID {m['fid']:.4f} ({record['extractor']}), KID {m['kid_mean']:.5f} +- {m['kid_std']:.5f}, "
          f"precision {m['precision']:.3f}, recall {m['recall']:.3f}{acc}", file=file)
