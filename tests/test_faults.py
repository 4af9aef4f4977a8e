"""Faults a user meets: bad paths, over-long prompts, a killed run, a dead run's leftovers."""
from __future__ import annotations

import os
import stat

from mlx_lens import run_dir


def test_published_run_has_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        latest = run_dir.publish(run_dir.start(tmp_path / "runs"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(latest.stat().st_mode) == 0o755
