"""``sarl predict | calibrate | complete``: label a collection, calibrate the thresholds, fill a manifest's gaps.

Each takes its options as flags or from a ``--config`` YAML of the same keys (``jobs/predict.yaml``, ...); both
are one section (``PredictConfig``, ``CalibrateConfig``, ``CompleteConfig``), flags winning over the file.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..platform.complete import CalibrateConfig, CompleteConfig
from ..platform.predict import PredictConfig
from .options import add_section_flags, load_command

CONFIG_HELP = "YAML with any of the options below (flags override it)"


def _predict(args: argparse.Namespace) -> int:
    from ..platform.predict import PredictError, run_predict

    config = load_command(PredictConfig, args, ("checkpoint", "input", "output", "vocab_store"))
    try:
        summary = run_predict(config)
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


def _calibrate(args: argparse.Namespace) -> int:
    from ..platform.complete import run_calibrate

    config = load_command(CalibrateConfig, args, ("checkpoint", "vocab_store"))
    out = run_calibrate(config.checkpoint, config.vocab_store, config.data, config.version, config.min_positives,
                        make_current=not config.no_current, out_of_fold=config.out_of_fold, workers=config.workers,
                        address=config.address)
    for c in out["categories"]:
        how = "calibrated" if c["calibrated"] else f"global ({c['reason']})"
        print(f"  {c['name']:<24} threshold {c['threshold']:.3f}  {how}, {c['val_positives']} known positives on val")
    before, after = out["test"]["before"], out["test"]["after"]
    print(f"test CF1 {before['CF1']:.2f} -> {after['CF1']:.2f}, OF1 {before['OF1']:.2f} -> {after['OF1']:.2f} "
          f"(0.5 -> calibrated); pushed version {out['version']}"
          f"{' (current)' if out['current'] else ' (not current: release with sarl vocab rollback)'}")
    return 0


def _complete(args: argparse.Namespace) -> int:
    from ..platform import storage
    from ..platform.complete import CompleteError, run_complete
    from ..platform.predict import read_rows, run_predict

    config = load_command(CompleteConfig, args, ("checkpoint", "manifest", "output", "vocab_store", "predictions"))
    predictions = config.predictions or f"{config.output}.predictions"
    summary = run_predict(PredictConfig(checkpoint=config.checkpoint, input=config.manifest, output=predictions,
                                        vocab_store=config.vocab_store, vocab_version=config.vocab_version,
                                        format="jsonl", address=config.address))
    rows = read_rows(predictions, "jsonl")
    thresholds = json.loads(storage.read_text(storage.join(predictions, "thresholds.json")))
    try:
        counts = run_complete(config.manifest, rows, thresholds, config.output, config.band, config.suggest,
                              suggest_by=config.suggest_by)
    except CompleteError as exc:
        print(f"sarl complete: {exc}", file=sys.stderr)
        return 2
    print(f"{counts['images']} images ({summary['errors']} unreadable): of {counts['unknown_before']} unknown "
          f"entries, {counts['predicted_present']} predicted present, {counts['predicted_absent']} absent, "
          f"{counts['still_unknown']} still unknown (within {config.band} of the threshold); annotated entries "
          f"unchanged. Written: {counts['output']}"
          + (f"; the {counts['suggested']} to annotate next: {counts['suggest_file']}" if config.suggest else ""))
    if counts["unscored"]:  # unreadable images, or rows the predictions do not name
        print(f"sarl complete: {counts['unscored']} of {counts['images']} images have no prediction; their unknown "
              f"entries stay unknown (unreadable ones: {predictions}/errors-*.jsonl)", file=sys.stderr)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="label a collection on Ray Data (resumable; the scores Serve gives)")
    predict.add_argument("--config", help=CONFIG_HELP)
    add_section_flags(predict, PredictConfig, skip=("max_image_pixels",))
    predict.set_defaults(func=_predict)

    calibrate = sub.add_parser("calibrate", help="per-category thresholds from the validation split, pushed as a "
                                                 "new vocabulary version")
    calibrate.add_argument("--config", help=CONFIG_HELP)
    add_section_flags(calibrate, CalibrateConfig)
    calibrate.set_defaults(func=_calibrate)

    complete = sub.add_parser("complete", help="fill the unknown entries of a manifest from predictions; "
                                               "--suggest N: what to annotate next")
    complete.add_argument("--config", help=CONFIG_HELP)
    add_section_flags(complete, CompleteConfig)
    complete.set_defaults(func=_complete)
