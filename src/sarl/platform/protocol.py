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

``runs.json`` is rewritten after every run, and a protocol started again with the same output directory skips
the runs it already holds for the same job (``job_digest``), so an interrupted protocol continues. Parts run
apart (other seeds, methods or machines) are put together by ``merge_protocol`` (``sarl protocol --merge``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

from ..model.config import ConfigError, to_dict
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
                job = load_job(config, [*overrides, *method_overrides], base,
                               fixed={"data": {"known_proportion": p, "mask_seed": seed},
                                      "train": {"seed": seed, "test_every_epoch": True}})
                job.run.name = f"{job.run_name}-{name}-p{int(round(p * 100)):02d}-s{seed}"
                jobs[name, p, seed] = job
    done = {(r["method"], r["proportion"], r["seed"]): r for r in read_runs(output_dir)}
    records = []
    for (name, p, seed), job in jobs.items():
        digest = job_digest(job)
        previous = done.get((name, p, seed))
        if previous is not None and previous.get("job_digest") == digest:
            log(f"== {name} at {p:.0%} known labels, seed {seed}: in {output_dir / RUNS_FILE} already")
            records.append(previous)
            continue
        log(f"== {name} at {p:.0%} known labels, seed {seed}: run {job.run_name}")
        records.append({"method": name, "proportion": p, "seed": seed, "job_digest": digest,
                        **(_fit_in_process(job, output_dir) if in_process else _train_on_ray(job))})
        r = records[-1]
        log(f"   {name} p={p:.1f} seed {seed}: val mAP {r['val_mAP']:.2f} (epoch {r['best_epoch']}), test mAP "
            f"{r['test_mAP']:.2f} validation-selected, {r['test_selected_mAP']:.2f} test-selected")
        kept = {k: v for k, v in done.items() if k not in {(x["method"], x["proportion"], x["seed"]) for x in records}}
        write_runs(output_dir, [*kept.values(), *records])  # after every run: an interruption loses one run at most
    summary = report(records, output_dir)
    return {m: {p: summary["val"][m][p][0] for p in proportions} for m in [name for name, _ in parsed]}


RUNS_FILE = "runs.json"


def job_digest(job: JobConfig) -> str:
    """What a run's record was computed from: the whole job (``run.*`` names and places excluded)."""
    values = to_dict(job)
    values.pop("run", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_runs(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / RUNS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def write_runs(output_dir: Path, records: list[dict[str, Any]]) -> None:
    tmp = output_dir / f".{RUNS_FILE}.tmp"
    tmp.write_text(json.dumps(records, indent=2))
    tmp.replace(output_dir / RUNS_FILE)  # whole or not at all


def report(records: list[dict[str, Any]], output_dir: str | Path) -> dict[str, Any]:
    """The table, ``map_vs_proportion.png`` and ``curves.png`` of ``records`` in ``output_dir``; returns the
    summary. Methods keep their first appearance's order; proportions are sorted."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in records))
    proportions = sorted({r["proportion"] for r in records})
    missing = [(m, p) for m in methods for p in proportions
               if not any(r["method"] == m and r["proportion"] == p for r in records)]
    if missing:
        raise ConfigError("no run for " + ", ".join(f"{m} at {p:.0%}" for m, p in missing)
                          + ": every method needs every proportion for the table")
    seeds = {(r["method"], r["proportion"]): set() for r in records}
    for r in records:
        seeds[r["method"], r["proportion"]].add(r["seed"])
    n_seeds = max(len(s) for s in seeds.values())
    if min(len(s) for s in seeds.values()) != n_seeds:
        thin = sorted(f"{m} at {p:.0%} ({len(s)})" for (m, p), s in seeds.items() if len(s) < n_seeds)
        raise ConfigError(f"uneven seeds: {', '.join(thin)} against {n_seeds} elsewhere; the table's cells would "
                          "average different numbers of runs")
    summary = summarise(records)
    write_table(summary, proportions, output_dir, n_seeds)
    map_vs_proportion(output_dir / "map_vs_proportion.png", proportions,
                      {f"{m} ({sel}-selected)": [summary[sel][m][p] for p in proportions]
                       for m in methods for sel in SELECTIONS},
                      title=f"Test mAP against known-label proportion ({n_seeds} seed(s), mean ± sd)")
    learning_curves(output_dir / "curves.png", records, proportions, methods)
    return summary


def merge_protocol(inputs: list[str | Path], output_dir: str | Path) -> dict[str, Any]:
    """Put together the ``runs.json`` of protocols run apart (seeds, methods, machines) and report them as one.

    A (method, proportion, seed) present in several inputs must come from the same job (``job_digest``), else
    the merged table would mix recipes; the later input's record is kept.
    """
    merged: dict[tuple[str, float, int], dict[str, Any]] = {}
    for directory in inputs:
        records = read_runs(directory)
        if not records:
            raise ConfigError(f"{Path(directory) / RUNS_FILE} does not exist or holds no runs")
        for r in records:
            key = (r["method"], r["proportion"], r["seed"])
            if key in merged and merged[key].get("job_digest") != r.get("job_digest"):
                raise ConfigError(f"{r['method']} at {r['proportion']:.0%}, seed {r['seed']}: {directory} ran another "
                                  "job than an earlier input (job_digest differs)")
            merged[key] = r
    records = sorted(merged.values(), key=lambda r: (r["seed"], r["proportion"]))  # stable: methods keep order
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_runs(Path(output_dir), records)
    return report(records, output_dir)


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
