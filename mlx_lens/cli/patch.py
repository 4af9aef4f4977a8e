"""`mlx-lens patch`: an activation-patching trace (mlx_lens/experiment/patching.py) of a clean
and a corrupted prompt, or with --noise ROME's causal trace (mlx_lens/experiment/tracing.py),
written to a run folder like `mlx-lens run`'s."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from mlx_lens.core.errors import LensError, first_line, one_line
from mlx_lens.experiment.patching import KINDS, PatchOptions
from mlx_lens.experiment.tracing import NoiseOptions
from mlx_lens.experiment.probes import ANSWER, PROMPT
from mlx_lens.output import run_dir
from mlx_lens.experiment.facts import load_facts
from mlx_lens.output.artifacts import (write_patch_artifacts, write_patch_suite_artifacts,
                                       write_trace_artifacts, write_trace_suite_artifacts)

# docs/patching.md's default pair: the corruption changes the subject only (as long in tokens).
CORRUPT = PROMPT.replace("Germany", "France")
CORRUPT_ANSWER = "Paris"
SUBJECT = "Germany"  # the default prompt's subject, for --noise
NOISE = NoiseOptions()  # ROME's settings: --noise-scale, --samples, --window


def add_parser(sub, options: argparse.ArgumentParser, model_help: str) -> None:
    patch = sub.add_parser("patch", parents=[options],
                           help="activation patching: restore a clean run's activations into a "
                                "corrupted run, per kind, layer and position")
    patch.add_argument("model", nargs="?", default=None, help=model_help)
    patch.add_argument("--clean", default=PROMPT, help="the prompt whose answer is restored")
    patch.add_argument("--corrupt", default=None,
                       help="the corrupted prompt, as many tokens long (default: France)")
    patch.add_argument("--answer", default=ANSWER, help="the clean prompt's answer")
    patch.add_argument("--corrupt-answer", default=None,
                       help="the corrupted prompt's answer: the metric is then the difference "
                            f"of the two answers' log2 p (default with the default prompts: "
                            f"{CORRUPT_ANSWER})")
    patch.add_argument("--window", type=int, default=None,
                       help="restore the attention or MLP outputs of this many blocks, centred "
                            f"on the layer as ROME does (default: 1; with --noise "
                            f"{NOISE.window})")
    patch.add_argument("--noise", action="store_true",
                       help="causal tracing as ROME defines it: the corrupted runs are the "
                            "clean prompt with Gaussian noise on the subject's embeddings "
                            "(no corrupted prompt)")
    patch.add_argument("--subject", default=None,
                       help=f"with --noise: the words of --clean to noise (default with the "
                            f"default prompt: {SUBJECT}; a facts file's 'subject' field)")
    patch.add_argument("--noise-scale", type=float, default=None,
                       help="with --noise: the noise's standard deviation in units of the "
                            f"embeddings' (default {NOISE.scale:g}, ROME's)")
    patch.add_argument("--samples", type=int, default=None,
                       help=f"with --noise: noise samples averaged (default {NOISE.samples})")
    patch.add_argument("--seed", type=int, default=None,
                       help=f"with --noise: the noise's random seed (default {NOISE.seed})")
    patch.add_argument("--kinds", default=",".join(KINDS),
                       help="comma-separated: resid (the block's input), attn, mlp")
    patch.add_argument("--facts", metavar="FILE",
                       help="a fact suite instead (JSONL or CSV, or 'default'): each fact's "
                            "control prompt is its corruption, restored at the last position "
                            "and at the subject; with --noise each fact's subject is noised")
    patch.add_argument("--out_dir", type=Path, default=None,
                       help="write here, a new or empty folder, instead of rotating runs/run-latest")
    patch.add_argument("--no-plots", dest="plots", action="store_false",
                       help="draw no heatmap")


def _kinds(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(k.strip() for k in args.kinds.split(",") if k.strip())


def options_of(args: argparse.Namespace) -> PatchOptions:
    for flag in ("subject", "noise_scale", "samples", "seed"):
        if getattr(args, flag) is not None:
            raise LensError(f"--{flag.replace('_', '-')} needs --noise")
    corrupt = CORRUPT if args.corrupt is None else args.corrupt
    defaults = args.clean == PROMPT and corrupt == CORRUPT and args.answer == ANSWER
    return PatchOptions(args.clean, corrupt, args.answer,
                        args.corrupt_answer or (CORRUPT_ANSWER if defaults else None),
                        1 if args.window is None else args.window, _kinds(args))


def noise_options_of(args: argparse.Namespace) -> tuple[NoiseOptions, str | None]:
    """ROME's settings and the subject (None with --facts: each fact names its own)."""
    for flag, value in (("--corrupt", args.corrupt), ("--corrupt-answer", args.corrupt_answer)):
        if value is not None:
            raise LensError(f"{flag} has no use with --noise: the corrupted runs are the clean "
                            "prompt with its subject noised")
    def given(value, default):
        return default if value is None else value

    opts = NoiseOptions(given(args.noise_scale, NOISE.scale), given(args.samples, NOISE.samples),
                        given(args.seed, NOISE.seed), given(args.window, NOISE.window),
                        _kinds(args))
    if args.facts:
        if args.subject is not None:
            raise LensError("--subject has no use with --facts: each fact names its subject")
        return opts, None
    subject = args.subject if args.subject is not None else \
        SUBJECT if args.clean == PROMPT else None
    if subject is None or not subject.strip():
        raise LensError("--noise needs --subject: the words of the prompt to noise")
    if subject.strip() not in args.clean:
        raise LensError(f"the subject {subject.strip()!r} is not in the prompt")
    return opts, subject


