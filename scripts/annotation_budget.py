"""Is a suggestion worth asking? An annotation budget spent on ``sarl complete --suggest``'s entries or on random
ones, answered through a real Label Studio server, then retrained (issue 19, item 5).

    # the pipeline end to end, one seed, one budget, one strategy
    nice -n 15 .venv/bin/python scripts/annotation_budget.py --seeds 0 --budgets 0.05 --strategies margin
    # the experiment (resumable: runs already in runs.json are skipped), in the background
    nohup nice -n 15 .venv/bin/python scripts/annotation_budget.py --seeds 0 1 2 --budgets 0.01 0.02 0.05 \
        --strategies margin random > runs/annotation-budget/log.txt 2>&1 &
    # the next strategies of the literature, added to the same runs.json and table
    nohup nice -n 15 .venv/bin/python scripts/annotation_budget.py --seeds 0 1 2 --budgets 0.01 0.02 0.05 \
        --strategies balanced mixed >> runs/annotation-budget/log.txt 2>&1 &
    # the table and the plot again from runs.json, nothing trained
    .venv/bin/python scripts/annotation_budget.py --report-only

On the hard synthetic benchmark (``jobs/synthetic_hard.yaml``) at ``--proportion`` known labels, per seed:

1. **Layout.** The benchmark's training and test images are written once as PNG files with their complete labels
   (``SyntheticShapes.write_to``) under ``<work-dir>/data``; per seed, a manifest ``M`` (``s<seed>/train.jsonl``)
   whose unknown entries are the benchmark's mask (``make_partial_labels`` with ``data.mask_seed`` = the seed, as
   ``sarl protocol`` draws it) and ``s<seed>/test.jsonl`` with the complete test labels. Every run trains with
   ``data.kind: manifest`` at ``known_proportion: 1`` (the manifest's unknown entries stay unknown, nothing else
   is masked), ``train.seed`` = the seed, so every arm of a seed has the same images, the same validation carve
   (``train_val_split``) and test set; only known entries differ.
2. **Baseline.** ``experiment.fit`` in this process (as ``sarl protocol --in-process``): test mAP of the epoch with
   the best validation mAP.
3. **What to ask.** The baseline scores the images of the training carve as ``sarl predict`` does
   (``predict.decode_batch`` and its ``Score`` stage, in this process), under the checkpoint's thresholds. The
   validation carve's images are left out of the pool, so validation stays the benchmark's. For each budget
   K = fraction x the pool's unknown entries, each strategy picks K unknown entries:
   ``margin``: the K closest to their threshold, written by ``complete.run_complete(suggest=K)`` (``sarl complete
   --suggest K``; its band set just under 0.5 so that every unknown entry is a candidate, which changes no
   pick whenever the default band holds K entries); ``random``: K uniformly at random (seeded; smaller budgets are
   prefixes of larger ones, as margin's are); ``balanced``: the margin rule per category, round-robin over the
   categories (K/C each); ``mixed``: K/2 by margin, the rest at random.
4. **Answers.** ``sarl annotate push`` (entries mode, local-files storage) into one project per (seed, strategy,
   K) of one Label Studio server started for the whole run; a scripted annotator answers every task from the
   ground truth with ``POST /api/tasks/{id}/annotations`` (present / absent); ``sarl annotate pull`` writes M2.
5. **Retrain** on M2 from scratch, same recipe and seed; gain = test mAP(M2) - test mAP(baseline).

Writes ``runs.json`` (after every run), ``table.md`` / ``table.csv`` and ``gain_vs_budget.png`` to
``--output-dir``; images, manifests, checkpoints and the server's data go under ``--work-dir`` (``runs/``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sarl.cli import main as sarl
from sarl.model.config import to_dict
from sarl.model.data import build_dataset, make_partial_labels, train_val_split
from sarl.model.data.manifest import ManifestRow, read_manifest, write_manifest
from sarl.model.experiment import fit
from sarl.platform.aliases import identify
from sarl.platform.annotate import ANSWER_CONTROL
from sarl.platform.complete import Scored, balanced_order, run_complete, write_suggestions
from sarl.platform.job import JobConfig, load_job
from sarl.platform.label_studio import TOKEN_ENV, LabelStudio, LabelStudioError
from sarl.platform.predict import Score, decode_batch
from sarl.platform.protocol import job_digest

STRATEGIES = ("margin", "random", "balanced", "mixed")
WIDE_BAND = 0.5 - 1e-9  # run_complete's band: every unknown entry is "unsure", so a candidate
SCORE_BATCH = 256


def log(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ------------------------------------------------------------------------------------------------ the data
@dataclass
class Layout:
    """The benchmark's images on disk: absolute paths and complete labels of both splits."""

    categories: list[str]
    train_paths: list[str]
    train_labels: np.ndarray  # (N, C) in {1, 0}
    test_paths: list[str]
    test_labels: np.ndarray


