"""The outputs of `zoo compare`: table.md, results.csv, fid_vs_steps.png and one sample grid per method.

Numbers come only from the per-run evaluation records (RUN/eval/*.json): results.csv lists every
(method, seed, step) record as it is, and table.md shows per method and step the mean over seeds
with +- half the range between the seeds (so the interval covers every seed). A difference to the
baseline counts as larger than the seed spread when the two methods' seed ranges do not overlap.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from zoo.training.checkpoint import atomic_write, atomic_write_text

CSV_FIELDS = ["method", "seed", "step", "fid", "kid_mean", "kid_std", "precision", "recall", "class_accuracy",
              "parameters", "backbone_parameters", "ms_per_step", "sampling_seconds", "feature_seconds"]


def fmt(x: float) -> str:
    return "–" if x is None else (f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}")


def series(results, method: str, metric: str) -> dict:
    """{step: [value per seed]} of one method's metric."""
    out = {}
    for r in results:
        if r.method == method:
            for rec in r.records:
                if metric in rec["metrics"]:
                    out.setdefault(rec["step"], []).append(rec["metrics"][metric])
    return dict(sorted(out.items()))


def mean(values) -> float:
    return sum(values) / len(values)


def cell(values) -> str:
    if len(values) == 1:
        return fmt(values[0])
    spread = (max(values) - min(values)) / 2
    # a spread the table's 4 decimals would show as 0.0000 is written out, so seeds that barely differ (the samples
    # of an untrained model all look alike to the judge) do not read as one seed run twice
    shown = fmt(spread) if spread == 0 or spread >= 5e-5 else f"{spread:.1e}"
    return f"{fmt(mean(values))} ± {shown}"


def steps_to_reach(curve: dict, target: float):
    """The first step where the mean curve reaches `target` (lower is better), linearly interpolated
    between evaluation points; (steps, exact) with exact False when already reached at the first point."""
    points = [(s, mean(v)) for s, v in curve.items()]
    for i, (step, value) in enumerate(points):
        if value <= target:
            if i == 0:
                return step, False
            s0, v0 = points[i - 1]
            return s0 + (target - v0) * (step - s0) / (value - v0), True
    return None, True


def separated(a, b) -> int:
    """-1 if every value of a lies below every value of b, +1 if above, 0 if the ranges overlap."""
    if len(a) < 2 or len(b) < 2:
        return 0
    return -1 if max(a) < min(b) else (1 if min(a) > max(b) else 0)


def write_csv(results, path: Path) -> Path:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in results:
        for rec in r.records:
            m = rec["metrics"]
            writer.writerow({"method": r.method, "seed": r.seed, "step": rec["step"],
                             **{k: m.get(k, "") for k in CSV_FIELDS[3:9]}, "parameters": r.parameters,
                             "backbone_parameters": r.backbone_parameters, "ms_per_step": r.ms_per_step,
                             "sampling_seconds": rec["seconds"]["sampling"],
                             "feature_seconds": rec["seconds"]["features"]})
    atomic_write_text(path, text.getvalue())
    return path


def _metric_table(results, methods, steps, metric: str, baseline: str, lower_is_better: bool) -> tuple:
    """Rows of one metric at every step, cells marked * where the seed range does not overlap the baseline's."""
    rows, notes = [], []
    base = series(results, baseline, metric)
    for method in methods:
        curve = series(results, method, metric)
        cells = []
        for step in steps:
            values = curve.get(step)
            if not values:
                cells.append("–")
                continue
            side = separated(values, base.get(step, [])) if method != baseline else 0
            cells.append(cell(values) + (" *" if side else ""))
            if side:
                better = (side < 0) == lower_is_better
                notes.append(f"{method} at step {step}: {'better' if better else 'worse'} than {baseline}")
        rows.append(cells)
    return rows, notes


def finished_methods(comp, results) -> list:
    """The methods with at least one finished run, in the order asked for (a method whose every run failed has no
    row; it is named under "Runs that did not finish")."""
    return [m for m in comp.methods if any(r.method == m for r in results)]


