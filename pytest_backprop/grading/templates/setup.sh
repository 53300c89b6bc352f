#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (Ubuntu). Written by
# `python -m pytest_backprop.gradescope build` (pytest-backprop @@VERSION@@); build again rather than edit.
#
# It installs Python, CPU-only torch (the kit needs no GPU; the CPU wheel is a fraction of the size)
# and the kit into a virtual environment, and creates the unprivileged user the students' code
# runs as. Local tries can set GRADER_VENV (where the environment goes) and TORCH_INDEX_URL
# (empty: torch from pip's own configuration).
set -euo pipefail
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${GRADER_VENV:-/opt/grader}"
TORCH_INDEX="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
KIT="@@KIT@@"
case "$KIT" in kit/*) KIT="$SOURCE/$KIT" ;; esac
SANDBOX_USER="@@SANDBOX_USER@@"

if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    apt-get update -q && apt-get install -y -q python3 python3-venv python3-pip
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/pip" install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch
fi
"$VENV/bin/pip" install -q "$KIT"

# The user the students' code runs as (a number needs no account): it can read the submission and
# the kit, and nothing of the grader's.
case "$SANDBOX_USER" in
    "" | *[!0-9]*) [ -z "$SANDBOX_USER" ] || id -u "$SANDBOX_USER" >/dev/null 2>&1 ||
        useradd --system --no-create-home --shell /usr/sbin/nologin "$SANDBOX_USER" ;;
esac
