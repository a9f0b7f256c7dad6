"""An official checkpoint as a zoo run folder (`zoo import`): what `zoo sample`, `eval`, `export-npz` and
`train --resume` read.

    official file -> read_official (EMA and raw weights, DDP/compile prefixes) -> Method.from_official
    -> the method's model of the resolved config, loaded strictly -> RUN/checkpoints/step_0000000.pt

The classes come from the weights (the label table has one row per class plus the null label); the
config is the recipe's (`--preset`, overrides). Nothing else is guessed: a tensor that does not fit the
model the config builds is a one-line error that names the first such key and both shapes.
"""
from __future__ import annotations

import argparse
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from zoo.config import to_dict, to_yaml
from zoo.errors import CheckpointError, ConfigError
from zoo.training.checkpoint import FORMAT, atomic_save, atomic_write_text, checkpoint_path, latest_checkpoint
from zoo.training.method import DataInfo
from zoo.training.registry import get_method_class

WEIGHT_KEYS = ("ema", "model", "state_dict")   # where official training scripts keep the weights
PREFIXES = ("module.", "_orig_mod.")           # DistributedDataParallel, torch.compile
# A PyTorch Lightning module that holds the network twice (DDT's released files): its parts by prefix
LIGHTNING = {"raw": "denoiser.", "ema": "ema_denoiser.", "shared": "diffusion_trainer."}
LABEL_TABLE = "backbone.y_embedder.embedding_table.weight"


@dataclass
class Imported:
    """What `import_official` found and wrote."""
    checkpoint: Path
    layout: str                     # which weights became the zoo's model and EMA
    mapped: int                     # tensors loaded into the model
    unused: list = field(default_factory=list)   # official keys the model has no place for
    ignored: list = field(default_factory=list)  # top-level entries that hold no weights (optimizer, args, ...)


def read_official(path) -> tuple[dict, dict, str, list]:
    """(raw weights, EMA weights, a description of the layout, the other top-level entries) of an official file.

    A training checkpoint {"model", "ema", "opt", "args", ...} gives both; a file with one of them, or a bare
    state dict (the released SiT-XL/2 and REPA files), gives it for both; a Lightning `state_dict` that holds
    `denoiser.` and `ema_denoiser.` (DDT) gives each, with the trainer's `diffusion_trainer.` heads (the REPA
    projector) beside both. Prefixes of DDP and torch.compile go.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint {path} does not exist (the method's page says where to get it)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"official checkpoint {path} is corrupt or truncated (not a torch.save archive)")
    try:  # training scripts save their argparse.Namespace beside the weights: allowed, nothing else is unpickled
        with torch.serialization.safe_globals([argparse.Namespace]):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"official checkpoint {path} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(content, dict) or not content:
        raise CheckpointError(f"official checkpoint {path} holds no state dict")
    found = {k: content[k] for k in WEIGHT_KEYS if isinstance(content.get(k), dict)}
    if found:
        raw = found.get("model", found.get("state_dict", found.get("ema")))
        ema = found.get("ema", raw)
        layout = f"model <- {'model' if 'model' in found else next(iter(found))}, ema <- " \
                 f"{'ema' if 'ema' in found else next(iter(found))}"
        ignored = sorted(k for k in content if k not in found)
        if any(k.startswith(LIGHTNING["ema"]) for k in raw):
            raw, ema = _lightning_part(raw, "raw"), _lightning_part(raw, "ema")
            layout = f"a Lightning state_dict: model <- {LIGHTNING['raw']}, ema <- {LIGHTNING['ema']}"
    elif all(torch.is_tensor(v) for v in content.values()):
        raw = ema = content
        layout, ignored = "a bare state dict: model and ema", []
    else:
        raise CheckpointError(f"official checkpoint {path} has no weights under {', '.join(WEIGHT_KEYS)} and is not "
                              f"a state dict (its keys: {', '.join(sorted(map(str, content))[:8])})")
    return _unprefixed(raw), _unprefixed(ema), layout, ignored


def _lightning_part(state: dict, part: str) -> dict:
    """The network under LIGHTNING[part], with the shared heads, each without its prefix."""
    out = {}
    for prefix in (LIGHTNING[part], LIGHTNING["shared"]):
        out.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return out


def _unprefixed(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def first_mismatch(expected: dict, got: dict) -> str:
    """One line for the first difference between the model's state dict and the mapped official one."""
    for key, value in expected.items():
        if key not in got:
            return f"the recipe's model has {key} {list(value.shape)}, which the checkpoint does not provide"
        if tuple(got[key].shape) != tuple(value.shape):
            return (f"{key} is {list(got[key].shape)} in the checkpoint but {list(value.shape)} in the recipe's "
                    "model")
    extra = next(k for k in got if k not in expected)
    return f"the checkpoint's {extra} {list(got[extra].shape)} has no place in the recipe's model"


