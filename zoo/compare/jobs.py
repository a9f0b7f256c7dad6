"""Several runs of a comparison at once, one process each (`zoo compare --jobs N`).

On a machine with few cores, N single-threaded runs side by side get more steps per second in total
than one run using every core. Each child process trains and evaluates one (method, seed) exactly as
the sequential loop would, writing its output to RUN/compare.log; the parent shows one progress bar
per running job, read from the run's metrics.jsonl and eval folder. Afterwards the sequential loop
finds every run trained and evaluated and only writes the report.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from zoo.errors import ZooError


def _child(comp, method: str, seed: int, threads: int) -> None:
    run_dir = comp.out / "runs" / f"{method}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "compare.log"
    threading.Thread(target=_end_with_parent, args=(os.getppid(), log), daemon=True).start()
    logged(log, _train_and_evaluate, comp, method, seed, threads, run_dir)


def _end_with_parent(parent: int, log: Path, poll_seconds: float = 1.0) -> None:
    """Stop this run when the `zoo compare` process is gone. A parent killed with SIGKILL (or by the out-of-memory
    killer) runs no handler that could stop its children, and a run training on alone would hold its folder's lock
    and the CPU; once the parent is gone this process is re-parented, so its parent id changes. Exiting mid-step
    is safe: checkpoints are written atomically and the folder's lock is released with the process."""
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    with open(log, "a") as f:
        print("error: the zoo compare process that started this run ended; run stopped "
              "(rerun the command to resume it)", file=f)
    os._exit(1)


def _train_and_evaluate(comp, method: str, seed: int, threads: int, run_dir: Path) -> None:
    import torch

    from zoo.compare.runner import evaluate_run, run_config, train_run
    from zoo.eval.evaluate import Evaluator

    cfg = run_config(comp, method, seed)
    torch.set_num_threads(cfg.train.threads or threads)
    label = f"{method} seed {seed}"
    train_run(cfg, run_dir, label, progress=False)
    evaluate_run(comp, Evaluator(comp.settings, device=comp.device, progress=False), run_dir, label)


def logged(log_path: Path, fn, *args) -> None:
    """Run fn(*args) with stdout and stderr in `log_path`; an error ends up in the log too (a ZooError as its one
    line, anything else as its traceback) and exits 1. Without this the error is raised after the log is closed,
    and multiprocessing's report of it is lost."""
    streams = sys.stdout, sys.stderr
    with open(log_path, "a", buffering=1) as log:
        sys.stdout = sys.stderr = log
        try:
            fn(*args)
        except ZooError as err:
            print(f"error: {err}", file=log)
            raise SystemExit(1) from None
        except Exception:
            traceback.print_exc(file=log)
            raise SystemExit(1) from None
        finally:
            sys.stdout, sys.stderr = streams


def _last_step(run_dir: Path) -> int:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_parallel(comp, runs: list, jobs: int, records: dict, poll_seconds: float = 2.0) -> dict:
    """Train and evaluate `runs` [(method, seed)], `jobs` at a time; `records[run]` globs the run's evaluation
    records (for the progress bars). Returns {run: why} for the runs that failed; the others went on."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or torch state
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending, running, failed = list(runs), {}, {}
    # `kill` (SIGTERM) ends this process as Ctrl-C does, through the handler below, instead of leaving the children
    # training on without a parent (each holding its run folder's lock)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        _loop(comp, pending, running, failed, jobs, threads, records, poll_seconds, ctx)
    except BaseException:  # Ctrl-C, kill or an error here: stop the children too (checkpoints are written atomically)
        for proc, *_ in running.values():
            proc.terminate()
            proc.join()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed


def _loop(comp, pending: list, running: dict, failed: dict, jobs: int, threads: int, records: dict,
          poll_seconds: float, ctx) -> None:
    from tqdm import tqdm

    points = len(comp.eval_points())
    slots = list(range(jobs))
    while pending or running:
        while pending and len(running) < jobs:
            method, seed = pending.pop(0)
            proc = ctx.Process(target=_child, args=(comp, method, seed, threads), daemon=False)
            proc.start()
            run_dir, slot = comp.out / "runs" / f"{method}-seed{seed}", slots.pop(0)
            bar = tqdm(total=comp.steps, desc=f"{method} seed {seed}", unit="step", position=slot,
                       dynamic_ncols=True, leave=True)
            running[(method, seed)] = (proc, run_dir, bar, slot)
        time.sleep(poll_seconds)
        for key, (proc, run_dir, bar, slot) in list(running.items()):
            bar.n = min(_last_step(run_dir), comp.steps)
            done = len(list((run_dir / "eval").glob(records[key]))) if (run_dir / "eval").exists() else 0
            bar.set_postfix_str(f"evaluated {done}/{points}", refresh=True)
            if not proc.is_alive():
                bar.close()
                slots = sorted(slots + [slot])
                if proc.exitcode != 0:
                    log = run_dir / "compare.log"
                    last = "".join(log.read_text().strip().splitlines()[-1:]) if log.exists() else ""
                    why = last.removeprefix("error: ") or f"exit {proc.exitcode}, no output"
                    failed[key] = f"{why} (see {log})"
                del running[key]
