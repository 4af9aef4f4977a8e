"""The layering as an executable rule: pyproject.toml's import-linter contracts hold, and no
module of mlx_lens or torch_ref imports itself through others (no import cycle of any length)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    """Layers from the CLI down to the core, the two backends independent, the neutral packages
    free of frameworks (the contracts' text is in pyproject.toml)."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing
    itself: each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:  # iterative: no recursion limit on a deep graph
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            module, targets = work[-1]
            for target in targets:
                if target not in graph.modules:
                    continue
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.find_modules_directly_imported_by(target)))))
                    break
                if target in on_stack:
                    low[module] = min(low[module], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    if len(component) > 1 or module in graph.find_modules_directly_imported_by(module):
                        found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    graph = grimp.build_graph("mlx_lens", "torch_ref", cache_dir=None)
    # The package's own __init__ re-exports the API (mlx_lens.load): an import of the package
    # itself is not a dependency of one module on another.
    for package in ("mlx_lens", "torch_ref"):
        for importer in list(graph.find_modules_that_directly_import(package)):
            graph.remove_import(importer=importer, imported=package)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    """The check has teeth: a two-module cycle added to the real graph is reported."""
    graph = grimp.build_graph("mlx_lens", "torch_ref", cache_dir=None)
    graph.add_import(importer="mlx_lens.core.contract", imported="mlx_lens.cli.main")
    assert any("mlx_lens.core.contract" in c and "mlx_lens.cli.main" in c for c in _cycles(graph))
