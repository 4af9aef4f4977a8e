"""`mlx-lens report`: a run folder as one self-contained HTML page.

The page must open from disk anywhere and travel as one file (mail, a chat, an archive), so
plots are embedded as data URIs and nothing is fetched: no external scripts, stylesheets, fonts
or images. One inline script drives the lens grid (mlx_lens/view/lens_grid.py), when a run has
one. Every string from the artifacts (prompts, tokens, file names) is escaped; prompts and
tokens are model input and output, so they may hold markup.
"""
from __future__ import annotations

import base64
import html
import json
import math
import numbers
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from mlx_lens.core.contract import KL_TO_FINAL
from mlx_lens.core.files import atomic_write
from mlx_lens.output.artifacts import read_csv
from mlx_lens.core.errors import LensError, first_line
from mlx_lens.view import lens_grid
from mlx_lens.output.suite_tables import read_suite_table

MAX_FACT_ROWS = 500  # a page to read, not a data dump: a larger suite's rows stay in its CSV
TOP_K_SHOWN = 5  # of the 20 candidates per layer in the next-token CSV

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222}
h2{border-top:2px solid #888;padding-top:.6em;margin-top:2em}
.scroll{overflow-x:auto;margin-bottom:1em}
table{border-collapse:collapse}
th,td{border:1px solid #bbb;padding:2px 6px;text-align:left;vertical-align:top;
white-space:pre-wrap}
th{background:#eee}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.k{white-space:nowrap}
td.p{min-width:18em}
.t{font-family:ui-monospace,Menlo,Consolas,monospace;background:#f3f3f3}
.note{color:#444;max-width:60em}
figure{margin:1em 0}
img{max-width:100%;height:auto;border:1px solid #ddd}
"""


class Html(str):
    """Markup built here from escaped parts; inserted as is."""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _visible(token: str) -> str:
    """A token's whitespace as visible marks: ' Berlin' and 'Berlin' are different tokens."""
    return (token.replace(" ", "\u2423").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\t", "\\t"))


def _token(token) -> Html:
    """A token in monospace; "" (no token: a blanked row) stays empty."""
    if _missing(token):
        return Html("–")
    if token == "":
        return Html("")
    return Html(f'<span class="t">{_esc(_visible(str(token)))}</span>')


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _fmt(value) -> str:
    """One cell's text: '–' for a missing value, ✓ for a set flag, 3 significant digits."""
    if _missing(value):
        return "–"
    if isinstance(value, bool):
        return "✓" if value else ""
    if isinstance(value, float):
        # integral floats are counts or layers read back from CSV (ranks can exceed 3 digits)
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.3g}"
    return str(value)


def _candidates(pairs) -> Html:
    """[[token, p], ...] as 'token (p)' items."""
    return Html(", ".join(f"{_token(t)} ({_esc(_fmt(p))})" for t, p in pairs))


def _cell(value, css: str = "") -> str:
    if isinstance(value, Html):
        return f'<td class="{css}">{value}</td>' if css else f"<td>{value}</td>"
    if isinstance(value, numbers.Number) and not isinstance(value, bool) or _missing(value):
        css = css or "n"  # numbers right-aligned, so that digits line up
    cls = f' class="{css}"' if css else ""
    return f"<td{cls}>{_esc(_fmt(value))}</td>"


def _table(header: list[str], rows: list[list], css: dict[str, str] | None = None) -> str:
    """A plain table in a horizontally scrolling box; css maps a column to its cells' class."""
    css = css or {}
    # long column names (first_kl_below_0.5) may break after an underscore
    head = "".join(f"<th>{_esc(h).replace('_', '_<wbr>')}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(_cell(v, css.get(h, "")) for h, v in zip(header, row))
                     + "</tr>" for row in rows)
    return f'<div class="scroll"><table>\n<tr>{head}</tr>\n{body}\n</table></div>'


def _fields(rows: list[list]) -> str:
    """A two-column name/value table; values as text, so that they all align left."""
    return _table(["", "value"], [[name, v if isinstance(v, Html) else _fmt(v)] for name, v in rows])


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


@contextmanager
def _reading(path: Path):
    """Any failure to read or interpret one artifact becomes one line naming it."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = first_line(exc)
        if isinstance(exc, KeyError):
            reason = f"missing {reason}"
        raise LensError(f"cannot read {path}: {reason}") from exc


# -- per model ---------------------------------------------------------------------------------

_SUMMARY_NOTE = (
    "Layer 0 is the embedding output, layer i the residual after block i-1. Row 0 is the "
    "embedding: through a tied head it echoes its input token (embedding_echo), so copy "
    "detection proper (L_copy_strict_k, L_copy_soft_k) starts at row 1. L_semantic: first layer "
    "whose top-1 is the answer. The original's rules, from row 0: L_copy, first layer whose "
    "top-1 is a prompt token above the copy threshold and margin, or whose entropy is below "
    "entropy_bits (any confident layer, the answer included); L_copy_H: first layer with "
    "entropy at most entropy_bits; delta_layers = L_semantic - L_copy. "
    f"KL is {KL_TO_FINAL}, the layer's distribution against the final layer's, in "
    "bits. – means it never happened. "
    "The whole answer is scored teacher-forced (each piece at its own position): "
    "L_answer_top1 is the first layer where every piece is the top-1; L_answer_confirmed (and "
    "L_semantic_confirmed, for the first piece) the first layer where every piece leads the "
    "runner-up by more than margin_bits at `consecutive` layers in a row (2 by default); a "
    "lead is z(piece) - z(best other) in bits. 'undecided': a lead within the decode's "
    "numeric bound of the rule's threshold, or a blanked row, could change the layer; a "
    "decided layer is decided for this run's captured rows only: the bound covers the fp32 "
    "decode of a row, not the forward pass that made it, and another batch shape or backend "
    "can move a row by more.")
_SETTINGS_NOTE = (
    "How this run was computed. summation_depth fixes the error bound of every statistic "
    "(docs/numerics.md); non-finite layers were blanked (their cells read –).")
_PURE_NOTE = (
    "One row per layer, at the position of the next token (the prompt's last). Entropy and "
    f"kl_to_final_bits, {KL_TO_FINAL}, are in bits; topN is the Nth most likely token with "
    "its probability (␣ marks a space); p_answer and answer_rank are the answer's first "
    "token's; answer_log2p is the whole answer's log2 probability (teacher-forced), "
    "answer_min_lead_bits its weakest piece's lead over the runner-up, answer_top1 whether "
    "every piece is the top-1; ✓ marks a set flag.")
_PROBES_NOTE = (
    "The model's own output (last layer only) for other prompts: entropy in bits and the top "
    "candidates with their probabilities.")
_TEMPERATURE_NOTE = (
    "The main prompt's final distribution, softmax(logits / T), for each temperature T: entropy "
    "in bits and the top candidates.")


def _summary(payload: dict) -> str:
    d = payload["diagnostics"]
    top = (payload["final_prediction"]["topk"] or [[None, None]])[0]
    n_layers = payload.get("model_stats", {}).get("num_layers")
    rows = [["prompt", payload["prompt"]["context_prompt"]],
            ["answer (its first piece)", Html(f"{_esc(d.get('answer', ''))} "
                                           f"({_token(d.get('answer_token'))})")],
            ["final top-1 (p)", Html(f"{_token(top[0])} ({_esc(_fmt(top[1]))})")],
            ["layers", n_layers]]
    if "answer_pieces" in d:  # runs from before full-answer scoring have none of these
        rows += [[key, d.get(key)] for key in ("embedding_echo", "L_copy_strict_k1",
                                               "L_copy_strict_k2", "L_copy_strict_k3",
                                               "L_copy_soft_k1", "L_copy_soft_k2",
                                               "L_copy_soft_k3")]
    rows += [[key, _with_lead(d, key)] for key in (
        "L_semantic", "first_kl_below_0.5", "first_kl_below_1.0", "first_rank_le_1",
        "first_rank_le_5", "first_rank_le_10")]
    if "answer_pieces" in d:
        rows += [["answer pieces", Html(" ".join(_token(t) for t in d["answer_pieces"]))]]
        rows += [[key, _with_lead(d, key)] for key in (
            "L_answer_top1", "L_answer_confirmed", "L_semantic_confirmed")]
        rows += [["margin_bits", d.get("margin_bits")]]
    rows += [[f"{key} (the original's rule, from row 0)", d.get(key)]
             for key in ("L_copy", "L_copy_H", "delta_layers")]
    return "<h3>Summary</h3>" + _note(_SUMMARY_NOTE) + _fields(rows)


def _with_lead(d: dict, key: str) -> str | None:
    """A milestone with its lead where it has one: 'layer (lead x bits)', 'undecided', or
    None (never)."""
    value, lead = d.get(key), d.get(f"{key}_lead_bits")
    if isinstance(value, int) and lead is not None:
        return f"{value} (lead {_fmt(lead)} bits)"
    return value


def _settings(payload: dict) -> str:
    d = payload["diagnostics"]

    def layers(key):
        if key not in d:  # runs from before the numeric-health check
            return None
        return ", ".join(map(str, d[key])) or "none"

    backend = d.get("backend")
    if "backend_reason" in d:
        backend = f"{backend} ({d['backend_reason']})"
    norms = ", ".join(f"{k}: {v}" for k, v in d.get("norm_types", {}).items())
    stats = payload.get("model_stats", {})
    rows = [["model", d.get("model")], ["architecture", d.get("architecture")],
            ["backend", backend], ["device", d.get("device")],
            ["compute_dtype", d.get("compute_dtype")], ["unembed_dtype", d.get("unembed_dtype")],
            ["lens", d.get("lens")], ["norms", norms or None],
            ["copy_threshold", d.get("copy_threshold")], ["copy_margin", d.get("copy_margin")],
            ["entropy_bits", d.get("entropy_bits")],
            ["summation_depth", d.get("summation_depth")],
            ["non-finite residual layers", layers("nonfinite_residual_layers")],
            ["non-finite lens layers", layers("nonfinite_lens_layers")],
            [f"{KL_TO_FINAL} below its bound at layers", layers("kl_below_bound_layers")],
            ["last row vs the framework's own output", _framework(d.get("framework_check"))]]
    rows += [[key, value] for key, value in stats.items() if key != "architecture"]
    return "<h3>Settings</h3>" + _note(_SETTINGS_NOTE) + _fields(rows)


def _framework(check: dict | None) -> str | None:
    if not check:
        return None
    if not check.get("available"):
        return f"not checked: {check.get('why')}"
    verdict = "within" if check["within_bound"] else "BEYOND"
    return (f"{check['framework']}: KL(lens || {check['framework']}) {_fmt(check['kl_bits'])} "
            "bits (bound "
            f"{_fmt(check['kl_bound_bits'])}), max |Δ log p| {_fmt(check['max_abs_delta_logp'])} "
            f"(bound {_fmt(check['delta_logp_bound'])}): {verdict} the derived bound")


def _pure(path: Path) -> str:
    ks = range(1, TOP_K_SHOWN + 1)
    scores = ["p_answer", "answer_rank", "answer_log2p", "answer_min_lead_bits", "answer_top1",
              "kl_to_final_bits", "cos_to_final", "copy_collapse", "entropy_collapse",
              "is_answer"]
    with _reading(path):
        frame = read_csv(path)
        scores = [c for c in scores if c in frame.columns]  # older runs lack the answer's
        records = frame.astype(object).to_dict("records")
        rows = [[r["layer"], r["entropy"],
                 *(Html(f"{_token(r[f'top{k}'])} {_esc(_fmt(r[f'prob{k}']))}") for k in ks),
                 *(r[c] for c in scores)] for r in records]
    header = ["layer", "entropy", *(f"top{k}" for k in ks), *scores]
    css = {f"top{k}": "k" for k in ks}  # a token and its p on one line
    return "<h3>Next token, per layer</h3>" + _note(_PURE_NOTE) + _table(header, rows, css)


def _probes(payload: dict) -> str:
    out = ""
    if payload.get("test_prompts"):
        rows = [[p["prompt"], p["entropy"], _candidates(p["topk"])] for p in payload["test_prompts"]]
        out += ("<h3>Test prompts</h3>" + _note(_PROBES_NOTE)
                + _table(["prompt", "entropy", "top candidates"], rows, {"prompt": "p"}))
    elif payload["diagnostics"].get("test_prompts_source", "").startswith("none"):
        out += "<h3>Test prompts</h3>" + _note(payload["diagnostics"]["test_prompts_source"])
    if payload.get("temperature_exploration"):
        rows = [[t["temperature"], t["entropy"], _candidates(t["topk"])]
                for t in payload["temperature_exploration"]]
        out += ("<h3>Temperature exploration</h3>" + _note(_TEMPERATURE_NOTE)
                + _table(["temperature", "entropy", "top candidates"], rows))
    return out


# -- fact suites -------------------------------------------------------------------------------

_FACTS_NOTE = (
    "One row per fact: the same summary layers as above for the fact's prompt, the final top-1 "
    "with its probability, whether it is the answer token (correct), and the first layer where "
    "the answer beats the control answer on the control prompt. – : never (or no control).")
_AGGREGATES_NOTE = (
    "One row per group and layer: for each metric the mean over facts and its 95% bootstrap "
    f"interval [low, high]. Entropy and KL ({KL_TO_FINAL}) are in bits, log10_rank is the "
    "answer's rank as a power of ten; n counts facts (control metrics only count facts with a control).")
_TOKEN_COLUMNS = ("answer_token", "final_top1", "top1")


def _facts(path: Path, model: str) -> str:
    with _reading(path):
        frame = read_suite_table(path)
        shown = frame.head(MAX_FACT_ROWS)
        columns = list(frame.columns)
        rows = [[_token(v) if c in _TOKEN_COLUMNS else v for c, v in zip(columns, row)]
                for row in shown.astype(object).values.tolist()]
    note = _FACTS_NOTE
    if len(frame) > len(shown):
        note += (f" Showing the first {len(shown)} of {len(frame)} facts; all are in "
                 f"suite-{model}-facts.csv.")
    return f"<h3>Fact suite: {len(frame)} facts</h3>" + _note(note) + _table(
        columns, rows, {"prompt": "p"})


def _aggregates(path: Path) -> str:
    with _reading(path):
        frame = read_suite_table(path)
        metrics = list(dict.fromkeys(frame["metric"]))
        rows = []
        for (group, layer), part in frame.groupby(["group", "layer"], sort=False):
            by_metric = part.set_index("metric")
            cells = []
            for m in metrics:
                if m not in by_metric.index or by_metric.at[m, "n"] == 0:
                    cells.append(None)
                    continue
                mean, low, high = (by_metric.at[m, c] for c in ("mean", "ci_low", "ci_high"))
                cells.append(f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]")
            rows.append([group, layer, int(part["n"].max()), *cells])
    css = dict.fromkeys(metrics, "n")
    note = _AGGREGATES_NOTE
    if "ci_unit" in frame and (frame["ci_unit"] == "cluster").any():
        note += (f" The bootstrap draws clusters of facts ({int(frame['n_clusters'].max())}), "
                 "not facts: a cluster's facts are not independent.")
    return ("<h3>Fact suite: per-layer aggregates</h3>" + _note(note)
            + _table(["group", "layer", "n", *metrics], rows, css))


# -- the page ----------------------------------------------------------------------------------

def _plot(path: Path) -> str:
    with _reading(path):
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = _esc(path.name)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
            f"<figcaption>{name}</figcaption></figure>")


def _model_of(plot: Path, models: list[str]) -> str | None:
    """The model a plot-<model>-<kind>.png belongs to (the longest name that fits: model names
    may hold dashes and prefix one another); None for a plot of the whole run."""
    fits = [m for m in models if plot.name.startswith(f"plot-{m}-")]
    return max(fits, key=len) if fits else None


def _model_names(run_dir: Path) -> list[str]:
    names = {p.name[len("output-"):-len(".json")] for p in run_dir.glob("output-*.json")}
    for kind in ("facts", "aggregates"):
        suffix = f"-{kind}.csv"
        names |= {p.name[len("suite-"):-len(suffix)] for p in run_dir.glob(f"suite-*{suffix}")}
    # suite-<model>-lens-facts.csv (--lenses with --facts) is <model>'s, not a model "<model>-lens"
    return sorted(n for n in names if n.removesuffix("-lens") == n
                  or n.removesuffix("-lens") not in names)


def _model_section(run_dir: Path, model: str, index: int, plots: list[Path]) -> str:
    parts = [f'<h2 id="model-{index}">{_esc(model)}</h2>']
    json_path = run_dir / f"output-{model}.json"
    payload = None
    if json_path.is_file():
        with _reading(json_path):
            payload = json.loads(json_path.read_text(encoding="utf-8"))
            if not isinstance(payload, dict) or "diagnostics" not in payload:
                raise ValueError("not an mlx-lens output JSON (no diagnostics)")
            parts += [_summary(payload), _settings(payload)]
    parts += [_plot(p) for p in plots]
    pure = run_dir / f"output-{model}-pure-next-token.csv"
    if pure.is_file():
        parts.append(_pure(pure))
    if payload is not None:
        with _reading(json_path):
            parts.append(_probes(payload))
    cells = run_dir / f"output-{model}-lens-cells.csv"
    if cells.is_file():
        parts.append(_grid(cells, run_dir / f"output-{model}-lenses.csv", payload, index))
    for kind, render in (("facts", lambda p: _facts(p, model)), ("aggregates", _aggregates)):
        path = run_dir / f"suite-{model}-{kind}.csv"
        if path.is_file():
            parts.append(render(path))
    return "\n".join(parts)


def _grid(cells: Path, lenses: Path, payload: dict | None, index: int) -> str:
    """The interactive logit-lens grid (mlx_lens/view/lens_grid.py); the lenses table, when
    there, marks where the answer is the top-1."""
    table = None
    if lenses.is_file():
        with _reading(lenses):
            table = read_csv(lenses)
    with _reading(cells):
        return lens_grid.lens_grid_section(read_csv(cells), table, payload, str(index))


def render_report(run_dir: Path) -> str:
    """The report page of a run folder, as HTML text."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LensError(f"not a folder: {run_dir}")
    models = _model_names(run_dir)
    plots = sorted(run_dir.glob("plot-*.png"))
    if not models and not plots:
        raise LensError(f"no mlx-lens artifacts in {run_dir}")
    owner = {p: _model_of(p, models) for p in plots}
    title = f"mlx-lens report: {run_dir.resolve().name}"
    nav = "".join(f'<li><a href="#model-{i}">{_esc(m)}</a></li>' for i, m in enumerate(models))
    sections = [_model_section(run_dir, m, i, [p for p in plots if owner[p] == m])
                for i, m in enumerate(models)]
    grid = any(lens_grid.MARK in s for s in sections)  # its style and script, once per page
    body = [f"<h1>{_esc(title)}</h1>",
            f"<p>Run folder <code>{_esc(run_dir.resolve())}</code>. Per model: summary, "
            f"settings, plots, the next-token table per layer, probes, the lens grid, fact suite.</p>",
            f"<ul>{nav}</ul>" if nav else "",
            *(_plot(p) for p in plots if owner[p] is None),
            *sections, f"<script>{lens_grid.SCRIPT}</script>" if grid else ""]
    css = _CSS + (lens_grid.CSS if grid else "")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{css}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of run_dir to out (default run_dir/report.html) atomically; its path."""
    text = render_report(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    if out.is_dir():
        raise LensError(f"{out} is a folder: name the report's file")
    atomic_write(out, lambda p: p.write_text(text, encoding="utf-8"))
    return out
