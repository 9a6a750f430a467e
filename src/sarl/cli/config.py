"""``sarl config schema KIND``: the JSON schema of a configuration file or section, for editors and CI checks.

Kinds: ``job`` (``jobs/*.yaml``), ``sweep`` (``jobs/sweep_*.yaml``), ``model`` (a job's ``model`` section beyond
its ``name``), ``serve-args`` and ``user-config`` (the ``args`` and ``user_config`` of the app in a Serve config
file), ``predict``, ``calibrate``, ``complete``, ``annotate-push``, ``annotate-pull`` (those commands'
``--config`` files).
"""

from __future__ import annotations

import argparse
import importlib
import json

from ..model.config import json_schema

SECTIONS = {
    "job": "sarl.platform.job:JobConfig",
    "sweep": "sarl.platform.tune:SweepConfig",
    "model": "sarl.model.model_config:ModelConfig",
    "serve-args": "sarl.platform.serve.deployment:ServeArgs",
    "user-config": "sarl.platform.serve.deployment:UserConfig",
    "predict": "sarl.platform.predict:PredictConfig",
    "calibrate": "sarl.platform.complete:CalibrateConfig",
    "complete": "sarl.platform.complete:CompleteConfig",
    "annotate-push": "sarl.platform.annotate:AnnotatePushConfig",
    "annotate-pull": "sarl.platform.annotate:AnnotatePullConfig",
}


def section(kind: str) -> type:
    """The class of configuration ``kind`` (imported when asked for: Serve's pulls in Ray Serve)."""
    module, name = SECTIONS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def _schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(section(args.kind)), indent=2) + "\n"
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
        print(f"written: {args.output}")
    else:
        print(text, end="")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="the JSON schema of a job, sweep, Serve or command configuration")
    commands = config.add_subparsers(dest="config_command", required=True, metavar="{schema}")
    schema = commands.add_parser("schema", help="print the JSON schema of a configuration kind")
    schema.add_argument("kind", choices=sorted(SECTIONS))
    schema.add_argument("--output", help="write it to this file instead of printing it")
    schema.set_defaults(func=_schema)
