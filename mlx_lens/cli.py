"""The `mlx-lens` command."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mlx_lens import backends, run_dir
from mlx_lens.artifacts import write_model_artifacts
from mlx_lens.chat import CHAT_PROMPT, MAX_TOKENS, chat
from mlx_lens.contract import LENSES
from mlx_lens.errors import LensError
from mlx_lens.experiment import ExperimentOptions, run_experiment
from mlx_lens.metrics import CollapseSettings
from mlx_lens.models import resolve
from mlx_lens.probes import ANSWER, PROMPT


def _parser() -> argparse.ArgumentParser:
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("model", nargs="?", default=None,
                       help="local folder, .gguf file or hub id (default: the packaged SmolLM2-135M)")
    model.add_argument("--backend", choices=backends.BACKENDS, default="auto")
    model.add_argument("--device", default="auto",
                       help="torch: auto, cpu, cuda, cuda:N, mps; mlx: auto, gpu, cpu")
    model.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="compute dtype (torch auto: fp32 on CPU, fp16 on CUDA, bf16 for "
                            "Gemma; mlx auto: the checkpoint's)")

    parser = argparse.ArgumentParser(prog="mlx-lens", description="Per-layer logit lens.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", parents=[model], help="greedy chat reply (a model check)")
    chat.add_argument("--prompt", default=CHAT_PROMPT)
    chat.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parity = sub.add_parser("parity", help="check that the MLX lens agrees with the torch reference "
                            "on a model (per-layer table; exit 1 beyond tolerance)")
    parity.add_argument("model", nargs="?", default=None,
                        help="local folder, .gguf file or hub id (default: the packaged SmolLM2-135M)")
    parity.add_argument("--lens", choices=(*LENSES, "all"), default="all")
    parity.add_argument("--prompt", action="append", help="repeatable (default: the probe prompt)")
    parity.add_argument("--answer", default=ANSWER)
    run = sub.add_parser("run", parents=[model], help="run the logit-lens experiment on a model")
    run.add_argument("--lens", choices=LENSES, default="final-norm",
                     help="norm that decodes each layer (next-norm: the original's rule)")
    run.add_argument("--fp32-unembed", action="store_true",
                     help="decode in fp32 (the lens always does; kept for the original's command lines)")
    run.add_argument("--copy-threshold", type=float, default=CollapseSettings.copy_threshold)
    run.add_argument("--copy-margin", type=float, default=CollapseSettings.copy_margin)
    run.add_argument("--prompt", default=PROMPT)
    run.add_argument("--answer", default=ANSWER, help="gold answer (its first token is scored)")
    run.add_argument("--out_dir", type=Path, default=None,
                     help="write here instead of rotating runs/run-latest")
    run.add_argument("--no-probes", dest="probes", action="store_false",
                     help="skip the extra test prompts and temperature exploration")
    return parser


def _load(args: argparse.Namespace):
    source = resolve(args.model)
    name, reason = backends.choose(args.backend)
    print(f"backend: {name} ({reason})")
    return source, backends.load(name, source, device=args.device, dtype=args.dtype), reason


def cmd_chat(args: argparse.Namespace) -> int:
    _, backend, _ = _load(args)
    print(f"user: {args.prompt}\n{backend.info.name}: {chat(backend, args.prompt, args.max_tokens)}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from mlx_lens.parity import compare

    source = resolve(args.model)
    reference, candidate = backends.load("torch", source), backends.load("mlx", source)
    failed = False
    for lens in LENSES if args.lens == "all" else (args.lens,):
        report = compare(reference, candidate, args.prompt or [PROMPT], lens, args.answer)
        print(f"{source.name} [{report.architecture}], lens {lens}: torch (reference) vs mlx, "
              f"tolerance KL {report.tol.kl:.0e} nats, entropy {report.tol.entropy_bits:.0e} bits "
              f"({report.tol.cause})")
        print(report.table())
        for line in report.failures():
            print(f"FAIL: {line}")
            failed = True
        for i, p in enumerate(report.prompts):
            print(f"prompt {i}: torch {p.summaries[0]}, mlx {p.summaries[1]}")
    print("parity: FAILED" if failed else "parity: OK")
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    opts = ExperimentOptions(
        prompt=args.prompt, answer=args.answer, lens=args.lens,
        collapse=CollapseSettings(args.copy_threshold, args.copy_margin), probes=args.probes)
    source, backend, reason = _load(args)
    result = run_experiment(backend, opts, {"backend_reason": reason})

    if args.out_dir is not None:
        out_dir = args.out_dir
        paths = write_model_artifacts(out_dir, source.name, result.payload, result.records,
                                      result.pure)
    else:
        staging = run_dir.start(Path.cwd() / "runs")
        try:
            write_model_artifacts(staging, source.name, result.payload, result.records, result.pure)
        except BaseException:
            run_dir.discard(staging)
            raise
        out_dir = run_dir.publish(staging)
        paths = sorted(out_dir.glob(f"output-{source.name}*"))

    s = result.summary
    print(f"{s['model']} [{s['backend']} {s['device']} {s['dtype']}, lens {args.lens}]: "
          f"final answer {s['answer']!r} (p={s['p']:.3f}); L_copy={s['L_copy']}, "
          f"L_semantic={s['L_semantic']} of {s['n_layers']} layers; "
          f"{time.perf_counter() - started:.1f} s")
    for path in paths:
        print(f"  wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": cmd_run, "chat": cmd_chat, "parity": cmd_parity}[args.command](args)
    except LensError as exc:
        print(f"mlx-lens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlx-lens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, not a traceback wall; MLX_LENS_DEBUG=1 shows it
        if os.environ.get("MLX_LENS_DEBUG"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(f"mlx-lens: error: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
