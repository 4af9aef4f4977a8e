"""The `mlx-lens` command."""
from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time
from pathlib import Path

from mlx_lens import backend_choice
from mlx_lens.experiment import health
from mlx_lens.experiment.milestones import MilestoneSettings, describe, layer_or_never
from mlx_lens.experiment.lenses import summary_line as lens_summary_line
from mlx_lens.output import run_dir
from mlx_lens.api import ModelLens, load, resolve_lens, resolve_lenses
from mlx_lens.output.artifacts import write_model_artifacts
from mlx_lens.loading import hub
from mlx_lens.loading.placement import read_device_map
from mlx_lens.experiment.chat import CHAT_PROMPT, MAX_TOKENS, chat
from mlx_lens.core import steering
from mlx_lens.core.contract import KL_TUNED
from mlx_lens.core.lens import RULES, Lens
from mlx_lens.core.errors import LensError, first_line, one_line
from mlx_lens.experiment.single import ExperimentOptions, framework_warning
from mlx_lens.experiment.facts import Fact, load_facts
from mlx_lens.cli import patch as patch_command
from mlx_lens.cli.processes import (HEADLINE, ORIGINAL_MODELS, ModelOutcome, NothingProduced,
                                    artifact_names, run_one_process, summary_of, table)
from mlx_lens.experiment.metrics import CollapseSettings
from mlx_lens.loading.sources import resolve
from mlx_lens.experiment.probes import ANSWER, PROMPT
from mlx_lens.checks.norm_scale import report as self_test_report
from mlx_lens.checks.norm_scale import run_self_test, self_test_layers
from mlx_lens.output.suite_tables import write_suite_tables
from mlx_lens.tuned.jlens_fit import JLensOptions
from mlx_lens.tuned.training import EVAL_TOKENS, TuneOptions


GRID_COLOURS = ("entropy", "p1")  # mlx_lens.view.grid.GRID_COLOURS, without importing matplotlib
MODEL_HELP = "local folder, .gguf file or hub id (default: the packaged SmolLM2-135M)"
# run options a child process for one model gets from a multi-model run (dest, flag)
_CHILD_OPTIONS = (("backend", "--backend"), ("device", "--device"), ("dtype", "--dtype"),
                  ("lens", "--lens"), ("copy_threshold", "--copy-threshold"),
                  ("copy_margin", "--copy-margin"), ("margin_bits", "--margin-bits"),
                  ("prompt", "--prompt"), ("answer", "--answer"))


