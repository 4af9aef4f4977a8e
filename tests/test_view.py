"""Pictures of a run (mlx_lens/view/): each figure read back as a PNG, the grid's rows,
columns and text geometry, and `mlx-lens plot` / `mlx-lens run` on real tiny-model runs."""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from mlx_lens.cli import main as cli
from mlx_lens.output.artifacts import read_csv
from mlx_lens.view import grid, run_folder, style, suite, trajectory
from mlx_lens.experiment.aggregates import layer_aggregates
from mlx_lens.cli.main import main
from mlx_lens.core.errors import LensError
from tests.test_suite import FACTS, write_facts
from tests.test_cli import run_main

ANSWER = " Berlin"
PROMPT = ["Give", " the", " city", "$x$", "a_b", "\n", " extraordinarily", " simply"]
MODEL_ARTIFACTS = ("grid", "trajectory", "suite")


def records_frame(n_layers: int, tokens: list[str], seed: int = 0) -> pd.DataFrame:
    """A records CSV's columns for n_layers + 1 rows and the prompt `tokens`; the answer is
    top-1 at the next-token position in the last three layers only."""
    rng = np.random.default_rng(seed)
    vocab = [" the", ",", "\n", " international", "$x$", "a_b", "中文", "W" * 12, "\t"]
    layer, pos = np.divmod(np.arange((n_layers + 1) * len(tokens)), len(tokens))
    frame = pd.DataFrame({"layer": layer, "pos": pos, "token": np.asarray(tokens, object)[pos],
                          "entropy": rng.uniform(0, 12, len(pos)),
                          "top1": rng.choice(vocab, len(pos)),
                          "prob1": rng.uniform(0, 1, len(pos))})
    frame.loc[(frame.layer > n_layers - 3) & (frame.pos == len(tokens) - 1), "top1"] = ANSWER
    return frame


def payload(model: str = "tiny", **diagnostics) -> dict:
    # the original's L_copy 0 (a tied head's row 0 echoing its input) beside a copy from row 1
    d = {"model": model, "lens": "final-norm", "answer_token": ANSWER, "L_copy": 0,
         "L_copy_strict_k1": 1, "L_semantic": 4}
    return {"diagnostics": {**d, **diagnostics}}


