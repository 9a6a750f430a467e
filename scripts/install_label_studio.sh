#!/bin/sh
# The Label Studio server the tests start (tests/integration/label_studio_server.py), in a virtual environment of
# its own: its dependencies (Django, pinned numpy, ...) are not Ray's, so it cannot live in .venv.
#   scripts/install_label_studio.sh [VENV_DIR]        default .venv-ls; PYTHON (environment) picks the interpreter
# It then migrates an empty database once, into VENV_DIR/template/label_studio.sqlite3: a test session copies it
# into its temporary data dir and the server starts in seconds, instead of migrating for 40-90 s at every start.
# Idempotent: a second run installs nothing new and keeps a template it already made.
set -eu
VENV=${1:-.venv-ls}
PYTHON=${PYTHON:-python3}
LABEL_STUDIO_PIN="label-studio==1.23.2"
# sentry-sdk 3 refuses an option Label Studio 1.23.2 passes (send_default_pii): the server would not start
SENTRY_PIN="sentry-sdk>=2.16,<3"

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$LABEL_STUDIO_PIN" "$SENTRY_PIN"

TEMPLATE="$VENV/template/label_studio.sqlite3"
if [ ! -f "$TEMPLATE" ]; then
    STAGE=$(mktemp -d "${TMPDIR:-/tmp}/sarl-ls-template.XXXXXX")
    # `label-studio version` applies the migrations and exits; no telemetry, no update check
    LABEL_STUDIO_BASE_DATA_DIR="$STAGE" LABEL_STUDIO_SENTRY_DSN="" LABEL_STUDIO_FRONTEND_SENTRY_DSN="" \
        LABEL_STUDIO_LATEST_VERSION_CHECK=false LABEL_STUDIO_COLLECT_ANALYTICS=false \
        "$VENV/bin/label-studio" version --data-dir "$STAGE" >"$STAGE.log" 2>&1 \
        || { cat "$STAGE.log" >&2; rm -rf "$STAGE" "$STAGE.log"; exit 1; }
    mkdir -p "$VENV/template"
    cp "$STAGE/label_studio.sqlite3" "$TEMPLATE.tmp" && mv "$TEMPLATE.tmp" "$TEMPLATE"
    rm -rf "$STAGE" "$STAGE.log"
fi
echo "Label Studio: $VENV/bin/label-studio ($LABEL_STUDIO_PIN), migrated template $TEMPLATE"
