"""``sarl serve``: the model over HTTP on Ray Serve, following a vocabulary store."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..platform.aliases import AliasError
    from ..platform.serve import ServeConfig, read_serve_config, resolve_args, serve_forever, with_gpus

    config = read_serve_config(args.config) if args.config else ServeConfig()
    flags = {"checkpoint": args.checkpoint, "vocab_store": args.vocab_store, "word_vectors": args.word_vectors}
    app_args = {**config.args, **{k: v for k, v in flags.items() if v}}
    if "checkpoint" not in app_args:
        print("sarl serve: give --checkpoint (or a --config whose args name one)", file=sys.stderr)
        return 2
    config.http_options.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    if args.gpus is not None:
        config = with_gpus(config, args.gpus)
        app_args["device"] = config.args["device"]
    try:  # before Ray starts: a missing checkpoint or store is one line (FileNotFoundError: in cli.main), not a
        # failed deployment with the Serve controller's tracebacks
        resolved = resolve_args(app_args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
        print(f"sarl serve: configuration error: {problems}", file=sys.stderr)
        return 2
    except AliasError as exc:
        print(f"sarl serve: {exc}", file=sys.stderr)
        return 2
    serve_forever(resolved, config, args.address)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
