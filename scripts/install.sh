#!/bin/sh
# The install step of every environment this project runs in: `make setup` (.venv, with the test extras) and the
# cluster image (Dockerfile, which the KubeRay manifests in jobs/kuberay/ name).
#   scripts/install.sh PYTHON [EXTRAS]        e.g. scripts/install.sh .venv/bin/python test
# The PyTorch wheels are pinned here only, so a fresh machine takes the builds that lie on its disk and the image
# gets the same ones; TORCH_PINS (environment) overrides them.
set -eu
PYTHON=$1
EXTRAS=${2:-}
TORCH_PINS=${TORCH_PINS:-"torch==2.14.1 torchvision==0.29.1"}
"$PYTHON" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # the pins are words
"$PYTHON" -m pip install --quiet $TORCH_PINS
"$PYTHON" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
