"""Where the zoo keeps what it builds once and reuses: built-in teacher, judge and VAE weights,
feature caches, reference statistics. `REPA_ZOO_CACHE` overrides the default ~/.cache/repa-zoo."""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("REPA_ZOO_CACHE") or Path.home() / ".cache" / "repa-zoo")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able description (of data, a model, a config), for cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_identity(path: Path | None):
    """Changes when a weights file does (replaced, re-fetched, retrained in place), so what was cached from it is
    not reused: its resolved path, size and modification time."""
    if path is None:
        return "random-init"
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@contextmanager
def caller_random_state():
    """Build something once (a teacher, judge, VAE, decoder) without moving the caller's random numbers: the builders
    seed torch for their own reproducibility, and a run that trains its teacher on first use would otherwise start
    from other weights than the same run finding the teacher cached. The CPU generator is what the trainer draws its
    initial weights from; each run re-seeds every device's generator after its set-up."""
    import torch

    with torch.random.fork_rng(devices=[]):
        yield
