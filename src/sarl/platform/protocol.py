"""The MLR-PL benchmark protocol as jobs: methods x known-label proportions x seeds -> the paper-style table.

Every (method, proportion, seed) is one ``sarl train`` run of the same job, so every method sees the same
partial-label mask at a given proportion and seed (the mask depends only on the data, the proportion and
``data.mask_seed``, which follows the seed). Two numbers per run, both on the complete test labels:

- **validation-selected** (ours, SARL.md): the test mAP of the epoch with the best validation mAP;
- **test-selected** (what the peers' tables report): the best test mAP over all epochs, i.e. the model chosen on
  the test set itself. It is an optimistic number, reported so that the table compares with the literature.

Outputs: ``table.md`` / ``table.csv`` (mean and standard deviation over seeds, methods x proportions, plus the
average, for both selections), ``runs.json`` (every run, with its per-epoch curves), ``map_vs_proportion.png``
and ``curves.png`` (validation mAP per epoch: whether each method's budget reached its plateau).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from ..model.config import ConfigError
from ..model.experiment import fit
from ..plots import learning_curves, map_vs_proportion
from .evaluate import evaluate_checkpoint
from .job import JobConfig, load_job
from .train import run_training

DEFAULT_PROPORTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SELECTIONS = {"val": "validation-selected (ours)", "test": "test-selected (as the peers report)"}
# Named methods: overrides applied to the job. Custom ones: "name:key=value,key=value".
METHODS: dict[str, list[str]] = {
    "sarl": ["model.head=sarl"],
    "global": ["model.head=global"],
    "dualcoop": ["model.head=dualcoop", "loss.name=asl"],
}


def parse_method(spec: str) -> tuple[str, list[str]]:
    """``sarl`` -> the preset; ``sarl-wan:model.head=sarl,loss.name=wan`` -> a custom method."""
    if ":" in spec:
        name, _, overrides = spec.partition(":")
        return name, [o for o in overrides.split(",") if o]
    if spec not in METHODS:
        raise ConfigError(f"unknown method {spec!r}; presets: {', '.join(METHODS)} (or name:key=value,...)")
    return spec, METHODS[spec]


def run_protocol(config: str | None, methods: list[str], proportions: list[float], output_dir: str | Path,
                 overrides: list[str] = (), base: dict[str, Any] | None = None, log: Any = print,
                 seeds: list[int] = (0,), in_process: bool = False) -> dict[str, dict[float, float]]:
    """Train and test every method at every proportion and seed, on Ray Train or (``in_process``) here.

    Returns {method: {proportion: validation-selected test mAP, averaged over seeds}}; the files hold the rest.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    parsed = [parse_method(m) for m in methods]
    if not parsed or not proportions or not seeds:
        raise ConfigError("the protocol needs at least one method, one proportion and one seed")
    jobs = {}
    for name, method_overrides in parsed:  # validate everything before the first run starts
        for p in proportions:
            for seed in seeds:
                job = load_job(config, [*overrides, *method_overrides, f"data.known_proportion={p}",
                                        f"train.seed={seed}", f"data.mask_seed={seed}", "train.test_every_epoch=true"],
                               base)
                job.run.name = f"{job.run_name}-{name}-p{int(round(p * 100)):02d}-s{seed}"
                jobs[name, p, seed] = job
    records = []
    for (name, p, seed), job in jobs.items():
        log(f"== {name} at {p:.0%} known labels, seed {seed}: run {job.run_name}")
        records.append({"method": name, "proportion": p, "seed": seed,
                         **(_fit_in_process(job, output_dir) if in_process else _train_on_ray(job))})
        r = records[-1]
        log(f"   {name} p={p:.1f} seed {seed}: val mAP {r['val_mAP']:.2f} (epoch {r['best_epoch']}), test mAP "
            f"{r['test_mAP']:.2f} validation-selected, {r['test_selected_mAP']:.2f} test-selected")
    (output_dir / "runs.json").write_text(json.dumps(records, indent=2))
    summary = summarise(records)
    write_table(summary, proportions, output_dir, len(seeds))
    methods_order = [name for name, _ in parsed]
    map_vs_proportion(output_dir / "map_vs_proportion.png", proportions,
                      {f"{m} ({sel}-selected)": [summary[sel][m][p] for p in proportions]
                       for m in methods_order for sel in SELECTIONS},
                      title=f"Test mAP against known-label proportion ({len(seeds)} seed(s), mean ± sd)")
    learning_curves(output_dir / "curves.png", records, proportions, methods_order)
    return {m: {p: summary["val"][m][p][0] for p in proportions} for m in methods_order}