def write_split(job: JobConfig, split: str, folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """One split of the job's synthetic set as ``folder/images/*.png`` and ``folder/manifest.jsonl`` (complete
    labels), written once; the absolute paths, labels and categories."""
    d = job.data
    dataset = build_dataset(d.kind, d.root, split, **d.options)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file() or len(read_manifest(manifest)) != len(dataset):
        log(f"writing the {len(dataset)} {split} images to {folder}")
        dataset.write_to(folder)
    rows = read_manifest(manifest)
    paths = [str((folder / r.path).resolve()) for r in rows]
    return paths, dataset.labels.copy(), list(dataset.categories)


def check_same_pixels(job: JobConfig, layout: Layout, items: int = 8) -> None:
    """The PNG files give the tensors the synthetic data set gives (the arms train on what the benchmark trains)."""
    from sarl.model.data import build_transforms

    cfg = job.model_config()
    tf = build_transforms(cfg.image_size, cfg.mean, cfg.std, train=False)
    synthetic = build_dataset(job.data.kind, None, job.data.train_split, transform=tf, **job.data.options)
    files = build_dataset("manifest", None, "train", transform=tf, categories=layout.categories,
                          manifest=Path(layout.train_paths[0]).parents[1] / "manifest.jsonl")
    for i in range(items):
        if not torch.equal(synthetic[i][0], files[i][0]):
            raise SystemExit(f"image {i}: the PNG file does not give the synthetic set's pixels")


def lay_out(job: JobConfig, work: Path) -> Layout:
    train_paths, train_labels, categories = write_split(job, job.data.train_split, work / "data" / "train")
    test_paths, test_labels, _ = write_split(job, job.data.test_split, work / "data" / "test")
    layout = Layout(categories, train_paths, train_labels, test_paths, test_labels)
    check_same_pixels(job, layout)
    return layout


def write_rows(path: Path, paths: list[str], labels: np.ndarray, categories: list[str]) -> Path:
    return write_manifest(path, [ManifestRow(p, [c for c, v in zip(categories, row) if v == 1],
                                             [c for c, v in zip(categories, row) if v == -1])
                                 for p, row in zip(paths, labels)])


def seed_manifests(job: JobConfig, layout: Layout, seed_dir: Path, seed: int, proportion: float) -> np.ndarray:
    """``train.jsonl`` (M: the benchmark's mask for this seed) and ``test.jsonl``; returns M's labels."""
    partial = make_partial_labels(layout.train_labels, proportion, seed)
    write_rows(seed_dir / "train.jsonl", layout.train_paths, partial, layout.categories)
    write_rows(seed_dir / "test.jsonl", layout.test_paths, layout.test_labels, layout.categories)
    return partial


# ------------------------------------------------------------------------------------------------ training
def arm_job(base: dict[str, Any], seed_dir: Path, split: str, seed: int, categories: list[str],
            name: str) -> JobConfig:
    """The benchmark's job, reading ``seed_dir/<split>.jsonl`` and ``seed_dir/test.jsonl`` as they are."""
    base = {**base, "data": {k: v for k, v in base["data"].items() if k != "options"}}  # synthetic's options
    job = load_job(None, base=base, fixed={
        "data": {"kind": "manifest", "root": str(seed_dir), "train_split": split, "test_split": "test",
                 "categories": categories, "known_proportion": 1.0, "mask_seed": seed},
        "train": {"seed": seed, "test_every_epoch": True}})
    job.run.name = name
    return job


def train(job: JobConfig, run_dir: Path) -> dict[str, Any]:
    """``experiment.fit`` from scratch (a stale run folder, and its saved mask, removed first); its numbers."""
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    result = fit(job, run_dir, log=lambda line: log("  ", line))
    history = json.loads((run_dir / "history.json").read_text())
    return {"val_mAP": result["val_mAP"], "best_epoch": result["best_epoch"], "test_mAP": result["test"]["mAP"],
            "test_selected_mAP": result["test_selected_mAP"], "test_AP": result["test"]["AP"],
            "test_CF1": result["test"]["CF1"], "curve_val_mAP": [h["val_mAP"] for h in history],
            "curve_test_mAP": [h["test_mAP"] for h in history], "train_s": round(time.perf_counter() - started, 1),
            "checkpoint": os.path.relpath(run_dir / "best"), "job_digest": job_digest(job)}


# ------------------------------------------------------------------------------------------------ suggestions
def score_images(checkpoint: str, paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, float], str]:
    """``sarl predict``'s rows for ``paths`` (its decode and score stages, in this process), the thresholds and the
    model id."""
    identity, model_cfg, vocabulary = identify(checkpoint)
    scorer = Score(checkpoint, identity.resolved(), None, None, "cpu")
    rows = []
    for start in range(0, len(paths), SCORE_BATCH):
        batch = decode_batch({"path": np.array(paths[start:start + SCORE_BATCH], dtype=object)},
                             model_cfg.image_size, 10**8)
        out = scorer(batch)
        rows += [{"path": str(p), "scores": json.loads(s)} for p, e, s in zip(out["path"], out["error"], out["scores"])
                 if not e]
    if len(rows) != len(paths):
        raise SystemExit(f"{len(paths) - len(rows)} images could not be scored")
    thresholds = {c.name: c.threshold for c in vocabulary.categories if c.enabled}
    return rows, thresholds, identity.model_id