def classes_of(state: dict, source: Path) -> int:
    """The number of classes of a class-conditional model with CFG: its label table's rows minus the null label."""
    if LABEL_TABLE not in state:
        raise CheckpointError(f"official checkpoint {source} has no class-label table ({LABEL_TABLE} after "
                              "mapping): the zoo imports class-conditional models")
    return state[LABEL_TABLE].shape[0] - 1


def mapped_by(method, official: dict, source: Path) -> tuple[dict, list]:
    """`method.from_official(official)`; a file of another method or layout fails inside the mapping in many ways,
    and each is one line that says so."""
    try:
        return method.from_official(official)
    except (ConfigError, CheckpointError) as exc:
        raise CheckpointError(f"{source} does not fit the {method.name} recipe ({method.cfg.preset}): {exc}") from None
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{source} does not fit the {method.name} recipe ({method.cfg.preset}): it is not in the "
                              f"official {method.name} layout ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") \
            from None


def import_official(cfg, source, out) -> Imported:
    """Write `source` (an official checkpoint of method cfg.method) as the run folder `out` of config `cfg`."""
    out, source = Path(out), Path(source)
    if latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints: import into a new run folder (a run has one writer)")
    raw, ema, layout, ignored = read_official(source)
    cls = get_method_class(cfg.method)
    probe = cls(cfg, DataInfo(3, cfg.data.image_size, 1))           # the mapping does not depend on the classes
    mapped_ema, unused = mapped_by(probe, ema, source)
    data = DataInfo(3, cfg.data.image_size, classes_of(mapped_ema, source))
    method = cls(cfg, data)
    with torch.device("meta"):
        expected = method.build_model().state_dict()
    mapped = {"ema": mapped_ema, "model": mapped_ema if raw is ema else mapped_by(method, raw, source)[0]}
    states = {}
    for name, weights in mapped.items():
        if set(weights) != set(expected) or any(tuple(weights[k].shape) != tuple(expected[k].shape) for k in expected):
            raise CheckpointError(f"{source} does not fit the {cfg.method} recipe ({cfg.preset}): "
                                  f"{first_mismatch(expected, weights)}")
        states[name] = {k: v.to(expected[k].dtype) for k, v in weights.items()}
    path = checkpoint_path(out, 0)
    atomic_save({"format": FORMAT, "config": to_dict(cfg), "step": 0, "model": states["model"],
                 "ema": states["ema"], "optimizers": {}, "rng": [], "data": asdict(data)}, path)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    result = Imported(path, layout, len(states["ema"]), sorted(unused), ignored)
    record = {"source": str(source), "method": cfg.method, "preset": cfg.preset, "layout": layout,
              "mapped_tensors": result.mapped, "unused_keys": result.unused, "ignored_entries": ignored,
              "classes": data.num_classes}
    atomic_write_text(out / "import.json", json.dumps(record, indent=2) + "\n")
    return result