def _record(trained: dict[str, Any], tested: dict[str, Any], history: list[dict[str, Any]],
            checkpoint: str) -> dict[str, Any]:
    return {"val_mAP": trained["val_mAP"], "best_epoch": trained["epoch"], "test_mAP": tested["mAP"],
            "test_selected_mAP": max(h["test_mAP"] for h in history), "test_CF1": tested["CF1"],
            "test_OF1": tested["OF1"], "test_AP": tested["AP"], "test_chance_mAP": tested["chance_mAP"],
            "categories": tested["categories"], "checkpoint": checkpoint,
            "curve_val_mAP": [h["val_mAP"] for h in history], "curve_test_mAP": [h["test_mAP"] for h in history]}


def _train_on_ray(job: JobConfig) -> dict[str, Any]:
    """One run through Ray Train (``sarl train``), its best-on-validation checkpoint evaluated on test by the
    cluster's workers (as many as trained, with their resources: GPUs for a GPU job), not on the driver."""
    trained = run_training(job)
    tested = evaluate_checkpoint(trained["checkpoint"], "test", workers=job.scaling.num_workers, address=job.address,
                                 on_cluster=True)
    return _record(trained["metrics"], tested, trained["history"], trained["checkpoint"])


def _fit_in_process(job: JobConfig, output_dir: Path) -> dict[str, Any]:
    """One run in this process (``experiment.fit``): no cluster start-up, one worker.

    The job's ``scaling`` is ignored, so the global batch is ``train.batch_size`` (not x num_workers).
    """
    run_dir = output_dir / "runs" / job.run_name
    result = fit(job, run_dir, log=lambda *_: None)
    history = json.loads((run_dir / "history.json").read_text())
    tested = {**result["test"], "chance_mAP": result["chance_mAP"], "categories": result["categories"]}
    return _record({"val_mAP": result["val_mAP"], "epoch": result["best_epoch"]}, tested, history,
                   str(run_dir / "best"))


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[float, tuple[float, float]]]]:
    """{selection: {method: {proportion: (mean, standard deviation over seeds)}}}."""
    out: dict[str, dict[str, dict[float, tuple[float, float]]]] = {sel: {} for sel in SELECTIONS}
    for sel, key in (("val", "test_mAP"), ("test", "test_selected_mAP")):
        groups: dict[tuple[str, float], list[float]] = {}
        for r in records:
            groups.setdefault((r["method"], r["proportion"]), []).append(r[key])
        for (method, p), values in groups.items():
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            out[sel].setdefault(method, {})[p] = (statistics.fmean(values), sd)
    return out


def write_table(summary: dict[str, dict[str, dict[float, tuple[float, float]]]], proportions: list[float],
                output_dir: Path, n_seeds: int = 1) -> str:
    """Markdown and CSV: per selection, one row per method, one column per proportion, then the average.

    Cells are ``mean ± sd`` over seeds (just the mean for one seed); the average is over proportions.
    """
    header = ["method", *[f"{p:.0%}" for p in proportions], "avg"]
    sections, csv_rows = [], [["selection", *header, "seeds"]]
    for sel, title in SELECTIONS.items():
        rows = []
        for method, by_p in summary[sel].items():
            cells = [by_p[p] for p in proportions]
            avg = sum(m for m, _ in cells) / len(cells)
            rows.append([method, *[f"{m:.2f} ± {sd:.2f}" if n_seeds > 1 else f"{m:.2f}" for m, sd in cells],
                         f"{avg:.2f}"])
            csv_rows.append([sel, method, *[f"{m:.2f}" for m, _ in cells], f"{avg:.2f}", str(n_seeds)])
        sections.append("\n".join([f"Test mAP (%), {title}, {n_seeds} seed(s):", "",
                                   "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                  + ["| " + " | ".join(r) + " |" for r in rows]))
    markdown = "\n\n".join(sections)
    (output_dir / "table.md").write_text(markdown + "\n")
    with open(output_dir / "table.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(csv_rows)
    return markdown
