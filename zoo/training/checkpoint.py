"""Checkpoints: written atomically, carrying everything needed to rebuild and resume a run.

A checkpoint holds the resolved config, the model, its EMA, every optimizer, the step and the
RNG state of every process. It is written to a temporary file in the same folder and renamed
over the final name, so a crash mid-write never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import torch

from zoo.errors import CheckpointError, DiskFull

FORMAT = "repa-zoo/2"
# Format 1 (before the official time embedding options and position table): its models cannot be rebuilt.
OLD_FORMATS = {"repa-zoo/1": "its backbone's position table has the rows and columns swapped against this version's "
                             "(which follows the official SiT/REPA table) and its DDT differs from the released one"}
CKPT_PATTERN = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary file beside `path`, then rename it over `path`: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        # torch.save reports a full disk as a RuntimeError of its zip writer ("... unexpected pos ...")
        full = full or (isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "file write failed" in str(exc)))
        if full:
            free = shutil.disk_usage(path.parent).free / 2**20
            raise DiskFull(f"the disk is full: writing {path} failed with {free:.0f} MiB free in {path.parent}; free "
                           "space there or write elsewhere (train.out_dir=...)") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    folder = Path(run_dir) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := CKPT_PATTERN.match(p.name)))
    return found[-1][1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run folder {path} has no checkpoints (expected {path}/checkpoints/step_*.pt)")
        return latest
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def damage(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint file's archive, or None: torch.save writes a zip archive whose every entry
    carries a CRC-32, so flipped bytes anywhere in the weights are found before they are trusted."""
    if not zipfile.is_zipfile(path):
        return "not a torch.save archive: truncated or foreign"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"its archive cannot be read ({type(exc).__name__})"
    return f"the CRC of {bad} does not match its bytes" if bad else None


def newest_intact(run_dir: Path, before: Path) -> Optional[Path]:
    folder = Path(run_dir) / "checkpoints"
    older = sorted(((int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := CKPT_PATTERN.match(p.name))
                    and p != before), reverse=True)
    return next((p for _, p in older if damage(p) is None), None)


def load_checkpoint(path) -> dict:
    given = Path(path)
    path = resolve_checkpoint(path)
    problem = damage(path)
    if problem:
        hint = ""
        if given.is_dir():
            intact = newest_intact(given, path)
            hint = (f"; the newest intact checkpoint of the run is {intact} (give that file to --resume)" if intact
                    else "; the run has no intact earlier checkpoint")
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a repa-zoo checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and state.get("format") in OLD_FORMATS:
        raise CheckpointError(f"checkpoint {path} was written by an older repa-zoo (format {state['format']!r}, this "
                              f"version reads {FORMAT!r}): {OLD_FORMATS[state['format']]}; train it again")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a repa-zoo checkpoint (expected format {FORMAT!r})")
    missing = [k for k in ("config", "model", "ema", "step") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    state["path"] = str(path)
    return state


def load_artifact(path, fmt: str, what: str, make: str) -> dict:
    """A dict saved with `atomic_save` and tagged `format: fmt` (a judge, a teacher), or a CheckpointError that
    says what is wrong and how to make the file again (`make`, a command)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} do not exist (train them with `{make}`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what} {path} are corrupt ({type(exc).__name__}); delete the file and run "
                              f"`{make}` again") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise CheckpointError(f"{path} is not a repa-zoo {what.split()[0]} (expected format {fmt!r})")
    return state


def load_model_weights(model: torch.nn.Module, weights: dict, path: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model its config builds: "
                              f"{str(exc).splitlines()[0]}") from None
