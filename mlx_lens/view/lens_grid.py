"""The report's interactive logit-lens grid: per model, layers by prompt positions, each cell its
top-1 token coloured by its probability, with a switch of lens and the middle of each block.

A static table would have to pick one lens and one site out of several (lenses × sites × rows ×
positions × top-k), so the cells travel as compact JSON inside the page and one inline script
(SCRIPT, once per page) draws the chosen view. The page stays one file that fetches nothing.
Tokens are model output and may hold markup: the JSON escapes "<" so that no token can end its
script element, and the script inserts all text with textContent, never as markup.
"""
from __future__ import annotations

import html
import json

import pandas as pd

MARK = 'class="lens-grid"'  # a section holding a grid (escaped data cannot spell it)
NOTE = (
    "Rows are layers, the last at the top: row 0 is the embedding, row i the residual after "
    "block i-1; columns are the prompt's positions, headed by their input tokens (␣ marks a "
    "space). Each cell shows what the lens decodes there, its top-1, shaded by its probability "
    "(darker: likelier); hover a cell for its top tokens. An outlined cell at the last position: "
    "the whole answer is the lens's top-1 there. Append #lens=NAME&mid=1 to the page's address "
    "to open a view.")
CSS = """
.lg-ctl{margin:.4em 0}.lg-ctl label{margin-right:1.2em}.lg-box{overflow:auto;max-height:85vh}
.lg-box table{border-collapse:separate;border-spacing:0;font:12px/1.3 ui-monospace,Menlo,monospace}
.lg-box td,.lg-box th{border:0;border-right:1px solid #fff;border-bottom:1px solid #fff;
padding:1px 4px;white-space:pre;max-width:7em;overflow:hidden;text-overflow:ellipsis}
.lg-box thead th{position:sticky;top:0;z-index:2;background:#eee;vertical-align:bottom}
.lg-box tbody th{position:sticky;left:0;z-index:1;background:#eee;text-align:right}
.lg-box tr.mid th{color:#777;font-weight:normal}.lg-box td.ans{outline:2px solid #e65c00;
outline-offset:-2px;font-weight:bold}.lg-box thead small{color:#777;font-weight:normal}
.lg-tip{position:fixed;z-index:9;background:#fff;border:1px solid #888;padding:4px 8px;
font:12px/1.4 ui-monospace,Menlo,monospace;box-shadow:0 2px 6px #0003;pointer-events:none}
.lg-tip td{border:0;padding:0 6px 0 0}
.lg-key{font:12px ui-monospace,Menlo,monospace;padding:0 3px;border:1px solid #ccc}
"""
SCRIPT = r"""(() => {
const vis = t => t.replace(/ /g, "\u2423").replace(/\n/g, "\\n").replace(/\r/g, "\\r")
  .replace(/\t/g, "\\t");
const el = (tag, text, cls) => { const e = document.createElement(tag);
  if (text != null) e.textContent = text; if (cls) e.className = cls; return e; };
const paint = (e, p) => { const light = p == null ? 100 : 97 - 62 * p;  // one hue, darker: likelier
  e.style.background = "hsl(215,65%," + light + "%)"; e.style.color = light < 62 ? "#fff" : "#111";
  return e; };
const fmt = p => p == null ? "\u2013" : p.toPrecision(3);
const want = new URLSearchParams(location.hash.slice(1));
const tip = el("div", null, "lg-tip"); tip.hidden = true; document.body.append(tip);
for (const root of document.querySelectorAll(".lens-grid")) {
  const d = JSON.parse(document.getElementById(root.dataset.src).textContent);
  const sel = el("select"), mid = el("input"), note = el("span", " (this lens has no mid rows)");
  mid.type = "checkbox"; mid.checked = want.get("mid") === "1";
  d.lenses.forEach((n, i) => sel.append(new Option(i ? n : n + " (primary)", n)));
  if (d.lenses.includes(want.get("lens"))) sel.value = want.get("lens");
  const l1 = el("label", "lens "), l2 = el("label"), key = el("span", "top-1 p: ");
  l1.append(sel); l2.append(mid, " middle of each block", note);
  for (const p of [0, .25, .5, .75, 1]) key.append(paint(el("span", " " + p + " ", "lg-key"), p));
  const ctl = el("div", null, "lg-ctl"), box = el("div", null, "lg-box");
  ctl.append(l1, l2, key); root.replaceChildren(ctl, box);
  const draw = () => {
    const g = d.grids[sel.value], hasMid = !!g.mid;
    mid.disabled = !hasMid; note.hidden = hasMid;
    const rows = [];  // [depth, label, site, row index]
    g.resid.layers.forEach((l, r) => rows.push([l, String(l), "resid", r]));
    if (hasMid && mid.checked) g.mid.layers.forEach((l, r) => rows.push([l + .5, l + "\u00bd",
      "mid", r]));
    rows.sort((a, b) => b[0] - a[0]);
    const table = el("table"), head = el("tr"), body = el("tbody");
    head.append(el("th", "layer"));
    d.inputs.forEach((t, j) => { const th = el("th");
      th.append(el("small", String(j)), el("br"), vis(t));
      th.title = "position " + j + ": " + vis(t); head.append(th); });
    table.append(el("thead"), body); table.tHead.append(head);
    for (const [, label, site, r] of rows) {
      const tr = el("tr", null, site === "mid" ? "mid" : ""), ans = g[site].answer || [];
      tr.append(el("th", label + (site === "mid" ? " mid" : "")));
      g[site].cells[r].forEach((c, j) => {
        const td = paint(el("td", c ? vis(d.strings[c[0][0]]) : ""), c ? c[1][0] : null);
        if (j === d.inputs.length - 1 && ans.includes(g[site].layers[r])) td.className = "ans";
        td.dataset.cell = [site, r, j, label].join("|"); tr.append(td); });
      body.append(tr);
    }
    box.replaceChildren(table);
  };
  const link = () => {  // the address names the view, to be linked
    try { history.replaceState(null, "", "#lens=" + encodeURIComponent(sel.value) + "&mid="
      + (mid.checked ? 1 : 0)); } catch (e) { /* some browsers refuse it for a file */ }
  };
  box.addEventListener("mousemove", ev => {
    const td = ev.target.closest("td[data-cell]");
    if (!td) { tip.hidden = true; return; }
    const [site, r, j, label] = td.dataset.cell.split("|"), c = d.grids[sel.value][site].cells[+r][+j];
    const t = el("table");
    (c ? c[0] : []).forEach((s, k) => { const tr = el("tr"); tr.append(el("td", String(k + 1)),
      el("td", vis(d.strings[s])), el("td", fmt(c[1][k]))); t.append(tr); });
    tip.replaceChildren(el("b", sel.value + ", layer " + label + (site === "mid" ? " (mid)" : "")),
      el("div", "position " + j + ", input " + vis(d.inputs[+j])), t);
    tip.hidden = false;
    const x = Math.min(ev.clientX + 14, innerWidth - tip.offsetWidth - 4);
    const y = Math.min(ev.clientY + 14, innerHeight - tip.offsetHeight - 4);
    tip.style.left = x + "px"; tip.style.top = y + "px"; });
  box.addEventListener("mouseleave", () => { tip.hidden = true; });
  for (const c of [sel, mid]) c.addEventListener("change", () => { draw(); link(); });
  draw();
}
})();"""


