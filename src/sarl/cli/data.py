"""``sarl index``: the index of an ``s3://`` directory, which node caches revalidate their copy against with one
HEAD instead of a listing (``sarl.platform.node_cache.write_index``)."""

from __future__ import annotations

import argparse


def _index(args: argparse.Namespace) -> int:
    from ..platform.node_cache import INDEX_NAME, write_index

    index = write_index(args.uri)
    print(f"{args.uri.rstrip('/')}/{INDEX_NAME}: {index['objects']} objects, {index['bytes']} bytes, version "
          f"{index['version'][:19]}; node caches now revalidate their copies with one HEAD of it (run this again "
          f"after changing the directory)")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="write the index of an s3:// directory (a data set): node caches then "
                                         "revalidate their copy with one HEAD instead of listing it")
    index.add_argument("uri", help="s3://bucket/prefix, e.g. the data.root of a job")
    index.set_defaults(func=_index)
