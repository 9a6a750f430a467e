#!/usr/bin/env bash
# A two-node Ray cluster on this machine whose nodes share no disk (the test cluster of issue 10): a head with no
# CPUs and a worker node with a private /tmp and ~/.cache (its own mount namespace: needs root and unshare).
#
#   scripts/two_node_cluster.sh start [--worker-cpus N]   # prints: export RAY_ADDRESS=...; export RAY_AUTH_MODE=disabled
#   scripts/two_node_cluster.sh status
#   scripts/two_node_cluster.sh stop                      # ends only the processes `start` started
#
# Start an S3 server first (moto, MinIO) and export AWS_ENDPOINT_URL and keys: the nodes take them from here.
# Then, e.g.: eval "$(scripts/two_node_cluster.sh start | tail -1)"; sarl train --config J data.root=s3://...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" tests/integration/two_node.py "$@"
