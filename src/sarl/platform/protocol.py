"""The MLR-PL benchmark protocol as jobs: methods x known-label proportions -> the paper-style table.

Every (method, proportion) is one ``sarl train`` run of the same job with the same seeds, so every method sees
the same partial-label mask at a given proportion (the mask depends only on the data, the proportion and
``data.mask_seed``). Each run's best-on-validation checkpoint is then evaluated on the complete test labels.
Outputs: ``table.md`` and ``table.csv`` (test mAP, methods x proportions, plus the average) and
``map_vs_proportion.png``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..model.config import ConfigError
from ..plots import map_vs_proportion
from .evaluate import evaluate_checkpoint
from .job import load_job
from .train import run_training

DEFAULT_PROPORTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
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
                 overrides: list[str] = (), base: dict[str, Any] | None = None,
                 log: Any = print) -> dict[str, dict[float, float]]:
    """Train and test every method at every proportion; returns {method: {proportion: test mAP}}."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    parsed = [parse_method(m) for m in methods]
    jobs = {}
    for name, method_overrides in parsed:  # validate everything before the first run starts
        for p in proportions:
            jobs[name, p] = load_job(config, [*overrides, *method_overrides, f"data.known_proportion={p}"], base)
            job = jobs[name, p]
            job.run.name = f"{job.run_name}-{name}-p{int(round(p * 100)):02d}"
    table: dict[str, dict[float, float]] = {name: {} for name, _ in parsed}
    records = []
    for (name, p), job in jobs.items():
        log(f"== {name} at {p:.0%} known labels: run {job.run_name}")
        trained = run_training(job)
        tested = evaluate_checkpoint(trained["checkpoint"], "test")
        table[name][p] = tested["mAP"]
        records.append({"method": name, "proportion": p, "val_mAP": trained["metrics"]["val_mAP"],
                        "test_mAP": tested["mAP"], "test_CF1": tested["CF1"], "test_OF1": tested["OF1"],
                        "test_AP": tested["AP"], "test_chance_mAP": tested["chance_mAP"],
                        "categories": tested["categories"], "checkpoint": trained["checkpoint"]})
        log(f"   {name} p={p:.1f}: val mAP {trained['metrics']['val_mAP']:.2f}, test mAP {tested['mAP']:.2f}")
    write_table(table, proportions, output_dir)
    (output_dir / "runs.json").write_text(json.dumps(records, indent=2))
    map_vs_proportion(output_dir / "map_vs_proportion.png", proportions,
                      {m: [table[m][p] for p in proportions] for m in table})
    return table


def write_table(table: dict[str, dict[float, float]], proportions: list[float], output_dir: Path) -> str:
    """Markdown and CSV: one row per method, one column per proportion, then the average."""
    header = ["method", *[f"{p:.0%}" for p in proportions], "avg"]
    rows = []
    for method, by_p in table.items():
        values = [by_p[p] for p in proportions]
        rows.append([method, *[f"{v:.2f}" for v in values], f"{sum(values) / len(values):.2f}"])
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    (output_dir / "table.md").write_text(markdown + "\n")
    with open(output_dir / "table.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return markdown