def pure_frame(n_layers: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_layers + 1
    rank = pd.array(np.maximum(1, (1000 / np.arange(1, n + 1) ** 2).astype(int)), dtype="Int64")
    rank[0] = pd.NA  # a blanked row
    return pd.DataFrame({"layer": np.arange(n), "entropy": rng.uniform(0, 10, n),
                         "p_answer": np.linspace(0, 0.9, n), "answer_rank": rank,
                         "kl_to_final_bits": np.linspace(8, 0, n)})


def aggregates_frame(groups=("a", "b")) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i, group in enumerate(groups * 3):
        for layer in range(5):
            p = min(1.0, layer / 4 * rng.uniform(0.5, 1))
            rows.append({"fact_id": f"f{i}", "group": group, "layer": layer, "p_answer": p,
                         "answer_rank": 5 - layer, "entropy": rng.uniform(0, 6),
                         "kl_to_final_bits": 4 - layer, "control_p": p / 2,
                         "control_p_answer": p / 10, "control_margin": p / 2 - p / 10,
                         "p_answer_gain": p - p / 10,
                         "answer_log2p": np.log2(max(p, 1e-3)) * 2,
                         "control_log2p": np.log2(max(p / 2, 1e-3))})
    return layer_aggregates(pd.DataFrame(rows), n_boot=200)


def saved_png(fig, tmp_path, name="figure.png") -> np.ndarray:
    path = style.save_png(fig, tmp_path / name)
    return check_png(path, fig.get_size_inches() * style.DPI)


def check_png(path, size_px) -> np.ndarray:
    """The PNG at path: its size in pixels (from inches x dpi), and not blank."""
    image = matplotlib.image.imread(path)
    width, height = size_px
    assert abs(image.shape[1] - width) <= 1 and abs(image.shape[0] - height) <= 1
    rgb = image[..., :3].reshape(-1, 3)
    # sensitivity floors, not tolerances: a picture, not a blank or one-colour canvas
    assert rgb.std() > 0.05 and len(np.unique(rgb, axis=0)) > 16
    return image


def rendered(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_token_labels_make_whitespace_visible_and_cut_long_tokens():
    assert style.token_label(" Berlin") == "␣Berlin"
    assert style.token_label("\n\n") == "⏎⏎"
    assert style.token_label("\t x") == "⇥␣x"
    assert style.token_label(" extraordinarily") == "␣extraor…"
    assert style.token_label("a\u200bb") == "a\\u200bb"  # invisible characters as escapes
    assert style.token_label("$x$") == "$x$" and style.token_label("") == ""
    missing = next((chr(c) for c in range(0x4E00, 0x9FFF) if c not in style._fonts()[1]), None)
    if missing is not None:  # a CJK font here may cover them all
        assert style.token_label(missing) == "□"


def test_grid_rows_columns_and_labels(tmp_path):
    fig = grid.grid(records_frame(5, PROMPT), payload())
    ax = fig.axes[0]
    image = ax.images[0]
    assert image.get_array().shape == (6, len(PROMPT))
    assert image.origin == "lower"  # embeddings at the bottom
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(6)]
    assert [t.get_text() for t in ax.get_xticklabels()] == [style.token_label(t) for t in PROMPT]
    assert len(ax.texts) == 6 * len(PROMPT)  # one top-1 token per cell
    assert sorted(int(p.get_y() + 0.5) for p in ax.patches) == [3, 4, 5]  # the answer's boxes
    assert fig.axes[1].get_ylabel() == "entropy (bits)"  # the colour bar
    assert image.norm.vmin == 0 and image.norm.vmax > 11
    saved_png(fig, tmp_path)


def test_grid_coloured_by_p1():
    records = records_frame(3, PROMPT)
    fig = grid.grid(records, payload(), colour="p1")
    image = fig.axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (0, 1)
    assert fig.axes[1].get_ylabel() == "p(top-1)"
    expected = records.pivot(index="layer", columns="pos", values="prob1").to_numpy()
    np.testing.assert_array_equal(image.get_array(), expected)
    with pytest.raises(ValueError, match="colour"):
        grid.grid(records, payload(), colour="rank")


def test_big_grid_is_readable(tmp_path, caplog):
    """60 layers by 40 tokens: no warning, no font under MIN_FONT, every cell's token inside
    its cell, tick labels apart, every text inside the figure."""
    tokens = [PROMPT[i % len(PROMPT)] if i % 3 else f" tok{i}" for i in range(40)]
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="matplotlib"):
        warnings.simplefilter("error")
        fig = grid.grid(records_frame(60, tokens), payload())
        renderer = rendered(fig)
        image = saved_png(fig, tmp_path)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # e.g. missing glyphs
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (61, 40)
    texts = [*ax.texts, *ax.get_xticklabels(), *ax.get_yticklabels()]
    assert min(t.get_fontsize() for t in texts) >= grid.MIN_FONT
    for text in ax.texts:
        c, r = text.get_position()
        (x0, y0), (x1, y1) = ax.transData.transform([(c - 0.5, r - 0.5), (c + 0.5, r + 0.5)])
        box = text.get_window_extent(renderer)
        assert x0 <= box.x0 and box.x1 <= x1 and y0 <= box.y0 and box.y1 <= y1, text.get_text()
    x_boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
    assert all(a.x1 <= b.x0 for a, b in zip(x_boxes, x_boxes[1:]))
    y_boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert all(a.y1 <= b.y0 for a, b in zip(y_boxes, y_boxes[1:]))
    for text in fig.findobj(matplotlib.text.Text):  # titles and labels too: nothing cut off
        if text.get_visible() and text.get_text():
            box = text.get_window_extent(renderer)
            assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, text.get_text()
            assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, text.get_text()
    assert image.shape[1] <= grid._MAX_SIZE[0] * style.DPI + 1


def test_wide_prompt_keeps_its_last_positions():
    tokens = [f" t{i}" for i in range(grid.MAX_COLUMNS + 10)]
    ax = grid.grid(records_frame(2, tokens), payload()).axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == grid.MAX_COLUMNS and labels[-1] == style.token_label(tokens[-1])
    assert f"last {grid.MAX_COLUMNS} of {len(tokens)} positions" in ax.get_title(loc="left")


