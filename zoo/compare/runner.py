"""`zoo compare`: train several methods under one budget, evaluate them alike, write a table and a plot.

Every listed method (looked up in the registry; the first is the baseline) is trained for each seed
with the same data, batch and number of steps, writing a checkpoint every `eval_every` steps. Each
checkpoint is then scored with the same sampler, number of samples, sampling seed and feature
extractor (zoo/eval/). The outputs (zoo/compare/report.py) go to the comparison folder:

  DIR/comparison.json           the protocol (checked when the comparison is resumed)
  DIR/runs/<method>-seed<S>/    each run folder: config, checkpoints, metrics.jsonl, eval/*.json
  DIR/table.md, results.csv, fid_vs_steps.png, samples_<method>.png

Resuming: run the same command again. A run that stopped mid-training continues from its latest
checkpoint (the trainer's exact resume), and evaluations already saved are not recomputed; other
methods or seeds can be added later to the same folder.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from zoo.errors import ConfigError, ZooError
from zoo.eval.evaluate import PROTOCOL, EvalSettings, Evaluator
from zoo.flow.guidance import Guidance
from zoo.training.checkpoint import atomic_write_text


@dataclass
class Comparison:
    methods: list
    steps: int
    eval_every: int
    out: Path
    seeds: list = field(default_factory=lambda: [0])
    preset: Optional[str] = None
    overrides: list = field(default_factory=list)
    settings: EvalSettings = field(default_factory=lambda: PROTOCOL)
    device: str = "auto"

    def protocol(self) -> dict:
        """What must stay the same when a comparison folder is resumed or extended: the preset, the overrides that
        go to every run and the evaluation. An override in one method's own section is checked run by run instead
        (resume_state compares each run's config with its checkpoint's, before anything trains), so a method added
        later may bring options of its own, and `--teacher` and the `<method>.encoder=` it stands for are the same
        protocol."""
        return {"preset": self.preset, "overrides": shared_overrides(self.overrides), "eval_every": self.eval_every,
                "settings": self.settings.key_fields()}

    def eval_points(self) -> list:
        return sorted({*range(self.eval_every, self.steps + 1, self.eval_every), self.steps})


@dataclass
class RunResult:
    method: str
    seed: int
    run_dir: Path
    records: list           # evaluation records, one per eval point, in step order
    parameters: int
    backbone_parameters: int
    ms_per_step: float
    used: dict = field(default_factory=dict)  # Method.used(): time distribution, teacher, diffusion space


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def method_of(override: str):
    """The registered method whose own config section an override sets (`repa.proj_coeff=2` -> `repa`), or None
    for a shared section (train.*, data.*, ...)."""
    from zoo.training.registry import available_methods

    section = override.split("=", 1)[0].split(".", 1)[0].strip()
    return section if section in available_methods() else None


def shared_overrides(overrides: list) -> list:
    """The overrides that go to every run (train.*, data.*, ...), without those of one method's own section."""
    return [o for o in overrides if method_of(o) is None]


def overrides_for(method: str, overrides: list) -> list:
    """The overrides of one method's runs: an override in another method's section (repa.encoder=... while
    running sit) belongs to that method alone, so one command can set several methods' own options."""
    return [o for o in overrides if method_of(o) in (None, method)]


def teacher_overrides(methods: list, teacher: str, preset=None) -> list:
    """`zoo compare --teacher NAME` as overrides: `<method>.encoder=NAME` for every compared method whose own config
    has a teacher (an `encoder` option), so that every aligning row aligns to the same one. They go before the
    command line's own overrides, so a `<method>.encoder=...` there still wins for that method."""
    from zoo.config import load_config, to_dict
    from zoo.training.registry import get_method_class

    for name in methods:
        get_method_class(name)  # an unknown name fails here, with the list of known ones
    owners = [m for m in methods if "encoder" in (to_dict(load_config(m, [], preset)).get(m) or {})]
    if not owners:
        raise ConfigError(f"--teacher {teacher}: none of the compared methods ({','.join(methods)}) has a teacher "
                          f"(a <method>.encoder option)")
    return [f"{m}.encoder={teacher}" for m in owners]


