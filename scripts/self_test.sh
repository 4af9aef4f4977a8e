#!/usr/bin/env bash
# The lens's norm-scaling self-test: scripts/self_test.sh [MODEL] [DEVICE]
# MODEL: folder, .gguf file or hub id (default: the packaged SmolLM2-135M); DEVICE: auto, cpu,
# cuda, mps (torch) or gpu (mlx). Prints per-layer results, exits 0 on pass, 1 on fail; writes
# nothing. MLX_LENS_PYTHON picks the interpreter (default: the repository's .venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${MLX_LENS_PYTHON:-$root/.venv/bin/python}"
args=(run --self-test --device "${2:-auto}")
[ -n "${1:-}" ] && args+=("$1")
exec "$python" -m mlx_lens.cli.main "${args[@]}"
