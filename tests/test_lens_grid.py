"""The report's logit-lens grid: every cell of the lens-cells table embedded, escaped, nothing
fetched; from a real tiny-model run folder."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from mlx_lens.cli.main import main
from mlx_lens.output.artifacts import read_csv
from mlx_lens.view import lens_grid
from mlx_lens.view.report import render_report
from tests.test_report import ClosedParser

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def run_folder(tiny_model_dirs, tmp_path_factory):
    """llama with every lens and a prompt holding markup; gpt2 beside it without --lenses."""
    out = tmp_path_factory.mktemp("grid") / "run"
    assert main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch", "--no-probes",
                 "--no-plots", "--lenses", "all", "--prompt", f"Hi {SCRIPT} & co",
                 "--out_dir", str(out)]) == 0
    # a run's folder is its own: gpt2's run is moved in beside llama's
    assert main(["run", str(tiny_model_dirs["gpt2"]), "--backend", "torch", "--no-probes",
                 "--no-plots", "--out_dir", str(out.parent / "gpt2")]) == 0
    for path in (out.parent / "gpt2").iterdir():
        path.rename(out / path.name)
    assert main(["report", str(out)]) == 0
    return out


class Page(ClosedParser):
    """Tags with their attributes and the model section (h2) they sit in; scripts' text."""

    def __init__(self, text: str):
        self.tags, self.scripts = [], []
        self.model, self._h2 = None, None
        super().__init__(text)

    def start(self, tag, attrs):
        self.tags.append((tag, attrs, self.model))
        if tag == "script":
            self.scripts.append([attrs, ""])
        elif tag == "h2":
            self._h2 = ""

    def end(self, tag):
        if tag == "h2":
            self.model, self._h2 = self._h2, None

    def handle_data(self, data):
        if self.open and self.open[-1] == "script":
            self.scripts[-1][1] += data
        elif self._h2 is not None:
            self._h2 += data

    def grids(self) -> dict[str, dict]:
        """model -> its grid's embedded JSON."""
        boxes = {a["data-src"]: model for tag, a, model in self.tags
                 if tag == "div" and a.get("class") == "lens-grid"}
        return {boxes[a["id"]]: json.loads(text) for a, text in self.scripts
                if a.get("type") == "application/json" and a.get("id") in boxes}


@pytest.fixture(scope="module")
def page(run_folder):
    text = (run_folder / "report.html").read_text(encoding="utf-8")
    return text, Page(text)


def test_nothing_is_fetched(page):
    text, parsed = page
    assert not parsed.errors
    assert not [t for t, _, _ in parsed.tags if t in ("link", "iframe", "object", "embed")]
    for tag, attrs, _ in parsed.tags:
        for name in ("src", "href", "srcset", "data", "action"):
            value = attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), (tag, name, value)
    assert all("src" not in a and text.strip() for a, text in parsed.scripts)  # inline only
    assert [a.get("type") for a, _ in parsed.scripts] == ["application/json", None]  # one driver
    for external in ("://", "@import", "url("):
        assert external not in text


def test_every_cell_is_embedded(run_folder, page):
    grids = page[1].grids()
    assert set(grids) == {"llama"}  # gpt2 ran without --lenses: no grid in its section
    data = grids["llama"]
    cells = read_csv(run_folder / "output-llama-lens-cells.csv")
    payload = json.loads((run_folder / "output-llama.json").read_text(encoding="utf-8"))
    assert data["lenses"] == payload["lenses"]["lenses"]  # primary first
    assert {(lens, site) for lens, sites in data["grids"].items() for site in sites} == set(
        zip(cells["lens"], cells["site"]))
    inputs = cells.drop_duplicates("pos").sort_values("pos")["input_token"].tolist()
    assert data["inputs"] == inputs
    for (lens, site), part in cells.groupby(["lens", "site"]):
        grid = data["grids"][lens][site]
        assert grid["layers"] == sorted(set(part["layer"]))
        shown = sum(c is not None for row in grid["cells"] for c in row)
        assert shown == len(part.drop_duplicates(["layer", "pos"]))
    # a few cells, rank by rank: tokens exactly, p to the 4 digits embedded
    for lens, site, layer, pos in [(data["lenses"][0], "resid", 0, 0), ("raw", "mid", 1, 2),
                                   (data["lenses"][-1], "resid", max(cells["layer"]),
                                    len(inputs) - 1)]:
        want = cells[(cells["lens"] == lens) & (cells["site"] == site) & (cells["layer"] == layer)
                     & (cells["pos"] == pos)].sort_values("rank")
        grid = data["grids"][lens][site]
        ids, ps = grid["cells"][grid["layers"].index(layer)][pos]
        assert [data["strings"][i] for i in ids] == want["token"].tolist()
        assert ps == pytest.approx(want["p"].tolist(), rel=1e-3)


def test_answer_marks_follow_the_lenses_table(run_folder, page):
    data = page[1].grids()["llama"]
    table = read_csv(run_folder / "output-llama-lenses.csv")
    for lens, sites in data["grids"].items():
        for site, grid in sites.items():
            rows = table[(table["lens"] == lens) & (table["site"] == site)]
            assert grid.get("answer", []) == rows.loc[rows["answer_top1"], "layer"].tolist()


def test_markup_in_tokens_is_escaped(page):
    text, parsed = page
    assert SCRIPT not in text
    assert text.lower().count("<script") == 2  # the data and the driver, nothing from a token
    (data_text,) = [t for a, t in parsed.scripts if a.get("type") == "application/json"]
    assert "<" not in data_text and ">" not in data_text
    ids = [a["id"] for _, a, _ in parsed.tags if "id" in a]
    assert len(ids) == len(set(ids))


def test_a_run_without_lenses_has_no_grid(run_folder, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for path in run_folder.glob("output-gpt2*"):
        shutil.copy(path, folder)
    text = render_report(folder)
    assert "Logit-lens grid" not in text and "<script" not in text.lower()
    assert "Next token, per layer" in text


def test_a_lens_without_mid_rows(run_folder):
    cells = read_csv(run_folder / "output-llama-lens-cells.csv")
    cells = cells[(cells["lens"] != "raw") | (cells["site"] == "resid")]  # raw as a tuned lens
    data = lens_grid._grid_data(cells, None, None)
    assert set(data["grids"]["raw"]) == {"resid"} and "mid" in data["grids"]["final-norm"]
    assert not any("answer" in g for sites in data["grids"].values() for g in sites.values())
    empty = lens_grid.lens_grid_section(cells.iloc[:0], None, None, "0")
    assert "no rows" in empty and lens_grid.MARK not in empty


def test_unreadable_cells_file_is_named(run_folder, tmp_path, capsys):
    folder = shutil.copytree(run_folder, tmp_path / "run")
    target = folder / "output-llama-lens-cells.csv"
    target.write_text("a,b\r\n1,2\r\n", encoding="utf-8")
    assert main(["report", str(folder)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"cannot read {target}" in lines[0]


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to parse the script")
def test_the_script_parses(tmp_path):
    path = tmp_path / "grid.js"
    path.write_text(lens_grid.SCRIPT, encoding="utf-8")
    done = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_frame_order_does_not_matter(run_folder):
    cells = read_csv(run_folder / "output-llama-lens-cells.csv")
    shuffled = cells.sample(frac=1.0, random_state=0)
    assert lens_grid._grid_data(shuffled, None, None)["grids"] == lens_grid._grid_data(
        cells, None, None)["grids"]