def test_dollar_and_underscore_tokens_are_drawn_literally(tmp_path):
    """"$x$" would be an italic x as mathtext; the label must be three characters wide. Also
    under a user's text.usetex (there is no LaTeX here: savefig would fail if it were used)."""
    with matplotlib.rc_context({"text.usetex": True}):
        fig = grid.grid(records_frame(2, ["$x$", "a_b"]), payload(model="my_model$1"))
        style.save_png(fig, tmp_path / "usetex.png")
    renderer = rendered(fig)
    label = fig.axes[0].get_xticklabels()[0]
    assert label.get_text() == "$x$"
    fs = label.get_fontsize()
    literal = style.text_width("$x$", fs) * fig.dpi / 72
    assert abs(label.get_window_extent(renderer).height - literal) < 2  # rotated 90 degrees
    math = style.text_to_path.get_text_width_height_descent(
        "$x$", matplotlib.font_manager.FontProperties(size=fs), ismath=True)[0] * fig.dpi / 72
    assert abs(math - literal) > 4  # the check above tells the two apart
    assert fig.axes[0].get_title(loc="left").startswith("my_model$1")


def test_trajectory_panels(tmp_path):
    fig = trajectory.trajectory(pure_frame(6), payload())
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["entropy (bits)", "p(answer)",
                                                "answer rank (1 = top-1)",
                                                "KL(layer || final) (bits)"]
    assert axes[2].get_yscale() == "log"
    assert all(ax.get_shared_x_axes().joined(axes[0], ax) for ax in axes)
    for ax in axes:  # the first copy from row 1 and L_semantic on every panel; not L_copy 0
        assert sorted(line.get_xdata()[0] for line in ax.get_lines()[1:]) == [1, 4]
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["L_copy_strict_k1 = 1",
                                                                        "L_semantic = 4"]
    saved_png(fig, tmp_path)


def test_trajectory_without_collapse_has_no_lines(tmp_path):
    fig = trajectory.trajectory(pure_frame(3), payload(L_copy_strict_k1=None, L_semantic=None))
    assert all(len(ax.get_lines()) == 1 for ax in fig.axes) and fig.axes[0].get_legend() is None
    saved_png(fig, tmp_path)


def test_suite_bands_one_column_per_group(tmp_path):
    aggregates = aggregates_frame()
    fig = suite.suite_bands(aggregates, title="tiny")
    tops = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in tops] == ["all (6 facts)", "a (3 facts)", "b (3 facts)"]
    for ax in tops:  # p_answer and control_p_answer: each a mean line and a CI band
        assert len(ax.get_lines()) == 2 and len(ax.collections) == 2
    older = aggregates[aggregates["metric"] != "control_p_answer"]  # a table from before it
    assert len([ax for ax in suite.suite_bands(older).axes if ax.get_title()][0].get_lines()) == 1
    strips = [ax for ax in fig.axes if ax.images]
    assert len(strips) == 3 and strips[0].images[0].get_array().shape == (1, 5)
    assert any(ax.get_ylabel() == "bits" for ax in fig.axes)  # the entropy strip's colour bar
    saved_png(fig, tmp_path)


def test_suite_bands_without_groups_or_controls(tmp_path):
    aggregates = aggregates_frame(groups=("",))
    controls = aggregates["metric"].isin(["control_p", "control_p_answer", "p_answer_gain"])
    aggregates.loc[controls, ["mean", "ci_low", "ci_high"]] = np.nan
    fig = suite.suite_bands(aggregates)
    tops = [ax for ax in fig.axes if ax.get_title()]
    assert len(tops) == 1 and len(tops[0].get_lines()) == 1
    assert not any("gain" in ax.get_ylabel() for ax in fig.axes)  # no controls: no gain row
    saved_png(fig, tmp_path)


def test_suite_bands_draw_no_identity(tmp_path):
    """A suite whose controls are its own facts, as the packaged suite's (fact i's control is
    fact i + 1's prompt and answer): the mean of p(control answer | control prompt) over the
    facts is the mean of p(answer | prompt), by construction, so the picture draws neither
    that line nor the control's whole answer. It draws p(answer | prompt) against p(answer |
    control prompt) and their paired gain, by hand here: p = 0.4, 0.2, 0.6 against 0.1, 0.1,
    0.4 (gain mean 0.2), and says what the control is."""
    p, under_control = np.array([0.4, 0.2, 0.6]), np.array([0.1, 0.1, 0.4])
    long = pd.DataFrame({"fact_id": ["f0", "f1", "f2"], "group": "", "layer": 0,
                         "p_answer": p, "answer_rank": 1, "entropy": 1.0,
                         "kl_to_final_bits": 0.0, "control_p": np.roll(p, -1),
                         "control_p_answer": under_control,
                         "control_margin": np.roll(p, -1) - under_control,
                         "p_answer_gain": p - under_control, "answer_log2p": np.log2(p),
                         "control_log2p": np.log2(np.roll(p, -1))})
    aggregates = layer_aggregates(long, n_boot=50)
    mean = aggregates.set_index("metric")["mean"]
    assert abs(mean["control_p"] - mean["p_answer"]) <= 4 * np.finfo(float).eps  # the identity
    fig = suite.suite_bands(aggregates)
    drawn = {line.get_label(): line.get_ydata()[0] for ax in fig.axes for line in ax.get_lines()
             if not line.get_label().startswith("_")}
    # means of three numbers <= 1 (float64: a few eps)
    np.testing.assert_allclose([drawn["p(answer | prompt)"], drawn["p(answer | control prompt)"],
                                drawn["p(answer | prompt) - p(answer | control prompt), per fact"],
                                drawn["log2 p(whole answer | prompt)"]],
                               [0.4, 0.2, 0.2, np.log2(p).mean()], rtol=0, atol=1e-15)
    assert len(drawn) == 4  # nothing of the control answer
    assert "control prompt: each fact's control_prompt" in fig._suptitle.get_text()
    saved_png(fig, tmp_path)