def check_method_overrides(methods: list, overrides: list) -> None:
    """An override of a method's own section must name a compared method, or it would silently do nothing."""
    for override in overrides:
        owner = method_of(override)
        if owner is not None and owner not in methods:
            raise ConfigError(f"override {override!r} sets an option of {owner}, which is not in --methods "
                              f"({','.join(methods)})")


def run_config(comp: Comparison, method: str, seed: int):
    from zoo.config import load_config

    overrides = [*overrides_for(method, comp.overrides), f"train.steps={comp.steps}", f"train.ckpt_every={comp.eval_every}",
                 f"train.seed={seed}", "train.sample_every=0", "sample.num=0", f"train.run_name={method}-seed{seed}",
                 f"train.out_dir={comp.out / 'runs'}"]
    if comp.device != "auto":
        overrides.append(f"train.device={comp.device}")
    return load_config(method, overrides, comp.preset)


def check_same_budget(configs: dict) -> None:
    """Every method must see the same data, batch and steps; a method's own YAML may not change them."""
    from zoo.config import to_dict

    (base_name, base), *others = configs.items()
    for name, cfg in others:
        for key in ("data", "train.batch_size", "train.steps"):
            section, _, leaf = key.partition(".")
            a, b = (to_dict(c[section]) if not leaf else c[section][leaf] for c in (base, cfg))
            if a != b:
                raise ConfigError(f"{name} uses another {key} ({b}) than the baseline {base_name} ({a}); a comparison "
                                  f"needs the same data, batch and steps: set {key} on the command line for every run")


def check_teachers(configs: dict) -> None:
    """An unknown teacher name (`--teacher`, `<method>.encoder=`) is refused before anything trains, not when the
    method's first run sets up after the baseline's have trained."""
    from zoo.config import to_dict
    from zoo.teachers import check_encoder_names

    for name, cfg in configs.items():
        encoder = (to_dict(cfg).get(name) or {}).get("encoder")
        if encoder is not None:
            try:
                check_encoder_names(encoder)
            except ConfigError as err:
                raise ConfigError(f"{name}.encoder: {err}") from None


def parameter_counts(cfg) -> tuple:
    import torch

    from zoo.backbones.sit import count_parameters
    from zoo.training.generate import build_method

    with torch.device("meta"):
        model = build_method(cfg).build_model()
    return count_parameters(model), count_parameters(model.backbone)


def method_used(cfg) -> dict:
    from zoo.training.generate import build_method

    return build_method(cfg).used()


def prepare_method(cfg, device) -> None:
    """Run the method's setup once, so that what it builds and caches on first use (a teacher, a
    feature cache) is built by one process rather than by every parallel run at the same time."""
    from zoo.training.generate import build_method

    build_method(cfg).setup(device, training=True)


