"""Regenerate the pictures of docs/running.md (docs/pictures/): `mlx-lens run --facts default
--backend torch` on the packaged default model into a temporary folder, then its grid,
trajectory and suite pictures copied over (overwriting the tracked ones). About a minute on a
2-core CPU (45 s measured; the suite's 393 facts take most).

    python scripts/readme_pictures.py
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from mlx_lens.cli.main import main
from mlx_lens.loading.sources import resolve

PICTURES = Path(__file__).resolve().parent.parent / "docs" / "pictures"
KINDS = ("grid", "trajectory", "suite")


def regenerate() -> list[Path]:
    model = resolve(None).name
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        code = main(["run", "--facts", "default", "--backend", "torch", "--out_dir", str(run)])
        if code != 0:
            raise SystemExit(f"mlx-lens run failed (exit {code})")
        PICTURES.mkdir(parents=True, exist_ok=True)
        # Fixed names: the pages' links do not depend on which model is the default.
        return [Path(shutil.copyfile(run / f"plot-{model}-{kind}.png", PICTURES / f"{kind}.png"))
                for kind in KINDS]


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    for path in regenerate():
        print(f"  copied {path}")