def test_overlay_one_line_per_model_against_relative_depth(tmp_path):
    runs = {"small": (pure_frame(4), payload("small")), "deep_$": (pure_frame(12), payload())}
    fig = trajectory.overlay(runs)
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2
        assert [line.get_xdata()[-1] for line in ax.get_lines()] == [1.0, 1.0]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["small", "deep_$"]
    saved_png(fig, tmp_path)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dirs, tmp_path_factory):
    """A folder of two real tiny-model runs with a small fact suite, made with --no-plots."""
    root = tmp_path_factory.mktemp("plots")
    facts = write_facts(root / "facts.jsonl", FACTS[:3])
    out = root / "run"
    out.mkdir()
    for model in ("llama", "gpt2"):  # in-process, one folder each, moved into one
        args = ["run", str(tiny_model_dirs[model]), "--backend", "torch", "--no-probes",
                "--no-plots", "--facts", str(facts), "--out_dir", str(root / model)]
        assert main(args) == 0
        for path in (root / model).iterdir():
            path.rename(out / path.name)
    return out


def test_run_with_no_plots_writes_no_png(tiny_run):
    assert not list(tiny_run.glob("*.png"))


def model_pngs(folder, model):
    return {folder / f"plot-{model}-{kind}.png" for kind in MODEL_ARTIFACTS}


def test_plot_redraws_a_run_folder(tiny_run, tmp_path, capsys):
    folder = shutil.copytree(tiny_run, tmp_path / "copied")
    for name in os.listdir(folder):  # one model only
        if "gpt2" in name:
            (folder / name).unlink()
    code, out, err = run_main(["plot", str(folder)], tmp_path, capsys)
    assert code == 0, err
    assert {line.removeprefix("  wrote ") for line in out.splitlines()} == {
        str(p) for p in model_pngs(folder, "llama")}
    for path in model_pngs(folder, "llama"):
        assert matplotlib.image.imread(path).std() > 0.05  # a sensitivity floor: not blank
    assert not list(folder.glob(".*"))  # no temporary file left
    pyplot = pytest.importorskip("matplotlib.pyplot")
    assert pyplot.get_fignums() == []  # nothing registered with pyplot, nothing to leak


def test_plot_two_models_overlays_them(tiny_run, tmp_path, capsys):
    folder = shutil.copytree(tiny_run, tmp_path / "two")
    code, out, err = run_main(["plot", str(folder), "--grid-colour", "p1"], tmp_path, capsys)
    assert code == 0, err
    expected = model_pngs(folder, "llama") | model_pngs(folder, "gpt2") | {
        folder / "plot-overlay.png"}
    assert set(folder.glob("*.png")) == expected
    assert len(out.splitlines()) == len(expected)
    overlay = matplotlib.image.imread(folder / "plot-overlay.png")
    assert overlay.shape[:2] == (900, 960)  # 8 x 7.5 inches at 120 dpi
    records = read_csv(folder / "output-gpt2-records.csv")
    fig = grid.grid(records, json.loads((folder / "output-gpt2.json").read_text()), colour="p1")
    assert fig.axes[0].images[0].get_array().shape == (4, records["pos"].nunique())  # 3 layers
    check_png(folder / "plot-gpt2-grid.png", fig.get_size_inches() * style.DPI)