def unknown_entries(rows: list[dict[str, Any]], partial: np.ndarray, index: dict[str, int],
                    categories: list[str], thresholds: dict[str, float]) -> list[Scored]:
    """The pool: every unknown entry of the scored images, in (image, category) order."""
    return [Scored(r["path"], c, r["scores"][c], thresholds[c]) for r in rows
            for j, c in enumerate(categories) if partial[index[r["path"]], j] == -1]


def margin_suggestions(manifest: Path, rows: list[dict[str, Any]], thresholds: dict[str, float], k: int,
                       out: Path) -> list[tuple[str, str]]:
    """``sarl complete --suggest K``'s pick (``run_complete``), written to ``out``; its (path, category) pairs."""
    with redirect_stdout(io.StringIO()):
        counts = run_complete(str(manifest), rows, thresholds, str(out.with_name(out.stem + "-completed.jsonl")),
                              band=WIDE_BAND, suggest=k, suggest_output=str(out))
    if counts["suggested"] != k:
        raise SystemExit(f"run_complete suggested {counts['suggested']} entries, not {k}")
    with open(out, newline="") as fh:
        return [(r["path"], r["category"]) for r in csv.DictReader(fh)]


def random_order(pool: list[Scored], seed: int) -> list[Scored]:
    return [pool[i] for i in np.random.default_rng([seed, 19, 5]).permutation(len(pool))]


