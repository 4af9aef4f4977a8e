"""`mlx-lens report`: one self-contained, escaped HTML page from a real tiny-model run folder."""
from __future__ import annotations

import base64
import json
import shutil
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mlx_lens.view import report as report_module
from mlx_lens.cli.main import main

SCRIPT = "<script>alert(1)</script>"
FACTS = [
    {"id": "fr", "prompt": "The capital of France is", "answer": "Paris", "group": "a"},
    {"id": "odd", "prompt": f'Say {SCRIPT} & "quoted"\nnow', "answer": "x", "group": "b"},
    {"id": "de", "prompt": "The capital of Germany is", "answer": "Berlin", "group": "a",
     "control_prompt": "The capital of France is", "control_answer": "Paris"},
]
VOID = {"meta", "img", "wbr", "br"}  # elements without an end tag


def tiny_png(seed: int) -> bytes:
    """A valid 1x1 greyscale PNG (distinct per seed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes([0, seed]))) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def run_folder(tiny_model_dirs, tmp_path_factory):
    """Two models' artifacts in one folder: llama with a fact suite and a prompt holding markup
    (no probes), gpt2 with probes; plus a plot per model and one for the whole run."""
    root = tmp_path_factory.mktemp("report")
    facts = root / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS), encoding="utf-8")
    out = root / "run"
    # --no-plots: the report's own fake pictures below, nothing else
    assert main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch", "--no-probes",
                 "--no-plots", "--facts", str(facts), "--prompt", f"Hi {SCRIPT} & co",
                 "--out_dir", str(out)]) == 0
    # two runs' options in one folder: a run's folder is its own, so gpt2's files are moved in
    assert main(["run", str(tiny_model_dirs["gpt2"]), "--backend", "torch", "--no-plots",
                 "--out_dir", str(root / "gpt2")]) == 0
    for path in (root / "gpt2").iterdir():
        path.rename(out / path.name)
    for i, name in enumerate(["plot-llama-grid.png", "plot-gpt2-trajectory.png", "plot-overlay.png"]):
        (out / name).write_bytes(tiny_png(i))
    return out


class ClosedParser(HTMLParser):
    """Parses a page whole and records, in `errors`, every element that is not closed where
    it should be; subclasses see each start and end tag (`start`, `end`) and the open tags."""

    def __init__(self, text: str):
        super().__init__()
        self.open, self.errors = [], []
        self.feed(text)
        self.close()
        self.errors += [f"unclosed <{tag}>" for tag in self.open]

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.open.append(tag)
        self.start(tag, dict(attrs))

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.open[-1] if self.open else None}>")
            return
        self.open.pop()
        self.end(tag)

    def start(self, tag: str, attrs: dict) -> None:
        pass

    def end(self, tag: str) -> None:
        pass


class Page(ClosedParser):
    """The parts of the page the tests check: tables (under which headings, their rows and
    cells), images (in which model's section), and whether every element is closed."""

    def __init__(self, text: str):
        self.tables, self.images = [], []
        self.model = self.heading = None
        self._heading_text = None
        super().__init__(text)

    def start(self, tag, attrs):
        if tag in ("h2", "h3"):
            self._heading_text = ""
        elif tag == "table":
            self.tables.append({"model": self.model, "heading": self.heading, "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self.tables[-1]["rows"][-1].append("")
        elif tag == "img":
            self.images.append((self.model, attrs["src"]))

    def end(self, tag):
        if tag == "h2":
            self.model, self._heading_text = self._heading_text, None
        elif tag == "h3":
            self.heading, self._heading_text = self._heading_text, None

    def handle_data(self, data):
        if self._heading_text is not None:
            self._heading_text += data
        elif self.open and self.open[-1] in ("td", "th", "span"):
            self.tables[-1]["rows"][-1][-1] += data

    def table(self, model: str, heading: str) -> list[list[str]]:
        """The body rows (header row left out) of the one table under model's heading."""
        found = [t["rows"] for t in self.tables if t["model"] == model
                 and t["heading"].startswith(heading)]
        assert len(found) == 1, (model, heading)
        return found[0][1:]


def report(folder: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["report", str(folder), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_is_one_self_contained_file(run_folder, tmp_path, capsys):
    before = set(run_folder.iterdir())
    target = tmp_path / "elsewhere" / "r.html"
    code, out, err = report(run_folder, capsys, "--out", str(target))
    assert code == 0, err
    assert str(target) in out and set(run_folder.iterdir()) == before
    assert [p.name for p in target.parent.iterdir()] == ["r.html"]  # no temporary left over
    text = target.read_text(encoding="utf-8")
    for external in ("://", "src=\"http", "href=\"http", "<link", "@import", "url("):
        assert external not in text
    page = Page(text)
    assert not page.errors
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for _, src in page.images)
    embedded = {base64.b64decode(src[len(prefix):]): model for model, src in page.images}
    # each plot once, in its model's section; the run's overlay before any model
    assert embedded == {(run_folder / "plot-llama-grid.png").read_bytes(): "llama",
                        (run_folder / "plot-gpt2-trajectory.png").read_bytes(): "gpt2",
                        (run_folder / "plot-overlay.png").read_bytes(): None}
    assert len(page.images) == 3


def test_default_output_is_in_the_run_folder(run_folder, tmp_path, capsys):
    folder = shutil.copytree(run_folder, tmp_path / "run")
    code, out, err = report(folder, capsys)
    assert code == 0, err
    assert out.strip() == f"wrote {folder / 'report.html'}"
    assert (folder / "report.html").stat().st_size > 0


def test_text_is_escaped_and_tokens_show_their_space(run_folder, tmp_path, capsys):
    assert report(run_folder, capsys, "--out", str(tmp_path / "r.html"))[0] == 0
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "Hi &lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text  # the run's prompt
    assert "Say &lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot;\nnow" in text
    page = Page(text)
    summary = dict(row for row in page.table("llama", "Summary"))
    assert summary["prompt"] == f"Hi {SCRIPT} & co"
    assert summary["answer (its first piece)"] == "Berlin (\u2423Berlin)"  # ' Berlin', space shown
    # copies from row 1 lead; the original's L_copy (from row 0) comes last, named as its rule
    keys = list(summary)
    assert keys[keys.index("layers") + 1:][:2] == ["embedding_echo", "L_copy_strict_k1"]
    assert keys[-3:] == [f"{k} (the original's rule, from row 0)"
                         for k in ("L_copy", "L_copy_H", "delta_layers")]
    cells = [c for t in page.tables for row in t["rows"] for c in row]
    assert "–" in cells  # L_semantic of a tiny random model: never
    assert not {"nan", "NaN", "<NA>", "None", "null"} & set(cells)


def test_tables_have_a_row_per_layer_and_per_fact(run_folder, tmp_path, capsys):
    assert report(run_folder, capsys, "--out", str(tmp_path / "r.html"))[0] == 0
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    payloads = {model: json.loads((run_folder / f"output-{model}.json").read_text(encoding="utf-8"))
                for model in ("llama", "gpt2")}
    for model, payload in payloads.items():
        pure = page.table(model, "Next token")
        assert [int(row[0]) for row in pure] == list(range(payload["model_stats"]["num_layers"] + 1))
        # layer, entropy, top1-5, 10 flags and scores (3 of the whole answer)
        assert all(len(row) == 17 for row in pure)
    facts = page.table("llama", "Fact suite: 3 facts")
    assert [row[0] for row in facts] == ["fr", "odd", "de"]
    aggregates = page.table("llama", "Fact suite: per-layer aggregates")
    assert len(aggregates) == 3 * (payloads["llama"]["model_stats"]["num_layers"] + 1)  # all, a, b
    assert {row[0] for row in aggregates} == {"all", "a", "b"}
    gpt2 = payloads["gpt2"]
    assert len(page.table("gpt2", "Test prompts")) == len(gpt2["test_prompts"])
    assert len(page.table("gpt2", "Temperature")) == len(gpt2["temperature_exploration"])
    assert not [t for t in page.tables if t["model"] == "llama" and t["heading"] == "Test prompts"]
    assert not [t for t in page.tables if t["model"] == "gpt2" and "Fact" in t["heading"]]


def test_a_large_suite_is_cut_with_a_note(run_folder, monkeypatch):
    monkeypatch.setattr(report_module, "MAX_FACT_ROWS", 2)
    text = report_module.render_report(run_folder)
    assert [row[0] for row in Page(text).table("llama", "Fact suite: 3 facts")] == ["fr", "odd"]
    assert "Showing the first 2 of 3 facts; all are in suite-llama-facts.csv." in text


def test_folder_without_artifacts_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    code, _, err = report(tmp_path, capsys)
    assert code == 2
    assert err.splitlines() == [f"mlx-lens: error: no mlx-lens artifacts in {tmp_path}"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("name, content", [
    ("output-llama.json", "{not json"),
    ("output-llama-pure-next-token.csv", "a,b\r\n1,2\r\n"),
    ("suite-llama-facts.csv", b"\xff\xfe\x00garbage"),
])
def test_unreadable_file_is_named(run_folder, tmp_path, capsys, name, content):
    folder = shutil.copytree(run_folder, tmp_path / "run")
    target = folder / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = report(folder, capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and f"cannot read {target}" in lines[0], err
    assert not (folder / "report.html").exists()


# Every option of `run` that changes which files its folder holds, in every combination (a
# report broke on --lenses with --facts, each fine alone): the lenses, a fact suite, and
# pictures and residuals kept, or a steered run (not with a suite: refused) with pictures.
_LENSES = {"one lens": [], "lenses": ["--lenses", "all"],
           "lenses, no mid-block": ["--lenses", "all", "--no-mid-block"]}
_SUITE = {"no suite": False, "suite": True}
_REST = {"residuals": ["--no-plots", "--keep-residuals"], "steered, pictures": ["--steer"]}


@pytest.mark.parametrize("rest", _REST)
@pytest.mark.parametrize("suite", _SUITE)
@pytest.mark.parametrize("lenses", _LENSES)
def test_every_combination_of_run_options_gives_a_report(tiny_model_dirs, tmp_path, capsys,
                                                         lenses, suite, rest):
    from mlx_lens.core import steering
    import numpy as np

    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS[::2]), encoding="utf-8")
    extra = [*_LENSES[lenses], *(["--facts", str(facts)] if _SUITE[suite] else []), *_REST[rest]]
    if "--steer" in extra:
        vectors = steering.save(tmp_path / "v.safetensors", {1: np.ones(96, np.float32)})
        extra.insert(extra.index("--steer") + 1, str(vectors))
    out = tmp_path / "run"
    code = main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch", "--no-probes",
                 *extra, "--out_dir", str(out)])
    if _SUITE[suite] and "--steer" in extra:  # refused in one line, nothing written
        assert code == 2 and not out.exists()
        return
    assert code == 0, capsys.readouterr().err
    _check_report(out, ["llama"], _SUITE[suite], capsys)


def test_a_run_of_several_with_every_option_gives_a_report(tiny_model_dirs, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS[::2]), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["run", str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"]), "--backend",
                 "torch", "--no-probes", "--lenses", "all", "--facts", str(facts),
                 "--keep-residuals", "--out_dir", str(out)]) == 0, capsys.readouterr().err
    assert (out / "plot-overlay.png").is_file()
    _check_report(out, ["gpt2", "llama"], True, capsys)


def _check_report(out: Path, models: list[str], suite: bool, capsys) -> None:
    """The report of run folder `out`: a section per model run (no other), its fact tables
    with a row per fact, and every picture of the folder shown once."""
    capsys.readouterr()
    code, _, err = report(out, capsys)
    assert code == 0, err
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    assert not page.errors
    assert sorted({t["model"] for t in page.tables if t["model"]}) == models
    for model in models:
        assert len(page.table(model, "Next token, per layer")) == 4  # rows 0..3
        if suite:
            assert len(page.table(model, "Fact suite: 2 facts")) == 2
            assert page.table(model, "Fact suite: per-layer aggregates")
    assert len(page.images) == len(list(out.glob("plot-*.png")))


def test_the_page_names_each_kl_by_its_direction(run_folder):
    """KL(layer || final) for the run's own KL, KL(lens || transformers) for the check of the
    lens's last row against the framework's output (#31 item 9)."""
    text = report_module.render_report(run_folder)
    assert "KL is KL(layer || final), the layer&#x27;s distribution against the final" in text
    assert "transformers: KL(lens || transformers) " in text


def test_the_aggregates_note_says_when_clusters_were_drawn(tmp_path):
    """A suite whose facts share clusters: the note says the bootstrap drew clusters, and how
    many; a suite of independent facts says nothing of them."""
    from mlx_lens.experiment.aggregates import layer_aggregates
    from mlx_lens.output.suite_tables import write_suite_tables
    from tests.test_aggregates import long_table

    long = long_table()  # 40 facts
    for table, note in ((long, None), (long.assign(cluster=long["fact_id"].str[-1]),
                                       "clusters of facts (10)")):
        write_suite_tables(tmp_path, "m", table, table, layer_aggregates(table, n_boot=10))
        html = report_module._aggregates(tmp_path / "suite-m-aggregates.parquet")
        assert ("clusters of facts" in html) == (note is not None)
        assert note is None or note in html