def cmd_patch(args: argparse.Namespace, load) -> int:
    if args.noise:
        opts, subject = noise_options_of(args)  # bad input fails before the model is loaded
        if not args.answer.strip():
            raise LensError("empty answer: give the prompt's answer")
    else:
        opts = options_of(args)
    facts = load_facts(args.facts) if args.facts else None
    started = time.perf_counter()
    lens = load(args, args.model)
    loaded = time.perf_counter()

    def make(out_dir: Path) -> list[Path]:
        name = lens.source.name
        if args.noise:
            paths, result, picture = (_trace_suite(lens, out_dir, facts, opts) if facts
                                      else _trace(lens, out_dir, args, subject, opts))
        else:
            paths, result, picture = (_patch_suite(lens, out_dir, facts, opts) if facts
                                      else _patch(lens, out_dir, opts))
        if args.plots:
            paths += _heatmap(out_dir / f"plot-{name}-{picture}.png", result)
        print(f"time: {time.perf_counter() - started:.1f} s (load {loaded - started:.1f} s)")
        return paths

    for path in run_dir.produce(args.out_dir, make):
        print(f"  wrote {path}")
    return 0


def _patch(lens, out_dir: Path, opts: PatchOptions):
    result = lens.patch(opts.clean, opts.corrupt, opts.answer, opts.corrupt_answer, opts.window,
                        opts.kinds)
    s = result.summary
    print(f"{s['model']} [{s['backend']}]: {s['metric']} clean {s['clean_metric']:.2f}, "
          f"corrupted {s['corrupt_metric']:.2f}; strongest restorations: "
          + ", ".join(f"{k} layer {v['layer']} position {v['pos']} "
                      f"({s['tokens'][v['pos']]!r}) {v['recovery']:.2f}"
                      for k, v in s["strongest"].items()))
    return write_patch_artifacts(out_dir, lens.source.name, result), result, "patch"


def _patch_suite(lens, out_dir: Path, facts: list, opts: PatchOptions):
    result = lens.patch_suite(facts, opts.window, opts.kinds)
    _skipped(result)
    s = result.summary
    print(f"{s['model']} [{s['backend']}]: {s['patched']} of {s['facts']} facts patched "
          f"against their controls")
    if s["gap_not_positive"]:
        print(f"  {len(s['gap_not_positive'])} left out of the aggregates: the clean "
              "prompt does not favour its answer over the control's more than the "
              "corrupted prompt does (their recovery would read the wrong way round): "
              + ", ".join(s["gap_not_positive"]))
    return write_patch_suite_artifacts(out_dir, lens.source.name, result), result, "patch-suite"


def _trace(lens, out_dir: Path, args: argparse.Namespace, subject: str, opts: NoiseOptions):
    result = lens.trace(args.clean, args.answer, subject, opts)
    s = result.summary
    print(f"{s['model']} [{s['backend']}]: p({s['answer']}) clean {s['p_clean']:.4g}, "
          f"noised {s['p_corrupted']:.4g} (subject {s['subject']!r}, sd "
          f"{s['noise']['sd']:.4g}, {s['noise']['samples']} samples); strongest "
          "indirect effects: " + ", ".join(
              f"{k} layer {v['layer']} position {v['pos']} ({s['tokens'][v['pos']]!r}) "
              f"{v['indirect_effect']:+.4g}" for k, v in s["strongest"].items()))
    if "no_recovery" in s:
        print(f"  {s['no_recovery']}")
    return write_trace_artifacts(out_dir, lens.source.name, result), result, "trace"


def _trace_suite(lens, out_dir: Path, facts: list, opts: NoiseOptions):
    result = lens.trace_suite(facts, opts)
    _skipped(result)
    s = result.summary
    print(f"{s['model']} [{s['backend']}]: {s['traced']} of {s['facts']} facts traced "
          f"with noise on their subjects (sd {s['noise']['sd']:.4g}, "
          f"{s['noise']['samples']} samples)")
    print("  " + headline(result.aggregates))
    return write_trace_suite_artifacts(out_dir, lens.source.name, result), result, "trace-suite"


def _skipped(result) -> None:
    for line in result.skipped:
        print(f"  skipped {line}")


def headline(aggregates) -> str:
    """ROME's headline: where the MLP's average indirect effect at the last subject token
    peaks, with its interval (or that the suite has no MLP trace)."""
    rows = aggregates[(aggregates["kind"] == "mlp") & (aggregates["place"] == "last_subject")]
    if rows.empty or not rows["effect_mean"].notna().any():
        return "no MLP trace at the last subject token"
    best = rows.loc[rows["effect_mean"].idxmax()]
    # a peak is one layer only where the others' means fall outside its interval
    near = rows.loc[rows["effect_mean"] >= best["effect_ci_low"], "layer"].astype(int).tolist()
    return (f"MLP at the last subject token: the average indirect effect peaks at layer "
            f"{int(best['layer'])}, {best['effect_mean']:+.4f} (95% CI "
            f"{best['effect_ci_low']:+.4f} to {best['effect_ci_high']:+.4f}, {int(best['n'])} "
            f"facts); layers whose mean lies inside that interval: {_spans(near)}")


def _spans(layers: list[int]) -> str:
    """Sorted layers as ranges: [0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(f"{start}-{layer}" if layer > start else str(start))
            start = None
    return ", ".join(out)


def _heatmap(path: Path, result) -> list[Path]:
    """The picture; failing to draw it costs the picture, never the artifacts."""
    try:
        from mlx_lens.view.style import save_png  # matplotlib is imported only to draw

        return [save_png(result.plot(), path)]
    except Exception as exc:
        reason = first_line(exc) if isinstance(exc, LensError) else one_line(exc)
        print(f"mlx-lens: warning: no heatmap drawn: {reason}")
        return []