def _grid_data(cells: pd.DataFrame, lenses: pd.DataFrame | None, payload: dict | None) -> dict:
    """{lenses, inputs, strings, grids: {lens: {site: {layers, cells, answer}}}}; a cell is
    [[string index per rank], [p per rank]] (p to 4 digits) or null. Every token string once."""
    listed = ((payload or {}).get("lenses") or {}).get("lenses") or []
    names = list(dict.fromkeys(cells["lens"]))
    order = [n for n in listed if n in names] + [n for n in names if n not in listed]
    by_pos = dict(zip(cells["pos"].astype(int), cells["input_token"]))
    n_pos = max(by_pos) + 1
    inputs = [by_pos.get(pos, "") for pos in range(n_pos)]
    strings: dict[str, int] = {}
    found: dict = {}  # lens -> site -> layer -> pos -> ([string], [p])
    frame = cells.sort_values(["lens", "site", "layer", "pos", "rank"])
    for lens, site, layer, pos, token, p in frame[["lens", "site", "layer", "pos", "token",
                                                   "p"]].itertuples(index=False):
        cell = found.setdefault(lens, {}).setdefault(site, {}).setdefault(int(layer), {})
        ids, ps = cell.setdefault(int(pos), ([], []))
        ids.append(strings.setdefault(token, len(strings)))
        ps.append(None if pd.isna(p) else float(f"{p:.4g}"))
    grids = {lens: {site: {"layers": sorted(rows), "cells": [
        [list(rows[layer][pos]) if pos in rows[layer] else None for pos in range(n_pos)]
        for layer in sorted(rows)]} for site, rows in sites.items()} for lens, sites in found.items()}
    if lenses is not None and "answer_top1" in lenses.columns:
        top = lenses[lenses["answer_top1"].astype(object).eq(True)]
        for lens, site, layer in zip(top["lens"], top["site"], top["layer"]):
            if site in grids.get(lens, {}):
                grids[lens][site].setdefault("answer", []).append(int(layer))
    return {"lenses": order, "inputs": inputs, "strings": list(strings), "grids": grids}


def lens_grid_section(cells: pd.DataFrame, lenses: pd.DataFrame | None, payload: dict | None,
                      ident: str) -> str:
    """The grid of one model's lens-cells table (its lenses table, when given, marks where the
    answer is the top-1): a heading, a note, an empty box SCRIPT fills, and the data. ident makes
    the element ids unique on the page. The page needs CSS in its style and SCRIPT at its end."""
    if cells.empty:
        return '<h3>Logit-lens grid</h3><p class="note">The lens-cells table has no rows.</p>'
    data = _grid_data(cells, lenses, payload)
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    mid_are = ((payload or {}).get("lenses") or {}).get("mid_rows_are")
    note = NOTE + (f" A mid row i½ is the middle of block i: {mid_are}." if mid_are else "")
    return (f'<h3>Logit-lens grid</h3><p class="note">{html.escape(note)}</p>'
            f'<div {MARK} id="lens-grid-{ident}" data-src="lens-grid-data-{ident}">'
            "<p>The grid needs JavaScript.</p></div>"
            f'<script type="application/json" id="lens-grid-data-{ident}">{text}</script>')