def write_table(comp, results, base_cfg, extractor_info: dict, path: Path, wall_seconds: float,
                failed: dict) -> Path:
    from zoo.compare.runner import method_of

    methods, steps, baseline = finished_methods(comp, results), comp.eval_points(), comp.methods[0]
    info = {r.method: r for r in results}
    ms = {m: mean([r.ms_per_step for r in results if r.method == m]) for m in methods}
    s = comp.settings
    d = base_cfg.data
    judge = extractor_info.get("judge_reference_accuracy")
    train_min = sum(r.ms_per_step for r in results) * comp.steps / 60_000
    evals = [sum(rec["seconds"].values()) for r in results for rec in r.records]
    eval_min, eval_each = sum(evals) / 60, mean(evals)
    scale = f" ({d.shape_scale}x the default size)" if d.dataset == "shapes" and d.shape_scale != 1 else ""
    scoped = any(method_of(o) for o in comp.overrides)
    lines = [
        f"# Side-by-side comparison: {', '.join(methods)} (baseline: {baseline})", "",
        f"- Data: {d.dataset}{scale}, {d.num_images} training images, {d.image_size}x{d.image_size}, "
        f"{d.num_classes} classes; "
        f"model preset {base_cfg.preset} (model.size={base_cfg.model.size}, patch {base_cfg.model.patch}); "
        f"batch {base_cfg.train.batch_size}; {comp.steps} steps; evaluated every {comp.eval_every} steps.",
        f"- Training seeds: {', '.join(map(str, comp.seeds))}. Overrides for every run: "
        f"{' '.join(comp.overrides) or '(none)'}"
        + (" (one in a method's own section, such as repa.*, for that method's runs only)." if scoped else ".")
        + (f" **{len(failed)} run(s) did not finish** (listed at the end); a row averages the seeds that did."
           if failed else ""),
        f"- Evaluation: {s.num_samples} class-balanced samples, {s.sampler}/{s.solver} {s.steps} steps, CFG "
        f"{s.cfg_scale}, sampling seed {s.seed}, {'EMA' if s.use_ema else 'raw'} weights; features: "
        f"{extractor_info['extractor']}" + (f" (held-out accuracy {judge:.3f}; FID on L2-normalised features)"
                                            if judge is not None else "") +
        f"; reference: {s.reference_num} real images ({extractor_info['reference']['split']}).",
        f"- Cells: mean over seeds ± half the range between seeds; * marks a difference to {baseline} larger than "
        f"the seed spread (the seed ranges do not overlap).",
        f"- Compute: about {train_min:.0f} min of training (median ms/step x steps, summed over runs) and "
        f"{eval_min:.0f} min of evaluation ({eval_each:.0f} s per evaluation point: sampling + features); "
        f"this invocation took {wall_seconds / 60:.1f} min.", "",
        "## FID at each evaluation point", "",
        "| method | parameters | ms/step | " + " | ".join(f"FID @{st}" for st in steps)
        + f" | steps to {baseline}'s final FID |",
        "| --- | --- | --- | " + " | ".join("---" for _ in steps) + " | --- |",
    ]
    fid_rows, fid_notes = _metric_table(results, methods, steps, "fid", baseline, lower_is_better=True)
    base_final = mean(series(results, baseline, "fid")[comp.steps])
    for method, cells in zip(methods, fid_rows):
        r = info[method]
        extras = r.parameters - r.backbone_parameters
        params = f"{r.parameters / 1e6:.2f}M" + (f" ({extras / 1e6:.2f}M extras)" if extras else "")
        reached, exact = steps_to_reach(series(results, method, "fid"), base_final)
        if reached is None:
            reach = f"not reached in {comp.steps}"
        else:
            reach = f"{'' if exact else '≤ '}{reached:.0f} ({comp.steps / reached:.2f}x)"
        lines.append(f"| {method} | {params} | {ms[method]:.0f} | " + " | ".join(cells) + f" | {reach} |")
    if any(r.used for r in results):
        lines += ["", "## What each row used", "", "| method | training time t | time embedding | teacher | diffuses in |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {m} | {u.get('time', '–')} | {u.get('embedding', '–')} | {u.get('teacher', '–')} | "
                  f"{u.get('space', '–')} |" for m, u in ((m, info[m].used) for m in methods)]
    acc_rows, acc_notes = _metric_table(results, methods, steps, "class_accuracy", baseline, lower_is_better=False)
    if any(c != "–" for row in acc_rows for c in row):
        lines += ["", "## Class accuracy of the samples (judge) at each evaluation point", "",
                  "| method | " + " | ".join(f"acc @{st}" for st in steps) + " |",
                  "| --- | " + " | ".join("---" for _ in steps) + " |"]
        lines += [f"| {m} | " + " | ".join(cells) + " |" for m, cells in zip(methods, acc_rows)]
    final = [("fid", "FID"), ("kid_mean", "KID"), ("precision", "precision"), ("recall", "recall"),
             ("class_accuracy", "class acc")]
    lines += ["", f"## All metrics at step {comp.steps}", "",
              "| method | " + " | ".join(name for _, name in final) + " |", "| --- |" + " --- |" * len(final)]
    for m in methods:
        vals = [series(results, m, k).get(comp.steps) for k, _ in final]
        lines.append(f"| {m} | " + " | ".join(cell(v) if v else "–" for v in vals) + " |")
    lines += ["", "## Differences larger than the seed spread", ""]
    if len(methods) < 2:
        lines.append(f"Only {baseline} was run: there is no other method to compare with yet.")
    elif len(comp.seeds) < 2:
        lines.append("One seed only: the spread between seeds is not measured, so no difference is claimed.")
    else:
        notes = [f"- FID: {n}" for n in fid_notes] + [f"- class accuracy: {n}" for n in acc_notes]
        lines += notes or ["None: every method's seed range overlaps the baseline's at every point."]
    if failed:
        lines += ["", "## Runs that did not finish", "",
                  "Each failed run's own error (the last line of its log); its folder keeps the checkpoints written "
                  "before it. Rerunning the command retries it.", ""]
        lines += [f"- {method} seed {seed}: {why}" for (method, seed), why in failed.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def line_styles(count: int) -> list:
    """A distinct look per line: the ten tab10 colours, then the same colours dashed with square markers, then
    dotted with triangles (matplotlib's default cycle repeats its colours after ten, so an 11th method would wear
    the first one's)."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    looks = [("-", "o"), ("--", "s"), (":", "^")]
    return [{"color": colours[i % 10], "linestyle": looks[i // 10 % 3][0], "marker": looks[i // 10 % 3][1]}
            for i in range(count)]


def plot_curves(comp, results, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("fid", "FID (lower is better)")]
    if any("class_accuracy" in rec["metrics"] for r in results for rec in r.records):
        metrics.append(("class_accuracy", "class accuracy of samples"))
    methods = finished_methods(comp, results)
    styles = dict(zip(methods, line_styles(len(methods))))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics) + 1.5, 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        for method in methods:
            curve = series(results, method, key)
            steps = list(curve)
            ax.plot(steps, [mean(v) for v in curve.values()], label=method, **styles[method])
            if any(len(v) > 1 for v in curve.values()):
                ax.fill_between(steps, [min(v) for v in curve.values()], [max(v) for v in curve.values()], alpha=0.2,
                                color=styles[method]["color"])
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))   # beside the plots, off the curves
    seeds = f"mean over seeds {', '.join(map(str, comp.seeds))}, band: min-max" if len(comp.seeds) > 1 else "one seed"
    fig.suptitle(f"{comp.settings.num_samples} samples, {comp.settings.sampler} {comp.settings.steps} steps; {seeds}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def write_report(comp, results, base_cfg, extractor_info: dict, wall_seconds: float, failed: dict = None) -> dict:
    """Write the outputs for the finished `results`; `failed` {(method, seed): why} names the runs that did not
    finish."""
    out = Path(comp.out)
    files = {"table": write_table(comp, results, base_cfg, extractor_info, out / "table.md", wall_seconds,
                                  failed or {}),
             "csv": write_csv(results, out / "results.csv"), "plot": plot_curves(comp, results, out / "fid_vs_steps.png")}
    for method in finished_methods(comp, results):  # the final step's grid of the first finished seed
        first = next(r for r in results if r.method == method)
        grid = first.records[-1].get("grid")
        # the record may hold a path relative to where `zoo eval` ran; the grid lies beside the record
        grid = Path(first.run_dir) / "eval" / Path(grid).name if grid else None
        if grid and grid.exists():
            copy = out / f"samples_{method}.png"
            atomic_write(copy, lambda f: f.write(grid.read_bytes()))
            files[f"samples_{method}"] = copy
    return files
