"""The package as a user installs it: a wheel built from the repository, installed into a fresh
virtual environment (which reuses this environment's dependencies, not its editable checkout),
runs from outside the checkout: the command, the packaged facts, the API on a model."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_what_a_run_needs(tiny_model_dirs, tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels), str(ROOT)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("mlx_logit_lens-*.whl")
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                                "--no-deps", "-q", str(wheel)], capture_output=True, text=True,
                               timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # the dependencies: this environment's site-packages as a plain path, so that its .pth
    # files (the editable install of the checkout among them) are not run
    site = subprocess.run([str(python), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def run(*args):
        return subprocess.run([*args], cwd=outside, capture_output=True, text=True, timeout=600,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                   "HF_HUB_OFFLINE": "1"})

    help_ = run(str(fresh / "bin" / "mlx-lens"), "run", "--help")
    assert help_.returncode == 0 and "usage: mlx-lens run" in help_.stdout, help_.stderr[-2000:]
    api = run(str(python), "-c", f"""
import mlx_lens
from mlx_lens.experiment.facts import load_facts
assert mlx_lens.__file__.startswith({site!r}), mlx_lens.__file__  # the wheel's, not the checkout's
assert len(load_facts("default")) == 393  # the packaged suite
lens = mlx_lens.load({str(tiny_model_dirs["llama"])!r}, backend="torch")
result = lens.run("Give the city name only, plain text. The capital of France is called simply",
                  "Paris", probes=False)
print(len(result.pure), result.summary["L_semantic"])
""")
    assert api.returncode == 0, api.stderr[-2000:]
    assert api.stdout.split()[0] == "4"  # the tiny llama's rows 0..3
