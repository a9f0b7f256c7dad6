"""What produced a run: one line per start (new or resumed) in RUN/provenance.jsonl.

The command line, the zoo's git commit (and whether the checkout had uncommitted changes), the versions of
Python and the libraries that decide the numbers, the processes and device: enough to tell two runs' code
apart when their results differ.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

PACKAGES = ("repa-zoo", "torch", "torchvision", "diffusers", "timm", "open_clip_torch", "torch-fidelity", "numpy")
SOURCE = Path(__file__).resolve().parents[2]


def git_state(folder: Path = SOURCE) -> dict:
    """{"commit", "dirty"} of the checkout the zoo runs from; None where it is not a git checkout (an install)."""
    def git(*args) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def record_start(run_dir: Path, step: int, world_size: int, device: str) -> dict:
    """Append this start's line to RUN/provenance.jsonl and return it."""
    line = {"started": datetime.now().isoformat(timespec="seconds"), "step": step, "command": sys.argv,
            **git_state(), "versions": versions(), "world_size": world_size, "device": device}
    with open(Path(run_dir) / "provenance.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return line
