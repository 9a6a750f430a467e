"""``sarl annotate push | pull``: the labelling loop with Label Studio (``sarl.platform.annotate``).

Options as flags or from a ``--config`` YAML of the same keys (``AnnotatePushConfig``, ``AnnotatePullConfig``).
The token comes from ``LABEL_STUDIO_API_KEY``; ``--token`` exists for one-off use but puts it in the shell's
history and the process list, so it is not a key of the config files.
"""

from __future__ import annotations

import argparse
import sys

from ..platform.annotate import AnnotatePullConfig, AnnotatePushConfig
from .options import add_section_flags, load_command

CONFIG_HELP = "YAML with any of the options below (flags override it)"
TOKEN_HELP = "Label Studio API token (default: $LABEL_STUDIO_API_KEY, which keeps it out of the shell history)"


def _run(args: argparse.Namespace, push: bool) -> int:
    from ..platform.annotate import AnnotateError, run_pull, run_push
    from ..platform.label_studio import LabelStudio, LabelStudioError

    try:
        if push:
            config = load_command(AnnotatePushConfig, args, ("suggestions", "predictions", "manifest",
                                                             "document_root"))
        else:
            config = load_command(AnnotatePullConfig, args, ("manifest", "output"))
        with LabelStudio(config.label_studio, args.token) as client:
            out = run_push(config, client) if push else run_pull(config, client)
    except (AnnotateError, LabelStudioError) as exc:
        print(f"sarl annotate: {exc}", file=sys.stderr)
        return 2
    if push:
        print(f"project {out['project']!r} (id {out['project_id']}, {out['mode']} mode): {out['created']} tasks "
              f"created, {out['already_there']} already there; {out['storages_connected']} storage connections "
              f"added; pre-annotations of model {out['model_version']}", flush=True)
    else:
        print(f"{out['tasks']} tasks, {out['answers']} answered entries: {out['became_known']} became known, "
              f"{out['cant_tell']} can't tell, {out['agreed']} agreed with the manifest, {out['conflicts']} "
              f"conflicts (the manifest's value kept; listed in {out['conflicts_file']}); unknown entries "
              f"{out['unknown_before']} -> {out['unknown_after']}. Written: {out['output']}", flush=True)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    annotate = sub.add_parser("annotate", help="send what to annotate next to Label Studio, take the answers back")
    commands = annotate.add_subparsers(dest="annotate_command", required=True, metavar="{push,pull}")
    push = commands.add_parser("push", help="create or update a Label Studio project from suggestions or "
                                            "predictions, with pre-annotations (no duplicate tasks)")
    pull = commands.add_parser("pull", help="write a manifest in which the answered entries are known; conflicts "
                                            "with the manifest's annotations are reported, never overwritten")
    for parser, section, is_push in ((push, AnnotatePushConfig, True), (pull, AnnotatePullConfig, False)):
        parser.add_argument("--config", help=CONFIG_HELP)
        parser.add_argument("--token", help=TOKEN_HELP)
        add_section_flags(parser, section)
        parser.set_defaults(func=lambda args, is_push=is_push: _run(args, is_push))
