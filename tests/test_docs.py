"""Every command in README.md and docs/*.md runs as written, as far as can be checked without
running it: each `mlx-lens ...` line of a code block parses with the CLI's own parser (no
abbreviated or renamed flag, no value outside its choices), every file of the repository a page
names exists, and every relative link points at an existing file and heading."""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from mlx_lens.cli.main import _parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```(\w*)")


def code_lines(text: str) -> list[str]:
    """The shell lines of a page's code blocks (fenced, or indented by 4 after a blank line),
    backslash continuations joined; Python blocks left out (tests/test_api.py runs the API's)."""
    lines, fenced, language, indented, previous_blank = [], False, "", False, True
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence:
            fenced, language = not fenced, fence.group(1) if not fenced else ""
        elif fenced:
            if language != "python":
                lines.append(line)
        else:
            indented = line.startswith("    ") and (indented or previous_blank)
            if indented:
                lines.append(line[4:])
        previous_blank = not line.strip()
    return re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()


def mlx_lens_argv(line: str) -> list[list[str]]:
    """The arguments after `mlx-lens` (however its path is written) of each command of a line
    that starts one, alone, after `&&`, or under `mlx.launch ...`; comments dropped."""
    if "mlx-lens" not in line:
        return []
    commands = []
    for part in line.split("&&"):
        words = shlex.split(part, comments=True)
        if words and words[0] == "mlx.launch":
            words = words[next(i for i, w in enumerate(words) if w.endswith("/mlx-lens")
                               or w == "mlx-lens"):]
        if words and Path(words[0]).name == "mlx-lens":
            commands.append(words[1:])
    return commands


def commands() -> list[tuple[str, list[str]]]:
    return [(f"{page.name}: mlx-lens {' '.join(argv)}", argv) for page in PAGES
            for line in code_lines(page.read_text()) for argv in mlx_lens_argv(line)]


def strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser and its subcommands' without prefix matching: a page's `--max-token` must not
    pass for `--max-tokens`."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                strict(sub)
    return parser


def parse_error(argv: list[str]) -> str | None:
    """argparse's message for argv, or None when the CLI accepts it."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            strict(_parser()).parse_args(argv)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return None


COMMANDS = commands()


def test_the_pages_have_commands():
    """The extraction finds the commands the pages show (a broken extraction checks nothing)."""
    shown = {" ".join(argv) for _, argv in COMMANDS}
    assert {"run", "run --facts default", "patch", "parity --lens all --prompt The capital of "
            "Germany is --answer Berlin", "run --backend torch --device-map runs/map.json"} <= shown
    assert {argv[0] for _, argv in COMMANDS} == {"run", "chat", "parity", "tune", "jlens", "patch",
                                                 "plot", "report"}


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_every_command_parses(argv):
    assert parse_error(argv) is None, parse_error(argv)


@pytest.mark.parametrize("argv, message", [
    (["run", "--lense", "all"], "unrecognized arguments: --lense"),  # --lenses abbreviated
    (["chat", "--max-tokenz", "16"], "unrecognized arguments: --max-tokenz"),
    (["run", "--backend", "cuda"], "invalid choice: 'cuda'"),
    (["tune", "--steps", "many"], "invalid int value: 'many'"),
])
def test_a_renamed_flag_or_a_bad_value_fails(argv, message):
    """The check bites: a flag renamed (or abbreviated) or a value the CLI refuses."""
    assert message in parse_error(argv)


def test_the_extraction_reads_the_pages_forms():
    page = "\n".join([
        "text mlx-lens run --no",                       # prose: not a command
        "", "    scripts/setup.sh && .venv/bin/mlx-lens run --no-plots",
        "    mlx-lens patch MODEL --clean \"a b\" \\", "        --window 3  # restore 3 blocks",
        "", "```python", "mlx-lens = 1", "```",
        "```", "mlx.launch --backend ring -n 2 mlx-lens run", "```",
        "", "    tree.py    the mlx-lens parser",            # a file tree: no command
    ])
    assert [argv for line in code_lines(page) for argv in mlx_lens_argv(line)] == [
        ["run", "--no-plots"], ["patch", "MODEL", "--clean", "a b", "--window", "3"], ["run"]]


REPO_PATH = re.compile(r"(?<![\w/.-])((?:scripts|tests|parity_tests|mlx_lens|torch_ref|docs)"
                       r"/[\w./-]*[\w/])")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_file_a_page_names_exists(page):
    missing = {m for m in REPO_PATH.findall(page.read_text()) if not (ROOT / m).exists()}
    assert not missing, f"{page.name} names files that do not exist: {sorted(missing)}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """A page's heading anchors; GitHub numbers a repeated heading's: x, x-1, x-2."""
    found, count, fenced = set(), {}, False
    for line in page.read_text().splitlines():
        fenced ^= bool(FENCE.match(line))
        if not fenced and re.match(r"#+ ", line):
            base = slug(line.lstrip("#"))
            found.add(f"{base}-{count[base]}" if base in count else base)
            count[base] = count.get(base, 0) + 1
    return found


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_points_at_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert not broken, f"{page.name} links to what is not there: {broken}"


def test_slugs_are_githubs():
    assert slug(" Which norm decodes a layer (`--lens`)") == "which-norm-decodes-a-layer---lens"
    assert slug("Across processes (`mlx.launch`)") == "across-processes-mlxlaunch"
    assert slug("Training (the tuned-lens package's recipe)") == \
        "training-the-tuned-lens-packages-recipe"