def step_time_ms(run_dir: Path) -> float:
    """Median training step time over the logged windows (robust to checkpoint writes and resumes)."""
    import statistics

    from zoo.figures import read_metrics

    rates = [r["steps_per_sec"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("steps_per_sec")]
    return round(1000 / statistics.median(rates), 1) if rates else float("nan")


def reads_builtin_vae(config: dict) -> bool:
    """Whether a run (its resolved config as a dict) diffuses in or tunes the built-in VAE, whose recipe is the
    `autoencoder` section: through data.vae, or a method option `vae` (REPA-E's)."""
    own = config.get(config.get("method", ""), None)
    return config["data"]["vae"] == "builtin" or (isinstance(own, dict) and own.get("vae") == "builtin")


def resume_state(cfg, run_dir: Path):
    """The run's latest checkpoint (None if it has none), refused if that run was trained with another config."""
    from zoo.training.checkpoint import latest_checkpoint, load_checkpoint
    from zoo.config import to_dict

    latest = latest_checkpoint(run_dir)
    resume = load_checkpoint(latest) if latest else None
    if resume is not None:
        saved, wanted = dict(resume["config"]), to_dict(cfg)
        for c in (saved, wanted):  # where and how fast it runs may change between sessions; what it trains may not
            c["train"] = {k: v for k, v in c["train"].items() if k not in ("steps", "out_dir", "threads", "device")}
        if not (reads_builtin_vae(saved) or reads_builtin_vae(wanted)):  # its recipe trains nothing of this run
            saved.pop("autoencoder", None), wanted.pop("autoencoder", None)
        if saved != wanted:
            raise ConfigError(f"run folder {run_dir} was trained with another config than this comparison asks for; "
                              f"use another --out, or the original arguments")
    return resume


def train_run(cfg, run_dir: Path, label: str, progress: bool = True) -> None:
    """Train to cfg.train.steps, resuming from the run's latest checkpoint; nothing to do if it is complete."""
    from zoo.training.trainer import Trainer

    resume = resume_state(cfg, run_dir)
    if resume is not None:
        if resume["step"] >= cfg.train.steps:
            _log(f"{label}: trained ({resume['step']} steps)")
            return
        _log(f"{label}: resuming at step {resume['step']} of {cfg.train.steps}")
    else:
        _log(f"{label}: training {cfg.train.steps} steps")
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume, progress=progress)
    trainer.fit()


def evaluate_run(comp: Comparison, evaluator: Evaluator, run_dir: Path, label: str) -> list:
    from zoo.training.checkpoint import checkpoint_path, load_checkpoint

    records = []
    for step in comp.eval_points():
        ckpt = checkpoint_path(run_dir, step)
        if not ckpt.exists():
            raise ConfigError(f"{label}: checkpoint {ckpt} is missing, so step {step} cannot be evaluated")
        existed = evaluator.record_path(load_checkpoint(ckpt)).exists()
        record = evaluator.evaluate_checkpoint(ckpt)
        m = record["metrics"]
        acc = f", class acc {m['class_accuracy']:.3f}" if "class_accuracy" in m else ""
        took = "saved earlier" if existed else f"{sum(record['seconds'].values()):.0f} s"
        _log(f"{label}: step {step}: FID {m['fid']:.4f}{acc} ({took})")
        records.append(record)
    return records


def record_name(evaluator: Evaluator, cfg, run_dir: Path) -> str:
    """The glob of a run's evaluation records under this comparison's settings (other `zoo eval` records in
    RUN/eval, e.g. with --share, are not the comparison's)."""
    from zoo.config import to_dict

    state = {"config": to_dict(cfg), "path": str(run_dir / "checkpoints" / "step_0000000.pt"), "step": 0}
    return "step_*-" + evaluator.record_path(state).name.split("-", 1)[1]


