"""``sarl vocab push | list | show | rollback``: the vocabulary store from the command line.

``sarl.cli.build_parser`` adds these with one call to :func:`add_vocab_parser`. Each command returns an exit code; user
errors (bad file, unknown version, unreachable store) print ``sarl vocab <cmd>: <message>`` and return 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable

import yaml
from botocore.exceptions import BotoCoreError, ClientError

from ..model.vocabulary import Vocabulary, VocabularyError
from ..platform.storage import StorageError
from ..platform.vocab_store import (
    VocabStore,
    VocabStoreError,
    check_against_checkpoint,
    check_version,
    read_vocabulary_file,
)

_USER_ERRORS = (VocabStoreError, VocabularyError, FileNotFoundError, StorageError, BotoCoreError, ClientError)


def _reporting(command: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Turn the user errors of ``sarl vocab <command>`` into one message on stderr and exit code 2."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except _USER_ERRORS as exc:
                print(f"sarl vocab {command}: {exc}", file=sys.stderr)
                return 2

        return run

    return wrap


@_reporting("push")
def _push(args: argparse.Namespace) -> int:
    vocabulary = read_vocabulary_file(args.file)
    if args.version:
        vocabulary = Vocabulary(vocabulary.categories, version=args.version)
    check_version(vocabulary.version)  # before the slow checkpoint check
    store = VocabStore(args.store)
    if args.checkpoint:
        problems = check_against_checkpoint(vocabulary, args.checkpoint, args.word_vectors)
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            print(f"sarl vocab push: {args.file} does not fit {args.checkpoint}:\n{lines}", file=sys.stderr)
            return 2
    version = store.push(vocabulary, make_current=not args.no_current)
    print(f"pushed version {version} ({len(vocabulary)} categories) to {store.uri}; "
          f"current: {store.current_version() or 'none'}")
    return 0


@_reporting("list")
def _list(args: argparse.Namespace) -> int:
    store = VocabStore(args.store)
    infos = store.versions()
    if not infos:
        print(f"no versions in {store.uri}")
        return 0
    rows = [("", "version", "categories", "pushed at")]
    rows += [("*" if i.current else "", i.version, str(i.categories), i.updated_at) for i in infos]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    for row in rows:
        print(" ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " " + row[3])
    return 0


@_reporting("show")
def _show(args: argparse.Namespace) -> int:
    store = VocabStore(args.store)
    current = store.current_version()
    vocabulary = store.load(args.version)
    state = "current" if vocabulary.version == current else f"not current; current: {current or 'none'}"
    header = f"# version {vocabulary.version} ({state}) in {store.uri}"
    if args.json:
        print(header, file=sys.stderr)  # stdout stays one JSON document
        print(json.dumps(vocabulary.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(header)  # a YAML comment: the output is still a valid vocabulary file
        print(yaml.safe_dump(vocabulary.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


@_reporting("rollback")
def _rollback(args: argparse.Namespace) -> int:
    store = VocabStore(args.store)
    previous = store.current_version()
    store.set_current(args.version)
    print(f"current: {args.version} (was {previous or 'none'})")
    return 0


def add_vocab_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``sarl vocab`` and its commands to ``subparsers``; each sets ``func``, which returns an exit code."""
    vocab = subparsers.add_parser("vocab", help="versioned vocabulary store: push, list, show, rollback")
    commands = vocab.add_subparsers(dest="vocab_command", required=True, metavar="{push,list,show,rollback}")
    store_help = "the store: a local directory or s3://bucket/prefix"

    push = commands.add_parser("push", help="validate a vocabulary file and publish it as a new version")
    push.add_argument("file", help="vocabulary YAML/JSON, local or s3://")
    push.add_argument("--store", required=True, help=store_help)
    push.add_argument("--version", help="publish under this version instead of the file's")
    push.add_argument("--checkpoint", help="also check vector dimensions and words against this checkpoint")
    push.add_argument("--word-vectors", help="word vectors for new zero-shot categories (with --checkpoint)")
    push.add_argument("--no-current", action="store_true", help="publish without moving the current pointer")
    push.set_defaults(func=_push)

    listing = commands.add_parser("list", help="pushed versions, oldest first; * marks the current one")
    listing.add_argument("--store", required=True, help=store_help)
    listing.set_defaults(func=_list)

    show = commands.add_parser("show", help="print a version (default: the current one) as YAML or JSON")
    show.add_argument("version", nargs="?", help="version to show (default: current)")
    show.add_argument("--store", required=True, help=store_help)
    show.add_argument("--json", action="store_true", help="JSON instead of YAML (the header goes to stderr)")
    show.set_defaults(func=_show)

    rollback = commands.add_parser("rollback", help="point the store at an earlier (or any pushed) version")
    rollback.add_argument("version")
    rollback.add_argument("--store", required=True, help=store_help)
    rollback.set_defaults(func=_rollback)
    return vocab
