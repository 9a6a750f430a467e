"""The ``sarl`` command: ``sarl demo | train | evaluate | export | protocol | tune | serve | predict | calibrate |
complete | annotate | vocab | index | config``.

Each subcommand is a small function over the library, in the module of its group: ``train`` (training runs and
what is measured on them), ``serve``, ``label`` (predict, calibrate, complete), ``annotate``, ``vocab``, ``data``
(index), ``config``."""

from __future__ import annotations

import argparse
import sys

from ..model.config import ConfigError
from ..platform.storage import StorageError
from . import annotate, config, data, label, serve, train, vocab


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarl", description="SARL: multi-label recognition with partial labels")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (train, serve, label, annotate, data):
        group.add_parsers(sub)
    vocab.add_vocab_parser(sub)
    config.add_parsers(sub)
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