def run_comparison(comp: Comparison, jobs: int = 1) -> dict:
    """Train and evaluate every (method, seed), then write the report. Returns {"results": [...], "files": {...}}.

    jobs > 1 runs that many (method, seed) runs at once in separate processes (zoo/compare/jobs.py),
    each with its own log; the runs and their numbers are the same as with jobs = 1.
    """
    from zoo.compare.report import write_report
    from zoo.training.registry import get_method_class

    if not comp.methods:
        raise ConfigError("zoo compare needs at least one method (--methods sit,repa)")
    if len(set(comp.methods)) != len(comp.methods):
        raise ConfigError(f"--methods lists a method twice: {','.join(comp.methods)}")
    if not comp.seeds or len(set(comp.seeds)) != len(comp.seeds):
        raise ConfigError(f"--seeds needs distinct seeds, got {comp.seeds}")
    if comp.eval_every < 1 or comp.steps < comp.eval_every:
        raise ConfigError(f"need 1 <= --eval-every <= --steps, got {comp.eval_every} and {comp.steps}")
    for name in comp.methods:
        get_method_class(name)  # unknown names fail here, with the list of known ones
    check_method_overrides(comp.methods, comp.overrides)
    if comp.settings.cfg_scale is not None:
        Guidance(comp.settings.cfg_scale)   # a scale below 1 is refused now, not after every run has trained
    comp.out = Path(comp.out)
    configs = {(m, s): run_config(comp, m, s) for m in comp.methods for s in comp.seeds}
    first_seed = {m: configs[(m, comp.seeds[0])] for m in comp.methods}
    check_same_budget(first_seed)
    check_teachers(first_seed)
    for (method, seed), cfg in configs.items():  # a run already in the folder must be the one asked for
        resume_state(cfg, comp.out / "runs" / f"{method}-seed{seed}")
    _check_protocol(comp)

    start = time.perf_counter()
    base_cfg = first_seed[comp.methods[0]]
    evaluator = Evaluator(comp.settings, device=comp.device)
    evaluator.reference(base_cfg.data)  # trains the judge on first use and caches the reference features
    failed = {}  # (method, seed) -> why it did not finish; the report covers the runs that did
    if jobs > 1:
        from zoo.compare.jobs import run_parallel

        for method in comp.methods:  # build what every run of a method shares (e.g. a teacher) once, here
            prepare_method(configs[(method, comp.seeds[0])], evaluator.device)
        records = {run: record_name(evaluator, cfg, comp.out / "runs" / f"{run[0]}-seed{run[1]}")
                   for run, cfg in configs.items()}
        failed = run_parallel(comp, list(configs), jobs, records)
    results, total = [], len(configs)
    for i, ((method, seed), cfg) in enumerate(configs.items(), 1):
        if (method, seed) in failed:
            continue
        label = f"[{i}/{total}] {method} seed {seed}"
        run_dir = comp.out / "runs" / f"{method}-seed{seed}"
        try:
            train_run(cfg, run_dir, label)
            records = evaluate_run(comp, evaluator, run_dir, label)
        except ZooError as err:  # e.g. a diverged loss: one run's failure does not cost the others' report
            _log(f"{label}: failed: {err}")
            failed[(method, seed)] = str(err)
            continue
        params, backbone = parameter_counts(cfg)
        results.append(RunResult(method, seed, run_dir, records, params, backbone, step_time_ms(run_dir),
                                 method_used(cfg)))
    why = "; ".join(f"{m} seed {s}: {reason}" for (m, s), reason in failed.items())
    if not any(r.method == comp.methods[0] for r in results):
        raise ZooError(f"no run of the baseline {comp.methods[0]} finished, so there is no table: {why}")
    files = write_report(comp, results, base_cfg, evaluator.describe(base_cfg.data),
                         wall_seconds=time.perf_counter() - start, failed=failed)
    _log("wrote " + ", ".join(str(p) for p in files.values()))
    if failed:
        raise ZooError(f"{len(failed)} of {total} runs failed; {files['table']} covers the others "
                       f"and names the failed ones: {why}")
    return {"results": results, "files": files}


def _check_protocol(comp: Comparison) -> None:
    comp.out.mkdir(parents=True, exist_ok=True)
    path = comp.out / "comparison.json"
    protocol = comp.protocol()
    if path.exists():
        saved = json.loads(path.read_text())["protocol"]
        saved["overrides"] = shared_overrides(saved.get("overrides", []))  # older folders saved every override
        if saved != json.loads(json.dumps(protocol)):
            changed = sorted(k for k in protocol if json.loads(json.dumps(protocol[k])) != saved.get(k))
            raise ConfigError(f"{comp.out} holds a comparison with other settings ({', '.join(changed)} differ); "
                              f"use another --out or the same arguments")
    atomic_write_text(path, json.dumps({"protocol": protocol, "methods": comp.methods, "seeds": comp.seeds,
                                        "steps": comp.steps}, indent=2) + "\n")
