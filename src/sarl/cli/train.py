"""``sarl demo | train | evaluate | export | protocol | tune``: training runs and what is measured on them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..model.config import ConfigError
from ..platform.protocol import DEFAULT_PROPORTIONS


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.output_dir, args.overrides, serve=not args.no_serve)
    return 0


def _train(args: argparse.Namespace) -> int:
    from ..platform.job import load_job
    from ..platform.train import run_training

    job = load_job(args.config, args.overrides)
    if args.address:
        job.address = args.address
    result = run_training(job)
    metrics = result["metrics"]
    print(f"best checkpoint: {result['checkpoint']}\nvalidation mAP: {metrics['val_mAP']:.2f} "
          f"(epoch {metrics['epoch']})")
    if args.json:
        print(json.dumps({"checkpoint": result["checkpoint"], "metrics": metrics}, default=float))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ..platform.evaluate import evaluate_checkpoint, format_metrics

    result = evaluate_checkpoint(args.checkpoint, args.split, args.data, args.workers, args.output_dir,
                                 args.address)
    print(format_metrics(result))
    if args.output_dir:
        print(f"written: {args.output_dir}/metrics.json, per_class_ap.csv, per_class_ap.png")
    if args.json:
        keep = ("checkpoint", "split", "mAP", "CF1", "OF1", "CF1_top3", "OF1_top3", "AP", "categories")
        print(json.dumps({k: result[k] for k in keep}, default=float))
    return 0


def _export(args: argparse.Namespace) -> int:
    import tempfile

    from ..model.checkpoint import CheckpointError, export_checkpoint
    from ..platform import node_cache, storage

    try:
        if storage.is_s3(args.output):
            with tempfile.TemporaryDirectory() as tmp:
                export_checkpoint(node_cache.local_copy(args.checkpoint), Path(tmp) / "export", args.pretrained,
                                  resolve=node_cache.local_copy)
                storage.upload_dir(Path(tmp) / "export", args.output)
        else:
            export_checkpoint(node_cache.local_copy(args.checkpoint), args.output, args.pretrained,
                              resolve=node_cache.local_copy)
    except CheckpointError as exc:
        print(f"sarl export: {exc}", file=sys.stderr)
        return 2
    print(f"self-contained checkpoint: {args.output}")
    return 0


def _protocol(args: argparse.Namespace) -> int:
    from ..platform.protocol import merge_protocol, run_protocol

    if args.merge:
        if args.overrides or args.config:
            raise ConfigError("--merge reports runs already made; it takes no --config or key=value overrides")
        merge_protocol(args.merge, args.output_dir)
    else:
        run_protocol(args.config, args.methods, args.proportions, args.output_dir, args.overrides,
                     seeds=args.seeds, in_process=args.in_process)
    print((Path(args.output_dir) / "table.md").read_text())  # run_protocol wrote it
    print(f"written: {args.output_dir}/table.md, table.csv, map_vs_proportion.png, curves.png, runs.json")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from ..platform.tune import load_sweep, run_sweep

    sweep, job = load_sweep(args.config, args.overrides)
    result = run_sweep(sweep, job, args.address, resume=args.resume)
    out = Path(result["output_dir"])
    print((out / "trials.md").read_text())
    best = result["best"]
    if best is None:
        print("no trial reported a metric; see the trial errors above", file=sys.stderr)
        return 1
    print(f"best: trial {best['trial_id']}, {sweep.metric} {best['best']:.2f}\n"
          f"written: {out}/trials.csv, trials.md, best_job.yaml, val_map_per_trial.png\n"
          f"train the best configuration: sarl train --config {out}/best_job.yaml")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="train tiny SARL and the CLIP global baseline on generated data, then serve it")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--no-serve", action="store_true", help="stop after training (skip the Ray Serve part)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="data-parallel training on Ray Train (local cluster or RAY_ADDRESS)")
    train.add_argument("--config", help="job YAML (jobs/*.yaml); defaults apply to everything it leaves out")
    train.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    train.add_argument("--json", action="store_true", help="end with one JSON line: checkpoint and metrics")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. scaling.num_workers=4")
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("evaluate", help="metrics, CSV/JSON and a per-class AP plot for a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint directory or s3:// URI")
    evaluate.add_argument("--split", default="val", choices=("val", "test"))
    evaluate.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                          help="override the checkpoint's job, e.g. data.root=/data/voc data.test_split=test")
    evaluate.add_argument("--workers", type=int, default=1,
                          help="score N disjoint shards as N Ray tasks, each with one training worker's resources")
    evaluate.add_argument("--output-dir", help="where to write metrics.json, per_class_ap.csv and .png")
    evaluate.add_argument("--address", help="Ray cluster to evaluate on (default: $RAY_ADDRESS; with neither, "
                          "--workers 1 scores in this process and --workers N starts a local cluster)")
    evaluate.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    evaluate.set_defaults(func=_evaluate)

    export = sub.add_parser("export", help="a self-contained copy of a checkpoint (frozen backbone included), for "
                            "serving where its weights source cannot be reached")
    export.add_argument("--checkpoint", required=True, help="checkpoint directory or s3:// URI")
    export.add_argument("--output", required=True, help="directory (or s3:// URI) to write the copy to")
    export.add_argument("--pretrained", help="the backbone's weights source, instead of the recorded one")
    export.set_defaults(func=_export)

    protocol = sub.add_parser("protocol", help="train and test methods over known-label proportions: the paper table")
    protocol.add_argument("--config", help="job YAML every run starts from")
    protocol.add_argument("--methods", nargs="+", default=["sarl", "global"],
                          help="presets (sarl, global, dualcoop) or name:key=value,key=value")
    protocol.add_argument("--proportions", nargs="+", type=float, default=list(DEFAULT_PROPORTIONS))
    protocol.add_argument("--seeds", nargs="+", type=int, default=[0],
                          help="training and mask seeds; the table gives mean and standard deviation over them")
    protocol.add_argument("--in-process", action="store_true",
                          help="train each run in this process, without Ray (small jobs; scaling is ignored)")
    protocol.add_argument("--output-dir", default="runs/protocol",
                          help="where the table, plots and runs.json go; a rerun skips the runs it already holds")
    protocol.add_argument("--merge", nargs="+", metavar="DIR",
                          help="no training: one table from the runs.json of protocols run apart (seeds, machines)")
    protocol.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    protocol.set_defaults(func=_protocol)

    tune = sub.add_parser("tune", help="sweep losses and fusion settings on Ray Tune (one TorchTrainer per trial)")
    tune.add_argument("--config", required=True, help="sweep YAML (jobs/sweep_*.yaml)")
    tune.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    tune.add_argument("--resume", action="store_true",
                      help="continue the sweep of this name in its storage_path, if it is the same sweep (Tune "
                           "loads its pickled state from there: resume only a sweep whose storage you trust)")
    tune.add_argument("overrides", nargs="*", help="key=value overrides of the sweep, e.g. num_samples=16")
    tune.set_defaults(func=_tune)
