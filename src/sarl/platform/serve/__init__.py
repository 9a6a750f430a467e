"""Ray Serve: the ``sarl`` application and its parts.

- ``deployment``: the ``Predictor`` deployment (HTTP routes, dynamic batching, health), ``build_app`` (the
  ``import_path`` of Serve configs: ``sarl.platform.serve:build_app``), ``resolve_args`` (the checks before
  anything is deployed), Serve config files and ``deploy``;
- ``io``: request bodies and image decoding, with their limits;
- ``vocabulary``: the watcher that follows a vocabulary store and builds each new version;
- ``metrics``: the ``sarl_*`` request metrics;
- ``scoring``: a checkpoint's model with its preprocessing, shared with bulk prediction (``sarl predict``);
- ``label_studio``: Label Studio's ML backend protocol under ``/label-studio`` (pre-annotation of the tasks a
  project opens; task images fetched only from the configured Label Studio host and buckets).

The deployment's names are importable from here; it is imported on first use, so ``io`` and ``scoring`` do not
pull in Ray Serve and FastAPI.
"""

from __future__ import annotations

from typing import Any

_DEPLOYMENT = ("APP_NAME", "Predictor", "ServeArgs", "ServeConfig", "UserConfig", "build_app", "deploy",
               "read_serve_config", "resolve_args", "serve_forever", "with_gpus")


def __getattr__(name: str) -> Any:
    if name in _DEPLOYMENT:
        from . import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_DEPLOYMENT)
