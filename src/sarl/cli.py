"""The ``sarl`` command: ``sarl demo | ...``. Each subcommand is a small function over the library."""

from __future__ import annotations

import argparse
import sys

from .model.config import ConfigError


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarl", description="SARL: multi-label recognition with partial labels")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train tiny SARL and the CLIP global baseline on generated data")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"sarl {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