def _parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--backend", choices=backend_choice.BACKENDS, default="auto")
    options.add_argument("--device", default="auto",
                       help="torch: auto, cpu, cuda, cuda:N, mps; mlx: auto, gpu, cpu")
    options.add_argument("--device-map", default=None, metavar="FILE",
                         help="torch: place the model with accelerate as this JSON file says "
                              "(module name -> cuda:N, cpu or disk); without it, --device auto "
                              "splits a model over GPUs that only together hold it")
    options.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="compute dtype (torch auto: the checkpoint's own on CUDA, fp32 on "
                            "CPU up to ~27B parameters, fp16 on MPS; mlx auto: the checkpoint's)")

    parser = argparse.ArgumentParser(prog="mlx-lens", description="Per-layer logit lens.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", parents=[options], help="greedy chat reply (a model check)")
    chat.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    chat.add_argument("--prompt", default=CHAT_PROMPT)
    chat.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parity = sub.add_parser("parity", help="check that the MLX lens agrees with the torch reference "
                            "on a model (per-layer table; exit 1 beyond tolerance)")
    parity.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    parity.add_argument("--lens", default="all", help=f"{', '.join(RULES)}, tuned:DIR, "
                        "jlens:FILE or all (the three norm rules)")
    parity.add_argument("--prompt", action="append", help="repeatable (default: the probe prompt)")
    parity.add_argument("--answer", default=ANSWER)
    run = sub.add_parser("run", parents=[options], help="run the logit-lens experiment")
    run.add_argument("models", nargs="*", metavar="model",
                     help=MODEL_HELP + "; several run one after another, each in its own process")
    run.add_argument("--all", action="store_true",
                     help="the original's seven models: " + ", ".join(ORIGINAL_MODELS))
    run.add_argument("--self-test", action="store_true",
                     help="check the norm scaling of the lens on each model named (prints, writes "
                          "nothing; exit 1 if any fails)")
    run.add_argument("--keep-residuals", action="store_true",
                     help="also save the residual stream per layer (safetensors)")
    run.add_argument("--lens", default="final-norm",
                     help=f"how each layer is decoded: {', '.join(RULES)} (the norm; next-norm: "
                          "the original's rule), tuned:DIR (a tuned lens folder, mlx-lens tune) or "
                          "jlens:FILE (a Jacobian lens file, mlx-lens jlens)")
    run.add_argument("--lenses", default=None, metavar="LENSES",
                     help="also decode with these lenses from the same forward pass, compared "
                          f"layer by layer: comma-separated ({', '.join(RULES)}, tuned:DIR, "
                          "jlens:FILE) or all; adds the lens tables (docs/running.md)")
    run.add_argument("--no-mid-block", dest="mid", action="store_false",
                     help="with --lenses, leave out the middle of each block (after attention, "
                          "before the MLP)")
    run.add_argument("--steer", type=Path, default=None, metavar="FILE",
                     help="add these steering vectors (a .safetensors file the Python API saved, "
                          "mlx_lens.core.steering.save) to the residual at their rows")
    run.add_argument("--steer-scale", type=float, default=1.0,
                     help="multiply the steering vectors by this")
    run.add_argument("--fp32-unembed", action="store_true",
                     help="does nothing: the lens always decodes in fp32 (accepted so that "
                          "the original's command lines run)")
    run.add_argument("--copy-threshold", type=float, default=CollapseSettings.copy_threshold)
    run.add_argument("--copy-margin", type=float, default=CollapseSettings.copy_margin)
    run.add_argument("--prompt", default=PROMPT)
    run.add_argument("--answer", default=ANSWER,
                     help="gold answer (scored whole, teacher-forced, and by its first token)")
    run.add_argument("--margin-bits", type=float, default=MilestoneSettings.margin_bits,
                     help="the lead over the runner-up a confirmed onset needs at two layers in "
                          "a row (default: 0.5 nats)")
    run.add_argument("--out_dir", type=Path, default=None,
                     help="write here, a new or empty folder, instead of rotating runs/run-latest")
    run.add_argument("--no-probes", dest="probes", action="store_false",
                     help="skip the extra test prompts and temperature exploration")
    run.add_argument("--probe", dest="test_prompts", action="append", metavar="TEXT",
                     help="a final-layer test prompt (repeatable; default: the original's 14 "
                          "with its own prompt, none with another)")
    run.add_argument("--facts", metavar="FILE",
                     help="also run a fact suite: JSONL or CSV with prompt, answer and optional "
                          "id, group, control_prompt, control_answer; 'default' for the packaged "
                          "capital-city suite")
    run.add_argument("--no-plots", dest="plots", action="store_false",
                     help="draw no pictures (plot-*.png) of the run")
    run.add_argument("--grid-colour", choices=GRID_COLOURS, default="entropy",
                     help="colour of the logit-lens grid: entropy (bits) or p(top-1)")
    tune = sub.add_parser("tune", parents=[options],
                          help="train a tuned lens on a corpus (or evaluate one: --eval DIR)")
    tune.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    tune.add_argument("--corpus", default=None,
                      help="a text file, or JSONL with a 'text' field (default: Python's own "
                           "reference topics, pydoc_data; docs/tuned-lens.md)")
    tune.add_argument("--steps", type=int, default=TuneOptions.steps)
    tune.add_argument("--tokens-per-step", type=int, default=TuneOptions.tokens_per_step)
    tune.add_argument("--seq-len", type=int, default=None,
                      help=f"tokens per training sequence (default {TuneOptions.seq_len}; with "
                           "--eval, the lens's own)")
    tune.add_argument("--out", type=Path, default=None,
                      help="the new lens folder (default: lenses/<model>)")
    tune.add_argument("--eval", type=Path, default=None, metavar="DIR",
                      help="evaluate the lens in DIR against the logit lens on held-out text "
                           "(table, eval.csv and eval.png in DIR) instead of training")
    tune.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS,
                      help="held-out tokens the evaluation reads at most")
    tune.add_argument("--jlens", type=Path, default=None, metavar="FILE",
                      help="with --eval, a J-lens file evaluated beside the tuned lens")
    jlens = sub.add_parser("jlens", parents=[options],
                           help="fit a Jacobian lens on a corpus (or merge shards: --merge)")
    jlens.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    jlens.add_argument("--corpus", default=None, help="as tune's (default: pydoc_data's topics)")
    jlens.add_argument("--windows", type=int, default=JLensOptions.windows,
                       help="corpus windows (prompts) to average over")
    jlens.add_argument("--first", type=int, default=JLensOptions.first,
                       help="the first window: shards fit disjoint slices, merged by --merge")
    jlens.add_argument("--seq-len", type=int, default=JLensOptions.seq_len)
    jlens.add_argument("--skip", type=int, default=JLensOptions.skip,
                       help="first positions of a window that are no source (attention sinks)")
    jlens.add_argument("--cotangents", type=int, default=JLensOptions.cotangents,
                       help="output directions per backward pass (memory: that many copies of "
                            "a window)")
    jlens.add_argument("--out", type=Path, default=None,
                       help="the new J-lens file (default: lenses/<model>.jlens.pt)")
    jlens.add_argument("--merge", type=Path, nargs="+", default=None, metavar="FILE",
                       help="merge these shards of one fit into --out instead of fitting")
    patch_command.add_parser(sub, options, MODEL_HELP)
    plot = sub.add_parser("plot", help="draw a run folder's pictures (again) from its artifacts")
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="e.g. runs/run-latest")
    plot.add_argument("--grid-colour", choices=GRID_COLOURS, default="entropy",
                      help="colour of the logit-lens grid: entropy (bits) or p(top-1)")
    report = sub.add_parser("report", help="one self-contained HTML page of a run folder")
    report.add_argument("run_dir", type=Path, help="a run folder, e.g. runs/run-latest")
    report.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report.html")
    return parser


