"""The ``sarl`` command: ``sarl demo | train | evaluate | export | protocol | tune | serve | predict | calibrate |
complete | vocab``.

Each subcommand is a small function over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..model.config import ConfigError
from ..platform.protocol import DEFAULT_PROPORTIONS
from ..platform.storage import StorageError
from .vocab import add_vocab_parser


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
    result = run_sweep(sweep, job, args.address)
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


def _predict(args: argparse.Namespace) -> int:
    import dataclasses

    from ..platform.predict import PredictConfig, PredictError, run_predict

    args = _with_config(args, {}, ("checkpoint", "input", "output"))
    if args is None:
        return 2
    fields = {f.name for f in dataclasses.fields(PredictConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    try:
        summary = run_predict(PredictConfig(**options))
    except PredictError as exc:
        print(f"sarl predict: {exc}", file=sys.stderr)
        return 2
    run = summary["this_run"]
    print(f"{summary['images']} images: {summary['written']} rows, {summary['errors']} unreadable "
          f"({summary['skipped_already_written']} were already done); this run scored {run['scored']} and found "
          f"{run['errors']} unreadable in {run['seconds']:.1f} s ({run['images_per_s'] or 0:.1f} images/s). "
          f"Model {summary['model']['id']}, vocabulary {summary['vocabulary_version']}; written to "
          f"{summary['output']}", flush=True)
    return 0


def _with_config(args: argparse.Namespace, defaults: dict, required: tuple[str, ...]) -> argparse.Namespace | None:
    """``args`` with the values of ``--config`` (a YAML of option names) where no flag was given, then
    ``defaults``; None (after saying why) when a required option is missing or the file has unknown keys."""
    import yaml

    options = yaml.safe_load(open(args.config)) if args.config else {}
    options = {k.replace("-", "_"): v for k, v in (options or {}).items()}
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        print(f"sarl {args.command}: unknown keys in {args.config}: {', '.join(unknown)}", file=sys.stderr)
        return None
    for key, value in {**defaults, **options}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    missing = [k for k in required if not getattr(args, k, None)]
    if missing:
        print(f"sarl {args.command}: give {', '.join('--' + k.replace('_', '-') for k in missing)} (or a --config "
              "with them)", file=sys.stderr)
        return None
    return args


def _calibrate(args: argparse.Namespace) -> int:
    from ..platform.complete import DEFAULT_MIN_POSITIVES, run_calibrate

    args = _with_config(args, {"min_positives": DEFAULT_MIN_POSITIVES, "no_current": False, "data": [],
                               "out_of_fold": False, "workers": 1},
                        ("checkpoint", "vocab_store"))
    if args is None:
        return 2

    out = run_calibrate(args.checkpoint, args.vocab_store, args.data, args.version, args.min_positives,
                        make_current=not args.no_current, out_of_fold=args.out_of_fold, workers=args.workers,
                        address=args.address)
    for c in out["categories"]:
        how = "calibrated" if c["calibrated"] else f"global ({c['reason']})"
        print(f"  {c['name']:<24} threshold {c['threshold']:.3f}  {how}, {c['val_positives']} known positives on val")
    before, after = out["test"]["before"], out["test"]["after"]
    print(f"test CF1 {before['CF1']:.2f} -> {after['CF1']:.2f}, OF1 {before['OF1']:.2f} -> {after['OF1']:.2f} "
          f"(0.5 -> calibrated); pushed version {out['version']}"
          f"{' (current)' if out['current'] else ' (not current: release with sarl vocab rollback)'}")
    return 0


def _complete(args: argparse.Namespace) -> int:
    import json

    from ..platform import storage
    from ..platform.complete import DEFAULT_BAND, run_complete
    from ..platform.predict import PredictConfig, read_rows, run_predict

    args = _with_config(args, {"band": DEFAULT_BAND, "suggest": 0}, ("checkpoint", "manifest", "output"))
    if args is None:
        return 2

    predictions = args.predictions or f"{args.output}.predictions"
    summary = run_predict(PredictConfig(checkpoint=args.checkpoint, input=args.manifest, output=predictions,
                                        vocab_store=args.vocab_store, vocab_version=args.vocab_version,
                                        format="jsonl", address=args.address))
    rows = read_rows(predictions, "jsonl")
    thresholds = json.loads(storage.read_text(storage.join(predictions, "thresholds.json")))
    counts = run_complete(args.manifest, rows, thresholds, args.output, args.band, args.suggest)
    print(f"{counts['images']} images ({summary['errors']} unreadable): of {counts['unknown_before']} unknown "
          f"entries, {counts['predicted_present']} predicted present, {counts['predicted_absent']} absent, "
          f"{counts['still_unknown']} still unknown (within {args.band} of the threshold); annotated entries "
          f"unchanged. Written: {counts['output']}"
          + (f"; the {counts['suggested']} to annotate next: {counts['suggest_file']}" if args.suggest else ""))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ..platform.serve import ServeConfig, read_serve_config, serve_forever, with_gpus

    config = read_serve_config(args.config) if args.config else ServeConfig({"host": "127.0.0.1", "port": 8000}, {}, {})
    flags = {"checkpoint": args.checkpoint, "vocab_store": args.vocab_store, "word_vectors": args.word_vectors}
    app_args = {**config.args, **{k: v for k, v in flags.items() if v}}
    if "checkpoint" not in app_args:
        print("sarl serve: give --checkpoint (or a --config whose args name one)", file=sys.stderr)
        return 2
    config.http_options.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    if args.gpus is not None:
        config = with_gpus(config, args.gpus)
        app_args["device"] = config.args["device"]
    serve_forever(app_args, config, args.address)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarl", description="SARL: multi-label recognition with partial labels")
    sub = parser.add_subparsers(dest="command", required=True)
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
    tune.add_argument("overrides", nargs="*", help="key=value overrides of the sweep, e.g. num_samples=16")
    tune.set_defaults(func=_tune)

    serve = sub.add_parser("serve", help="HTTP prediction on Ray Serve, following a vocabulary store")
    serve.add_argument("--checkpoint", help="checkpoint directory, s3:// URI, or alias file (<run>/aliases/best.json)")
    serve.add_argument("--vocab-store", help="vocabulary store (directory or s3://); default: the checkpoint's")
    serve.add_argument("--word-vectors", help="word vectors for zero-shot categories of word-vector models")
    serve.add_argument("--config", help="Serve config file (serve_configs/*.yaml) for deployment settings")
    serve.add_argument("--host", help="HTTP host (default 127.0.0.1, or the config's)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000, or the config's)")
    serve.add_argument("--gpus", type=float, help="GPUs per replica (0: CPU); default: the config's")
    serve.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    serve.set_defaults(func=_serve)

    predict = sub.add_parser("predict", help="label a collection on Ray Data (resumable; the scores Serve gives)")
    predict.add_argument("--config", help="YAML with any of the options below (flags override it)")
    predict.add_argument("--checkpoint", help="checkpoint directory, s3:// URI, or alias file")
    predict.add_argument("--input", help="image folder, s3:// prefix, or a .jsonl/.csv manifest")
    predict.add_argument("--output", help="output folder or s3:// prefix (shards, errors, summary.json)")
    predict.add_argument("--vocab-store", help="score under a vocabulary store's version (default: the checkpoint's)")
    predict.add_argument("--vocab-version", help="that version (default: the store's current one)")
    predict.add_argument("--format", choices=["parquet", "jsonl"])
    predict.add_argument("--batch-size", type=int, help="images per forward in a scoring actor (default 32)")
    predict.add_argument("--actors", type=int, help="scoring actors, each with the model loaded once (default 1)")
    predict.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    predict.add_argument("--cpus-per-actor", type=float, help="default: 1 on CPU actors, 0 beside a GPU")
    predict.add_argument("--decode-cpus", type=float, help="CPUs per decode task (default 1)")
    predict.add_argument("--shard-size", type=int, help="rows per output file (default 1000)")
    predict.add_argument("--overwrite", action="store_true", default=None, help="delete earlier output first")
    predict.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    predict.set_defaults(func=_predict)

    calibrate = sub.add_parser("calibrate", help="per-category thresholds from the validation split, pushed as a "
                                                 "new vocabulary version")
    calibrate.add_argument("--config", help="YAML with any of the options below (flags override it)")
    calibrate.add_argument("--checkpoint", help="checkpoint directory or s3:// URI")
    calibrate.add_argument("--vocab-store", help="store to push the calibrated version to")
    calibrate.add_argument("--version", help="the new version's name (default: <current>-calibrated)")
    calibrate.add_argument("--min-positives", type=int,
                           help="known positives on val below which a category keeps the global threshold")
    calibrate.add_argument("--no-current", action="store_true", default=None,
                           help="push without moving the current pointer")
    calibrate.add_argument("--out-of-fold", action="store_true", default=None,
                           help="keep a threshold only if one picked on half of val does not lose on the other half")
    calibrate.add_argument("--data", nargs="*", metavar="KEY=VALUE",
                           help="job overrides for the data, e.g. data.root=/data/voc")
    calibrate.add_argument("--workers", type=int, help="score the splits as N Ray tasks (as sarl evaluate does)")
    calibrate.add_argument("--address", help="Ray cluster to score on (default: $RAY_ADDRESS; with neither, "
                           "--workers 1 scores in this process)")
    calibrate.set_defaults(func=_calibrate)

    complete = sub.add_parser("complete", help="fill the unknown entries of a manifest from predictions; "
                                               "--suggest N: what to annotate next")
    complete.add_argument("--config", help="YAML with any of the options below (flags override it)")
    complete.add_argument("--checkpoint", help="checkpoint directory, s3:// URI, or alias file")
    complete.add_argument("--manifest", help=".jsonl/.csv manifest with 'unknown' lists")
    complete.add_argument("--output", help="the completed manifest (.jsonl)")
    complete.add_argument("--vocab-store", help="thresholds and names from this store's version")
    complete.add_argument("--vocab-version", help="that version (default: current)")
    complete.add_argument("--band", type=float, help="unsure within threshold +- band: stays unknown (0.15)")
    complete.add_argument("--suggest", type=int, metavar="N", help="write the N most uncertain entries")
    complete.add_argument("--predictions", help="where the predictions go (default: <output>.predictions/)")
    complete.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    complete.set_defaults(func=_complete)

    add_vocab_parser(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, but ``key=value`` overrides may also come after flags (``train --json a=b``).

    argparse matches a ``nargs="*"`` positional once, before the first flag, and refuses what follows the flags;
    those are added to ``overrides`` here (``parse_intermixed_args`` does not support subcommands).
    """
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"sarl {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, StorageError) as exc:
        print(f"sarl {args.command}: {exc}", file=sys.stderr)
        return 2