@pytest.mark.parametrize("make", ["empty", "missing", "other files"])
def test_plot_without_artifacts_is_one_line(tmp_path, capsys, make):
    folder = tmp_path / "runs"
    if make != "missing":
        folder.mkdir()
    if make == "other files":
        (folder / "notes.txt").write_text("no run here")
    code, out, err = run_main(["plot", str(folder)], tmp_path, capsys)
    assert code != 0 and out == ""
    assert err.strip().splitlines() == [f"mlx-lens: error: no mlx-lens artifacts in {folder}"]


@pytest.mark.parametrize("broken, contents", [
    ("output-llama.json", "{not json"),
    ("output-llama-records.csv", "layer,pos\r\n0,0\r\n"),
    ("output-gpt2-pure-next-token.csv", ""),
    ("suite-gpt2-aggregates.parquet", "PAR1 truncated"),
])
def test_unreadable_artifact_is_named(tiny_run, tmp_path, capsys, broken, contents):
    folder = shutil.copytree(tiny_run, tmp_path / "broken")
    (folder / broken).write_text(contents)
    code, _, err = run_main(["plot", str(folder)], tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1
    assert lines[0].startswith(f"mlx-lens: error: cannot read {folder / broken}: ")
    assert not list(folder.glob("*.png"))  # everything is read before anything is drawn


def test_draw_run_dir_raises_lens_error(tmp_path):
    with pytest.raises(LensError, match="no mlx-lens artifacts"):
        run_folder.draw_run_dir(tmp_path)


def test_run_draws_into_the_published_folder(tiny_model_dirs, tmp_path, capsys):
    code, out, err = run_main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch",
                               "--no-probes"], tmp_path, capsys)
    assert code == 0, err
    latest = tmp_path / "runs" / "run-latest"
    pngs = {latest / f"plot-llama-{kind}.png" for kind in ("grid", "trajectory")}
    assert set(latest.glob("*.png")) == pngs
    assert all(f"  wrote {p}" in out.splitlines() for p in pngs)


def test_failed_plot_keeps_the_run(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    def fail(run_dir, colour):
        raise RuntimeError("no canvas today\nsecond line")

    monkeypatch.setattr(run_folder, "draw_run_dir", fail)
    code, _, err = run_main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch",
                             "--no-probes"], tmp_path, capsys)
    assert code == 0
    assert err.strip().splitlines() == [
        "mlx-lens: warning: no pictures drawn: RuntimeError: no canvas today"]
    latest = tmp_path / "runs" / "run-latest"
    assert (latest / "output-llama.json").is_file() and not list(latest.glob("*.png"))


def test_several_models_are_drawn_once_by_the_parent(tiny_model_dirs, tmp_path, capsys):
    """Children of a multi-model run draw nothing; the parent draws the folder, overlay too."""
    out_dir = tmp_path / "several"
    code, out, err = run_main(["run", str(tiny_model_dirs["llama"]), str(tiny_model_dirs["qwen3"]),
                               "--backend", "torch", "--no-probes", "--out_dir", str(out_dir)],
                              tmp_path, capsys)
    assert code == 0, err
    wrote = [line for line in out.splitlines() if line.endswith(".png")]
    assert len(wrote) == len(set(wrote)) == 5
    assert (out_dir / "plot-overlay.png").is_file()


def test_cli_grid_colours_are_the_plots():
    assert cli.GRID_COLOURS == grid.GRID_COLOURS


def test_the_two_kls_are_named_by_their_direction():
    """A run's KL is KL(P_layer || P_final) (the original's), a tuned lens's evaluation the
    reverse, KL(P_model || P_lens) (tuned-lens's): each picture names its own (#31 item 9)."""
    from mlx_lens.view.tuned import tuned_eval

    frame = pd.DataFrame({"layer": [0, 1, 2], "kl_logit_bits": [3.0, 1.0, 0.0],
                          "kl_tuned_bits": [2.0, 0.5, 0.0], "ce_logit_bits": [9.0, 6.0, 4.0],
                          "ce_tuned_bits": [8.0, 5.0, 4.0], "tokens": 64})
    assert tuned_eval(frame).axes[0].get_ylabel() == "KL(model output || lens) (bits)"
    pure = pure_frame(6)
    labels = [ax.get_ylabel() for fig in (trajectory.trajectory(pure, payload()),
                                          trajectory.overlay({"a": (pure, payload())}))
              for ax in fig.axes]
    assert labels.count("KL(layer || final) (bits)") == 2
    assert not [label for label in labels if "KL" in label and "||" not in label]
