"""runs/run-latest rotation: a new run is built in a staging folder and only published whole.

Publishing moves the previous run-latest to run-YYYYMMDD-HHMM (named by the timestamp file inside
it; -2, -3, ... when two runs share a minute), then renames the staging folder to run-latest.
A failed run therefore never loses the previous one and never leaves a half-written run-latest.
A run that died before it could clean up (SIGKILL, power loss) leaves its staging folder; the next
run removes it. Runs finishing at once publish one after the other (a lock on runs/), so that
none finds run-latest half-rotated. A run given --out_dir takes a new or empty folder: one run's
folder holds that run's files only.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from mlx_lens.core.errors import LensError
from mlx_lens.core.files import pid_alive

LATEST = "run-latest"
STAMP_PREFIX = "timestamp-"
STAGING_PREFIX = ".staging-"
# Another host's pids cannot be checked from here (runs/ on a shared file system); its staging
# folder is taken as dead once untouched this long, far beyond any run's time between writes.
FOREIGN_STALE_AFTER_S = 7 * 24 * 3600


def _is_stale(staging: Path) -> bool:
    owner = staging.name.removeprefix(STAGING_PREFIX).rsplit("-", 2)  # host, pid, random
    if len(owner) == 3 and owner[0] == socket.gethostname() and owner[1].isdigit():
        return not pid_alive(int(owner[1]))
    try:
        return time.time() - staging.stat().st_mtime > FOREIGN_STALE_AFTER_S
    except FileNotFoundError:  # another run removed it meanwhile
        return False


def start(runs_root: Path, now: datetime | None = None) -> Path:
    runs_root.mkdir(parents=True, exist_ok=True)
    for staging in runs_root.glob(f"{STAGING_PREFIX}*"):  # leftovers of killed runs
        if _is_stale(staging):
            discard(staging)
    # Named after its owner (host, pid) so a later run can tell a dead run's leftovers. Made with
    # mkdir, not mkdtemp, so the published run has the umask's permissions (mkdtemp's are 0700).
    owner = f"{socket.gethostname()}-{os.getpid()}"
    staging = runs_root / f"{STAGING_PREFIX}{owner}-{secrets.token_hex(4)}"
    staging.mkdir()
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M")
    (staging / f"{STAMP_PREFIX}{stamp}").write_text(f"{stamp}\n")
    return staging


def _stamp(run: Path) -> str:
    stamps = sorted(p.name.removeprefix(STAMP_PREFIX) for p in run.glob(f"{STAMP_PREFIX}*"))
    if stamps:
        return stamps[-1]
    return datetime.fromtimestamp(run.stat().st_mtime).strftime("%Y%m%d-%H%M")


@contextlib.contextmanager
def _locked(root: Path):
    """Hold runs/ for one publish: a second run waits for the first to finish rotating. The
    lock is on the folder itself (no lock file to leave behind) and the system drops it with
    the process, however it ends."""
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def publish(staging: Path) -> Path:
    """Rotate the old run-latest away and make `staging` the new one; returns its path."""
    root = staging.parent
    latest = root / LATEST
    with _locked(root):
        if latest.exists():
            base = f"run-{_stamp(latest)}"
            target, n = root / base, 1
            while target.exists():
                n += 1
                target = root / f"{base}-{n}"
            latest.rename(target)
        staging.rename(latest)
    return latest


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def make_out_dir(out_dir: Path) -> bool:
    """Create --out_dir up front, so that a path unfit for it fails before a model is loaded;
    True when it did not exist (a failed run then takes it away again). An existing folder must
    be empty: an earlier run's files would mix with this one's (and show in its report)."""
    existed = out_dir.is_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LensError(f"--out_dir {out_dir} exists and is not a folder") from None
    except OSError as exc:
        raise LensError(f"cannot create --out_dir {out_dir}: {exc.strerror}") from exc
    if existed and any(out_dir.iterdir()):
        raise LensError(f"--out_dir {out_dir} is not empty: a run's folder holds that run's "
                        "files only (name a new or empty folder)")
    return not existed


def produce(out_dir: Path | None, make: Callable[[Path], list[Path]]) -> list[Path]:
    """The files make(folder) writes, into --out_dir, or else into a new runs/run-latest
    published whole (a failure discards it and keeps the previous one; a new --out_dir left
    empty is taken away again). Returns their final paths."""
    made = out_dir is not None and make_out_dir(out_dir)
    folder = out_dir if out_dir is not None else start(Path.cwd() / "runs")
    try:
        paths = make(folder)
    except BaseException:
        if out_dir is None:
            discard(folder)
        elif made and not any(folder.iterdir()):
            folder.rmdir()
        raise
    if out_dir is None:
        published = publish(folder)
        paths = [published / p.name for p in paths]
    return paths
