"""`mlx-lens patch`: an activation-patching trace (mlx_lens/experiment/patching.py) of a clean
and a corrupted prompt, written to a run folder like `mlx-lens run`'s."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from mlx_lens.core.errors import LensError, first_line, one_line
from mlx_lens.experiment.patching import KINDS, PatchOptions
from mlx_lens.experiment.probes import ANSWER, PROMPT
from mlx_lens.output import run_dir
from mlx_lens.experiment.facts import load_facts
from mlx_lens.output.artifacts import write_patch_artifacts, write_patch_suite_artifacts

# docs/patching.md's default pair: the corruption changes the subject only (as long in tokens).
CORRUPT = PROMPT.replace("Germany", "France")
CORRUPT_ANSWER = "Paris"


def add_parser(sub, options: argparse.ArgumentParser, model_help: str) -> None:
    patch = sub.add_parser("patch", parents=[options],
                           help="activation patching: restore a clean run's activations into a "
                                "corrupted run, per kind, layer and position")
    patch.add_argument("model", nargs="?", default=None, help=model_help)
    patch.add_argument("--clean", default=PROMPT, help="the prompt whose answer is restored")
    patch.add_argument("--corrupt", default=CORRUPT,
                       help="the corrupted prompt, as many tokens long (default: France)")
    patch.add_argument("--answer", default=ANSWER, help="the clean prompt's answer")
    patch.add_argument("--corrupt-answer", default=None,
                       help="the corrupted prompt's answer: the metric is then the difference "
                            f"of the two answers' log2 p (default with the default prompts: "
                            f"{CORRUPT_ANSWER})")
    patch.add_argument("--window", type=int, default=1,
                       help="restore this many consecutive blocks' attention or MLP outputs")
    patch.add_argument("--kinds", default=",".join(KINDS),
                       help="comma-separated: resid (the block's input), attn, mlp")
    patch.add_argument("--facts", metavar="FILE",
                       help="a fact suite instead (JSONL or CSV, or 'default'): each fact's "
                            "control prompt is its corruption, restored at the last position "
                            "and at the subject")
    patch.add_argument("--out_dir", type=Path, default=None,
                       help="write here, a new or empty folder, instead of rotating runs/run-latest")
    patch.add_argument("--no-plots", dest="plots", action="store_false",
                       help="draw no heatmap")


def options_of(args: argparse.Namespace) -> PatchOptions:
    defaults = args.clean == PROMPT and args.corrupt == CORRUPT and args.answer == ANSWER
    return PatchOptions(args.clean, args.corrupt, args.answer,
                        args.corrupt_answer or (CORRUPT_ANSWER if defaults else None),
                        args.window, tuple(k.strip() for k in args.kinds.split(",") if k.strip()))


def cmd_patch(args: argparse.Namespace, load) -> int:
    opts = options_of(args)  # bad input fails before the model is loaded
    facts = load_facts(args.facts) if args.facts else None
    started = time.perf_counter()
    lens = load(args, args.model)
    loaded = time.perf_counter()

    def make(out_dir: Path) -> list[Path]:
        name = lens.source.name
        if facts is not None:
            result = lens.patch_suite(facts, opts.window, opts.kinds)
            for line in result.skipped:
                print(f"  skipped {line}")
            paths = write_patch_suite_artifacts(out_dir, name, result)
            s = result.summary
            print(f"{s['model']} [{s['backend']}]: {s['patched']} of {s['facts']} facts patched "
                  f"against their controls")
            if s["gap_not_positive"]:
                print(f"  {len(s['gap_not_positive'])} left out of the aggregates: the clean "
                      "prompt does not favour its answer over the control's more than the "
                      "corrupted prompt does (their recovery would read the wrong way round): "
                      + ", ".join(s["gap_not_positive"]))
        else:
            result = lens.patch(opts.clean, opts.corrupt, opts.answer, opts.corrupt_answer,
                                opts.window, opts.kinds)
            paths = write_patch_artifacts(out_dir, name, result)
            s = result.summary
            print(f"{s['model']} [{s['backend']}]: {s['metric']} clean {s['clean_metric']:.2f}, "
                  f"corrupted {s['corrupt_metric']:.2f}; strongest restorations: "
                  + ", ".join(f"{k} layer {v['layer']} position {v['pos']} "
                              f"({s['tokens'][v['pos']]!r}) {v['recovery']:.2f}"
                              for k, v in s["strongest"].items()))
        if args.plots:
            suffix = "patch-suite" if facts is not None else "patch"
            paths += _heatmap(out_dir / f"plot-{name}-{suffix}.png", result)
        print(f"time: {time.perf_counter() - started:.1f} s (load {loaded - started:.1f} s)")
        return paths

    for path in run_dir.produce(args.out_dir, make):
        print(f"  wrote {path}")
    return 0


def _heatmap(path: Path, result) -> list[Path]:
    """The picture; failing to draw it costs the picture, never the artifacts."""
    try:
        from mlx_lens.view.style import save_png  # matplotlib is imported only to draw

        return [save_png(result.plot(), path)]
    except Exception as exc:
        reason = first_line(exc) if isinstance(exc, LensError) else one_line(exc)
        print(f"mlx-lens: warning: no heatmap drawn: {reason}")
        return []