def pick(strategy: str, pool: list[Scored], k: int, seed: int, categories: list[str],
         margin_pairs: list[tuple[str, str]]) -> list[Scored]:
    """K entries of ``pool`` by ``strategy`` (``margin_pairs``: run_complete's pick, smallest margin first)."""
    by_key = {(e.path, e.category): e for e in pool}
    if strategy == "margin":
        return [by_key[p] for p in margin_pairs[:k]]
    if strategy == "random":
        return random_order(pool, seed)[:k]
    if strategy == "balanced":
        return balanced_order(pool, categories)[:k]  # sarl complete --suggest-by balanced
    if strategy == "mixed":
        first = [by_key[p] for p in margin_pairs[:k // 2]]
        taken = {(e.path, e.category) for e in first}
        return first + [e for e in random_order(pool, seed) if (e.path, e.category) not in taken][:k - len(first)]
    raise SystemExit(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")


# ------------------------------------------------------------------------------------------------ Label Studio
def label_studio_server() -> Any:
    """The tests' server module (tests/integration/label_studio_server.py): the same start from the migrated
    template, token and local-files serving, and the same stop by process group id."""
    path = Path(__file__).resolve().parents[1] / "tests" / "integration" / "label_studio_server.py"
    spec = importlib.util.spec_from_file_location("label_studio_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_sarl(*argv: str) -> None:
    """``sarl <argv>`` in this process; stops the experiment on a non-zero exit."""
    code = sarl(list(argv))
    if code != 0:
        raise SystemExit(f"sarl {' '.join(argv[:2])} exited with {code}")


def answer_tasks(client: LabelStudio, project: str, truth: np.ndarray, index: dict[str, int],
                 categories: list[str]) -> dict[str, int]:
    """The scripted annotator: every unanswered task of ``project`` answered present / absent from the ground
    truth through ``POST /api/tasks/{id}/annotations``, as the labelling UI submits; counts."""
    found = client.find_project(project)
    if found is None:
        raise SystemExit(f"no Label Studio project {project!r}")
    tasks = client.export(found["id"])
    counts = {"tasks": len(tasks), "present": 0, "absent": 0}
    for task in tqdm(tasks, desc=f"annotating {project}", leave=False, mininterval=5):
        data = task["data"]
        state = int(truth[index[data["path"]], categories.index(data["category"])])
        counts["present" if state == 1 else "absent"] += 1
        if task.get("annotations"):
            continue
        result = [{"from_name": ANSWER_CONTROL, "to_name": "image", "type": "choices",
                   "value": {"choices": ["present" if state == 1 else "absent"]}}]
        post_annotation(client, task["id"], result)
    return counts


def post_annotation(client: LabelStudio, task_id: int, result: list[dict[str, Any]], tries: int = 10) -> None:
    """One answer; a server that does not answer in time (a busy or paused machine) is asked again after a pause,
    unless the task got its annotation meanwhile."""
    for attempt in range(1, tries + 1):
        try:
            client.request("POST", f"/api/tasks/{task_id}/annotations", json={"result": result})
            return
        except LabelStudioError as exc:
            if attempt == tries:
                raise
            log(f"   task {task_id}: {exc}; again in 30 s ({attempt}/{tries})")
            time.sleep(30)
            try:
                if client.request("GET", f"/api/tasks/{task_id}").get("total_annotations"):
                    return
            except LabelStudioError:
                pass


def check_pulled(m2: Path, picked: list[Scored], before: np.ndarray, truth: np.ndarray, index: dict[str, int],
                 categories: list[str]) -> None:
    """M2 is M with exactly the picked entries known, each at its true value."""
    expected = before.copy()
    for e in picked:
        expected[index[e.path], categories.index(e.category)] = truth[index[e.path], categories.index(e.category)]
    got = np.zeros_like(expected)
    for i, row in enumerate(read_manifest(m2)):
        got[i] = [1 if c in row.labels else -1 if c in row.unknown else 0 for c in categories]
    if not np.array_equal(got, expected):
        raise SystemExit(f"{m2}: {int((got != expected).sum())} entries differ from M plus the true answers")


# ------------------------------------------------------------------------------------------------ the runs
RUNS_FILE = "runs.json"


def read_runs(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / RUNS_FILE
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def write_runs(output_dir: Path, runs: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = sorted(runs, key=lambda r: (r["seed"], r["budget"], STRATEGIES.index(r["strategy"])
                                       if r["strategy"] in STRATEGIES else -1))
    tmp = output_dir / f".{RUNS_FILE}.tmp"
    tmp.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    tmp.replace(output_dir / RUNS_FILE)


def key(r: dict[str, Any]) -> tuple[int, str, float]:
    return r["seed"], r["strategy"], r["budget"]


class Experiment:
    """The whole run: the layout, one Label Studio server, the runs recorded after each training."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work_dir).resolve()
        self.output = Path(args.output_dir)
        self.benchmark = load_job(args.config, args.overrides, fixed={"data": {"known_proportion": args.proportion}})
        self.base = to_dict(self.benchmark)
        self.runs = {key(r): r for r in read_runs(self.output)}
        self.server: Any = None  # label_studio_server.Server
        self.client: LabelStudio | None = None
        self.meta = {"config": args.config, "proportion": args.proportion, "machine": machine(),
                     "torch_threads": torch.get_num_threads()}

    def save(self) -> None:
        write_runs(self.output, list(self.runs.values()), self.meta)

    def label_studio(self) -> LabelStudio:
        if self.client is None:
            self.server = label_studio_server().Server(self.work, Path(self.args.label_studio_venv).resolve())
            log(f"Label Studio starting at {self.server.url} (pid {self.server.process.pid})")
            handle = self.server.wait()
            os.environ[TOKEN_ENV] = handle.token  # what sarl annotate reads
            self.client = LabelStudio(handle.url)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()

    def run(self) -> None:
        layout = lay_out(self.benchmark, self.work)
        for seed in self.args.seeds:
            self.run_seed(layout, seed)

    def wanted(self, seed: int) -> list[tuple[str, float]]:
        return [(s, b) for b in self.args.budgets for s in self.args.strategies if (seed, s, b) not in self.runs]

    def run_seed(self, layout: Layout, seed: int) -> None:
        seed_dir = self.work / f"s{seed}"
        partial = seed_manifests(self.benchmark, layout, seed_dir, seed, self.args.proportion)
        index = {p: i for i, p in enumerate(layout.train_paths)}
        cats = layout.categories
        baseline = self.runs.get((seed, "none", 0.0))
        base_job = arm_job(self.base, seed_dir, "train", seed, cats, f"budget-s{seed}-baseline")
        if baseline is None or baseline["job_digest"] != job_digest(base_job) \
                or not Path(baseline["checkpoint"], "weights.pt").is_file():
            log(f"== seed {seed}: baseline (M: {int((partial == -1).sum())} unknown entries)")
            baseline = {"seed": seed, "strategy": "none", "budget": 0.0, "k": 0,
                        **train(base_job, self.work / "ckpt" / base_job.run_name)}
            self.runs[key(baseline)] = baseline
            self.save()
            log(f"   baseline seed {seed}: test mAP {baseline['test_mAP']:.2f} (epoch {baseline['best_epoch']})")
        todo = self.wanted(seed)
        if not todo:
            log(f"== seed {seed}: every run is in {self.output / RUNS_FILE}")
            return
        train_idx, _ = train_val_split(len(layout.train_paths), self.benchmark.data.val_fraction,
                                       self.benchmark.data.split_seed)
        pool_paths = [layout.train_paths[i] for i in train_idx]
        rows, thresholds, model_id = score_images(baseline["checkpoint"], pool_paths)
        pool = unknown_entries(rows, partial, index, cats, thresholds)
        in_band = sum(e.margin < 0.15 for e in pool)
        log(f"== seed {seed}: pool of {len(pool)} unknown entries on {len(pool_paths)} training images "
            f"({in_band} within sarl complete's default band of 0.15)")
        ks = {b: round(b * len(pool)) for b in self.args.budgets}
        margin_pairs = margin_suggestions(seed_dir / "train.jsonl", rows, thresholds, max(ks.values()),
                                          seed_dir / "margin-suggest.csv")
        for strategy, budget in todo:
            self.run_arm(layout, seed, seed_dir, partial, index, pool, margin_pairs, strategy, budget, ks[budget],
                         model_id)

    def run_arm(self, layout: Layout, seed: int, seed_dir: Path, partial: np.ndarray, index: dict[str, int],
                pool: list[Scored], margin_pairs: list[tuple[str, str]], strategy: str, budget: float, k: int,
                model_id: str) -> None:
        cats = layout.categories
        arm = f"{strategy}-k{budget * 100:g}"
        log(f"== seed {seed}: {strategy}, K = {k} ({budget:.0%} of the pool)")
        picked = pick(strategy, pool, k, seed, cats, margin_pairs)
        if len({(e.path, e.category) for e in picked}) != k:
            raise SystemExit(f"{arm}: {len(picked)} picks, {k} wanted")
        suggestions = write_suggestions(str(seed_dir / f"{arm}-suggest.csv"), picked)
        client, project = self.label_studio(), f"budget s{seed} {arm}"
        url = self.server.url
        t0 = time.perf_counter()
        run_sarl("annotate", "push", "--label-studio", url, "--project", project, "--suggestions", str(suggestions),
                 "--manifest", str(seed_dir / "train.jsonl"), "--document-root", str(self.work),
                 "--model-version", model_id)
        t1 = time.perf_counter()
        answered = answer_tasks(client, project, layout.train_labels, index, cats)
        t2 = time.perf_counter()
        m2 = seed_dir / f"{arm}.jsonl"
        run_sarl("annotate", "pull", "--label-studio", url, "--project", project, "--manifest",
                 str(seed_dir / "train.jsonl"), "--output", str(m2))
        t3 = time.perf_counter()
        if answered["tasks"] != k:
            raise SystemExit(f"project {project!r} holds {answered['tasks']} tasks, not {k}")
        check_pulled(m2, picked, partial, layout.train_labels, index, cats)
        job = arm_job(self.base, seed_dir, arm, seed, cats, f"budget-s{seed}-{arm}")
        record = {"seed": seed, "strategy": strategy, "budget": budget, "k": k,
                  "asked_present": answered["present"], "asked_categories": len({e.category for e in picked}),
                  "asked_mean_margin": round(statistics.fmean(e.margin for e in picked), 4),
                  "push_s": round(t1 - t0, 1), "annotate_s": round(t2 - t1, 1), "pull_s": round(t3 - t2, 1),
                  **train(job, self.work / "ckpt" / job.run.name)}
        base = self.runs[(seed, "none", 0.0)]["test_mAP"]
        record["gain"] = record["test_mAP"] - base
        self.runs[key(record)] = record
        self.save()
        log(f"   {arm} seed {seed}: test mAP {record['test_mAP']:.2f}, gain {record['gain']:+.2f} "
            f"({answered['present']} of {k} answers present)")


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() \
        else platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------ the report
def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# What a run's test mAP is taken at: the epoch validation selects (primary, as the protocol reports), and the last
# epoch (no selection: validation has 120 images at 10% known labels, and its choice of epoch is noisy).
SELECTIONS = {"val": ("validation-selected", lambda r: r["test_mAP"]),
              "last": ("last epoch", lambda r: r["curve_test_mAP"][-1])}


def report(output_dir: Path) -> str:
    """``table.md``, ``table.csv`` and ``gain_vs_budget.png`` from ``runs.json``; the markdown."""
    runs = read_runs(output_dir)
    baselines = {r["seed"]: r for r in runs if r["strategy"] == "none"}
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in runs)]
    budgets = sorted({r["budget"] for r in runs if r["strategy"] != "none"})
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        if r["strategy"] != "none" and r["seed"] in baselines:
            cells.setdefault((r["strategy"], r["budget"]), []).append(r)
    n_seeds = len(baselines)
    header = ["| strategy | " + " | ".join(f"K = {b:.0%}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    rows_csv = [["selection", "strategy", "budget", "k_mean", "seeds", "gain_mean", "gain_sd", "mAP_mean", "mAP_sd",
                 "per_seed_gain"]]
    lines = []
    for sel, (title, value) in SELECTIONS.items():
        base = [value(r) for r in baselines.values()]
        seeds = ", ".join(map(str, sorted(baselines)))
        lines += [f"Test mAP gain over no annotation, {title}, mean ± sd over seeds {seeds} (baseline "
                  "{:.2f} ± {:.2f}):".format(*mean_sd(base)),
                  "", *header]
        for s in strategies:
            row = []
            for b in budgets:
                group = sorted(cells.get((s, b), []), key=lambda r: r["seed"])
                gains = [value(r) - value(baselines[r["seed"]]) for r in group]
                if not group:
                    row.append("")
                    continue
                g, m = mean_sd(gains), mean_sd([value(r) for r in group])
                row.append("{:+.2f} ± {:.2f}".format(*g) + (f" ({len(group)} seeds)" if len(group) != n_seeds else ""))
                rows_csv.append([sel, s, b, f"{statistics.fmean(r['k'] for r in group):.0f}", len(group),
                                 f"{g[0]:.2f}", f"{g[1]:.2f}", f"{m[0]:.2f}", f"{m[1]:.2f}",
                                 ";".join(f"{r['seed']}:{x:+.2f}" for r, x in zip(group, gains))])
            lines.append(f"| {s} | " + " | ".join(row) + " |")
        lines += ["", f"Test mAP, {title}, mean ± sd over seeds:", "", *header,
                  "| none | " + " | ".join(["{:.2f} ± {:.2f}".format(*mean_sd(base))] * len(budgets)) + " |"]
        for s in strategies:
            lines.append(f"| {s} | " + " | ".join("{:.2f} ± {:.2f}".format(*mean_sd([value(r) for r in cells[s, b]]))
                                                  if cells.get((s, b)) else "" for b in budgets) + " |")
        if "random" in strategies and len(strategies) > 1:
            lines += ["", f"Paired against random (same seed and K), {title}: mean ± sd of the difference in test mAP, "
                      "and the seeds where the strategy was ahead:", "", *header]
            for s in [s for s in strategies if s != "random"]:
                row = []
                for b in budgets:
                    pairs = [(r["seed"], value(r) - value(q)) for r in cells.get((s, b), [])
                             for q in cells.get(("random", b), []) if q["seed"] == r["seed"]]
                    row.append("{:+.2f} ± {:.2f}, {} of {}".format(*mean_sd([d for _, d in pairs]),
                                                                     sum(d > 0 for _, d in pairs), len(pairs))
                               if pairs else "")
                lines.append(f"| {s} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["What was asked (mean over seeds): entries, of which present, and their mean margin |p - threshold|:",
              "", *header]
    for s in strategies:
        lines.append(f"| {s} | " + " | ".join(
            f"{statistics.fmean(r['k'] for r in cells[s, b]):.0f}, "
            f"{statistics.fmean(r['asked_present'] for r in cells[s, b]):.0f} present, "
            f"margin {statistics.fmean(r['asked_mean_margin'] for r in cells[s, b]):.3f}" if cells.get((s, b)) else ""
            for b in budgets) + " |")
    markdown = "\n".join(lines) + "\n"
    (output_dir / "table.md").write_text(markdown)
    with open(output_dir / "table.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows_csv)
    plot(output_dir / "gain_vs_budget.png", strategies, budgets, cells, baselines)
    return markdown


def plot(path: Path, strategies: list[str], budgets: list[float], cells: dict[tuple[str, float], list[dict]],
         baselines: dict[int, dict[str, Any]]) -> None:
    """Gain against budget, one line per strategy with sd error bars; one panel per selection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SELECTIONS), figsize=(12, 4.5), sharey=True, squeeze=False)
    for ax, (title, value) in zip(axes[0], SELECTIONS.values()):
        for i, s in enumerate(strategies):
            xs = [b for b in budgets if cells.get((s, b))]
            stats = [mean_sd([value(r) - value(baselines[r["seed"]]) for r in cells[s, b]]) for b in xs]
            offset = (i - (len(strategies) - 1) / 2) * 0.08  # side by side: the error bars do not hide each other
            ax.errorbar([100 * b + offset for b in xs], [m for m, _ in stats], yerr=[sd for _, sd in stats],
                        marker="o", capsize=4, label=s)
        ax.axhline(0, color="grey", lw=1, ls="--")
        ax.set_xticks([100 * b for b in budgets], [f"{b:.0%}" for b in budgets])
        ax.set_xlabel("budget K (share of the training images' unknown entries)")
        ax.set_title(f"test mAP {title}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test mAP gain over no annotation (points)")
    axes[0][0].legend()
    fig.suptitle(f"Hard synthetic benchmark, 10% known labels: gain against annotation budget "
                 f"({len(baselines)} seed(s), mean ± sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/synthetic_hard.yaml", help="the benchmark's job")
    parser.add_argument("--proportion", type=float, default=0.1, help="known-label proportion of M")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02, 0.05],
                        help="K as a share of the training carve's unknown entries")
    parser.add_argument("--strategies", nargs="+", default=["margin", "random"], choices=STRATEGIES)
    parser.add_argument("--work-dir", default="runs/annotation-budget", help="images, manifests, checkpoints")
    parser.add_argument("--output-dir", default="docs/results/annotation-budget", help="runs.json, table, plot")
    parser.add_argument("--label-studio-venv", default=".venv-ls", help="where label-studio is installed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one training at a time)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the job (e.g. train.epochs=1 for a smoke "
                                                      "test, with another --work-dir and --output-dir)")
    parser.add_argument("--report-only", action="store_true", help="the table and plot from runs.json only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.report_only:
        torch.set_num_threads(args.threads)
        experiment = Experiment(args)
        started = time.perf_counter()
        try:
            experiment.run()
        finally:
            experiment.close()
        log(f"done in {time.perf_counter() - started:.0f} s")
    print(report(Path(args.output_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