def _load(args: argparse.Namespace, model: str | None, lens: str = "final-norm") -> ModelLens:
    device_map = None
    if args.device_map:
        device_map = read_device_map(args.device_map)
    return load(model, args.backend, lens, args.device, args.dtype,
                announce=lambda name, reason: print(f"backend: {name} ({reason})", flush=True),
                device_map=device_map)


def cmd_chat(args: argparse.Namespace) -> int:
    backend = _load(args, args.model).backend
    print(f"user: {args.prompt}\n{backend.info.name}: {chat(backend, args.prompt, args.max_tokens)}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from mlx_lens.checks.parity import BOUND_DESCRIPTION, compare

    lenses = [Lens(r) for r in RULES] if args.lens == "all" else [resolve_lens(args.lens)]
    source = resolve(args.model)
    reference, candidate = backend_choice.load("torch", source), backend_choice.load("mlx", source)
    failed = False
    for lens in lenses:
        report = compare(reference, candidate, args.prompt or [PROMPT], lens, args.answer)
        print(f"{source.name} [{report.architecture}], lens {lens.name}: torch (reference) "
              f"vs mlx; bounds: {BOUND_DESCRIPTION}")
        print(report.table())
        for line in report.failures():
            print(f"FAIL: {line}")
            failed = True
        for line in report.undecided():
            print(f"undecided: {line}")
        for i, p in enumerate(report.prompts):
            print(f"prompt {i}: torch {p.summaries[0]}, mlx {p.summaries[1]}")
    print("parity: FAILED" if failed else "parity: OK")
    return 1 if failed else 0


def cmd_self_test(args: argparse.Namespace) -> int:
    """Every model named, one after another (each released before the next loads)."""
    models = list(ORIGINAL_MODELS) if args.all else args.models or [None]
    failed = [model for model in models if not _self_test(args, model)]
    if len(models) > 1:
        print(f"self-test: {len(models) - len(failed)} of {len(models)} models passed"
              + (f"; FAIL: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _self_test(args: argparse.Namespace, model: str | None) -> bool:
    lens = _load(args, model)
    source, backend = lens.source, lens.backend
    rows = run_self_test(backend)
    print(f"self-test {source.name} [{backend.info.backend} {backend.info.device}]: norm scale "
          f"applied by the lens vs by hand, layers {self_test_layers(backend.info.n_layers)}")
    print(self_test_report(rows))
    passed = all(r.passed for r in rows)
    print("self-test: PASS" if passed else "self-test: FAIL")
    return passed


def run_single(args: argparse.Namespace, model: str | None, out_dir: Path | None,
               facts: list[Fact] | None = None) -> list[Path]:
    """One model end to end, written to out_dir (None: a pipeline rank other than 0, which
    computes its part and writes nothing)."""
    started = time.perf_counter()
    collapse = CollapseSettings(args.copy_threshold, args.copy_margin)
    test_prompts = None if args.test_prompts is None else tuple(args.test_prompts)
    ExperimentOptions(prompt=args.prompt, answer=args.answer, probes=args.probes,
                      test_prompts=test_prompts)  # bad input fails before loading
    lens = _load(args, model, args.lens)
    seconds = {"load": time.perf_counter() - started}
    milestones = MilestoneSettings(margin_bits=args.margin_bits)
    compared = args.lenses or ()
    steer = steering.load(args.steer, args.steer_scale) if args.steer else None
    result = lens.run(args.prompt, args.answer, args.probes, collapse, args.keep_residuals,
                      milestones, compared, args.mid, steer, test_prompts)
    seconds.update(result.seconds)
    if facts:
        began = time.perf_counter()
        suite = lens.run_suite(facts, collapse, milestones, compared, args.mid)
        seconds["suite"] = time.perf_counter() - began
        result.payload["diagnostics"].update(lens.backend.run_diagnostics())  # its traffic too
        if suite.numeric_health:  # which facts and layers were blanked, beside the run's own
            result.payload["diagnostics"]["suite_numeric_health"] = suite.numeric_health
    rank_line = lens.backend.run_report()  # a rank of a pipeline: its own line
    if out_dir is None:
        print(rank_line, flush=True)
        return []
    for line in (health.warning(result.payload["diagnostics"]),
                 framework_warning(result.payload["diagnostics"]["framework_check"]),
                 suite.health_warning() if facts else None):
        if line:
            print(f"mlx-lens: warning: {line}", file=sys.stderr)
    began = time.perf_counter()
    paths = write_model_artifacts(out_dir, lens.source.name, result)
    if facts:
        paths += write_suite_tables(out_dir, lens.source.name, suite.long, suite.per_fact,
                                    suite.aggregates)
        if suite.lens_long is not None:
            paths += write_suite_tables(out_dir, lens.source.name, suite.lens_long,
                                        suite.lens_per_fact, suite.lens_aggregates, "lens-")
    seconds["write"] = time.perf_counter() - began
    if args.plots:  # a picture that cannot be drawn costs one warning line, not the run
        began = time.perf_counter()
        paths += _draw_plots(out_dir, args.grid_colour)
        seconds["pictures"] = time.perf_counter() - began
    s = summary_of(result.payload)
    print(f"{s['model']} [{s['backend']} {s['device']} {s['dtype']}, lens {lens.lens.name}]: "
          f"final answer {s['answer']!r} (p={s['p']:.3f}); "
          + ", ".join(f"{key}={layer_or_never(s[key])}" for key in HEADLINE)
          + f" of {s['n_layers']} layers")
    print(f"  {describe(result.payload['diagnostics'])}")
    if "lenses" in result.payload:
        print(f"  {lens_summary_line(result.payload['lenses'])}")
    if facts:
        print(suite.summary_line())
    print(f"time: {time.perf_counter() - started:.2f} s ("
          + ", ".join(f"{name} {t:.2f} s" for name, t in seconds.items()) + ")")
    if rank_line:
        print(rank_line)
    return paths


def run_several(args: argparse.Namespace, models: list[str], out_dir: Path) -> list[ModelOutcome]:
    child = [a for dest, flag in _CHILD_OPTIONS for a in (flag, str(getattr(args, dest)))]
    child += ([] if args.probes else ["--no-probes"]) + (["--keep-residuals"] * args.keep_residuals)
    child += [f"--probe={p}" for p in args.test_prompts or ()]  # "=": a probe may start with "-"
    child += ["--facts", args.facts] if args.facts else []
    child += ["--lenses", args.lenses] if args.lenses else []
    child += ["--steer", str(args.steer), "--steer-scale", str(args.steer_scale)] if args.steer else []
    child += [] if args.mid else ["--no-mid-block"]
    child += ["--device-map", args.device_map] if args.device_map else []
    child += ["--no-plots"]  # the pictures of the whole folder are drawn once, at the end
    # One probe of the hub for the whole run: without one, every child starts in offline mode.
    offline = hub.unreachable() if any(_hub_id(model) for model in models) else None
    if offline:
        print(f"model hub: {offline}; hub ids are read from the local cache only", flush=True)
    outcomes = []
    for i, (model, name) in enumerate(zip(models, artifact_names(models)), 1):
        print(f"[{i}/{len(models)}] {model}", flush=True)
        outcomes.append(run_one_process(model, name, out_dir, child))
        print(f"[{i}/{len(models)}] {model}: {outcomes[-1].status}", flush=True)
    print(table(outcomes))
    return outcomes


def _hub_id(model: str) -> bool:
    try:
        return resolve(model).hub_id is not None
    except LensError:
        return False


def _draw_plots(out_dir: Path, colour: str) -> list[Path]:
    """The run's pictures; failing to draw them costs the pictures, never the artifacts."""
    try:
        from mlx_lens.view.run_folder import draw_run_dir  # matplotlib is imported only to draw

        return draw_run_dir(out_dir, colour)
    except Exception as exc:
        reason = first_line(exc) if isinstance(exc, LensError) else one_line(exc)
        print(f"mlx-lens: warning: no pictures drawn: {reason}", file=sys.stderr)
        return []


def cmd_plot(args: argparse.Namespace) -> int:
    from mlx_lens.view.run_folder import draw_run_dir

    for path in draw_run_dir(args.run_dir, args.grid_colour):
        print(f"  wrote {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.self_test:
        return cmd_self_test(args)
    facts = load_facts(args.facts) if args.facts else None  # a bad file fails before anything
    if args.lenses:  # as does an unknown lens
        resolve_lenses(args.lenses, resolve_lens(args.lens))
    if args.steer:  # and a broken steering file
        if args.facts:
            raise LensError("--steer steers the single-prompt run; a fact suite is not steered "
                            "(run them apart)")
        steering.load(args.steer)
    models = list(ORIGINAL_MODELS) if args.all else args.models or [None]
    if "MLX_RANK" in os.environ:  # one of the processes of mlx.launch: a pipeline (docs/distributed.md)
        if len(models) > 1 or args.keep_residuals:
            raise LensError("a run split across processes takes one model and keeps no residuals")
        if os.environ["MLX_RANK"] != "0":  # computes its slice; rank 0 writes everything
            run_single(args, models[0], None, facts)
            return 0
    code = 0

    def make(out_dir: Path) -> list[Path]:
        nonlocal code
        if len(models) == 1:  # its pictures are drawn as one of its timed phases
            return run_single(args, models[0], out_dir, facts)
        outcomes = run_several(args, models, out_dir)
        code = 1 if any(o.status.startswith("failed") for o in outcomes) else 0
        paths = sorted([*out_dir.glob("output-*"), *out_dir.glob("suite-*")])
        if not paths:
            raise NothingProduced(f"none of the {len(models)} models produced artifacts")
        if args.plots:  # the whole folder's, the overlay included, once every model is done
            paths += _draw_plots(out_dir, args.grid_colour)
        return paths

    paths = run_dir.produce(args.out_dir, make)
    for path in paths:
        print(f"  wrote {path}")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from mlx_lens.view.report import write_report

    print(f"  wrote {write_report(args.run_dir, args.out)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from mlx_lens.tuned import jlens_file, lens_file
    from mlx_lens.tuned.corpus import documents
    from mlx_lens.view.tuned import write_eval

    for name in ("steps", "tokens_per_step", "eval_tokens"):
        if getattr(args, name) < 1:
            raise LensError(f"--{name.replace('_', '-')} must be at least 1")
    if args.seq_len is not None and args.seq_len < 2:
        raise LensError("--seq-len must be at least 2 (a next token to predict)")
    # A broken lens or corpus fails before the model is loaded.
    tuned = lens_file.read(args.eval) if args.eval else None
    if args.jlens is not None and tuned is None:
        raise LensError("--jlens goes with --eval DIR (a tuned lens to compare it with)")
    jlens = jlens_file.read(args.jlens) if args.jlens else None
    if args.corpus is not None:
        documents(args.corpus)
    loaded = _load(args, args.model)
    info, started = loaded.backend.info, time.perf_counter()
    if tuned is not None:
        frame = loaded.evaluate(tuned, args.corpus, args.seq_len, args.eval_tokens, jlens)
        also = f" and J-lens {args.jlens}" if jlens else ""
        print(f"{info.name}: logit lens vs tuned lens {args.eval}{also}, held-out text "
              f"({int(frame.tokens[0])} tokens), bits per token: kl_* {KL_TUNED}, ce_* the "
              "next token's cross-entropy")
        print(frame.drop(columns="tokens").to_string(index=False, float_format="%.3f"))
        for path in write_eval(frame, args.eval, info.name):
            print(f"  wrote {path}")
        return 0
    opts = TuneOptions(args.steps, args.tokens_per_step, args.seq_len or TuneOptions.seq_len,
                       args.corpus)
    out = args.out or Path("lenses") / loaded.source.name
    print(f"tune: {info.n_layers} translators of {info.d_model}x{info.d_model} on "
          f"{args.corpus or 'pydoc-topics'}, {opts.steps} steps of {opts.step_tokens} tokens "
          f"(sequences of {opts.seq_len})", flush=True)
    lens = loaded.tune(out, args.corpus, opts)
    seconds = time.perf_counter() - started
    print(f"  wrote {lens.path} in {seconds:.0f} s; evaluate it: mlx-lens tune --eval {lens.path}")
    return 0


def cmd_jlens(args: argparse.Namespace) -> int:
    from mlx_lens.tuned import jlens_fit
    from mlx_lens.tuned.corpus import documents

    if args.merge:
        if args.out is None:
            raise LensError("--merge needs --out, the merged file")
        lens = jlens_fit.merge(args.merge, args.out)
        print(f"  wrote {lens.path}: {lens.n_prompts} windows from {len(args.merge)} shards")
        return 0
    opts = JLensOptions(args.windows, args.first, args.seq_len, args.skip, args.cotangents,
                        args.corpus)
    opts.check()  # before the (slow) load, as a broken corpus
    if args.corpus is not None:
        documents(args.corpus)
    loaded = _load(args, args.model)
    info, started = loaded.backend.info, time.perf_counter()
    out = args.out or Path("lenses") / f"{loaded.source.name}.jlens.pt"
    print(f"jlens: J of {info.n_layers - 1} block outputs, {info.d_model}x{info.d_model}, on "
          f"{args.corpus or 'pydoc-topics'}: {opts.windows} windows of {opts.seq_len} tokens, "
          f"{opts.cotangents} directions per backward pass", flush=True)
    lens = loaded.jlens(out, args.corpus, opts)
    seconds = time.perf_counter() - started
    print(f"  wrote {lens.path} in {seconds:.0f} s; read it: mlx-lens run --lens jlens:{lens.path}")
    return 0


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that the same cleanup runs (no staging left)."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        commands = {"run": cmd_run, "chat": cmd_chat, "parity": cmd_parity, "report": cmd_report,
                    "plot": cmd_plot, "tune": cmd_tune, "jlens": cmd_jlens,
                    "patch": lambda a: patch_command.cmd_patch(a, _load)}
        return commands[args.command](args)
    except LensError as exc:  # one line for users; MLX_LENS_DEBUG=1 shows the whole chain
        if os.environ.get("MLX_LENS_DEBUG"):
            raise
        print(f"mlx-lens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mlx-lens: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("mlx-lens: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports it
    except Exception as exc:  # one line, not a traceback wall; MLX_LENS_DEBUG=1 shows it
        if os.environ.get("MLX_LENS_DEBUG"):
            raise
        print(f"mlx-lens: error: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may run inside another program


def command(argv: list[str] | None = None) -> int:
    """The `mlx-lens` command (console script and `python -m mlx_lens.cli`): main(), then a
    quick exit. The process ends right after, and the interpreter's shutdown would otherwise
    run its cycle collector over every object torch and transformers made (0.85 s of a run on
    a 2-core CPU, scripts/bench_run.py); frozen, the collector skips them and the operating
    system reclaims what cycles still hold. Not for main() called in-process (tests,
    notebooks), whose process goes on."""
    code = main(argv)
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(command())
