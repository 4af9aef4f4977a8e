"""Files written whole or not at all: a crash never leaves a half-written artifact, lens or cache
folder. Each is built under a hidden temporary name beside its target and renamed into place."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from mlx_lens.core.errors import LensError


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary file beside `path`, which is then renamed to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes 0600; results are for colleagues too: the mode any new file gets.
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sibling(final: Path, kind: str) -> Path:
    """A hidden name beside `final`, unique per process and call, on the same filesystem so
    that os.replace is atomic."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_folder(final: Path, build: Callable[[Path], None],
                  keep: Callable[[Path], bool] = lambda existing: False) -> None:
    """build(tmp) fills a new folder beside `final`, which is then renamed to `final`: an
    interrupted build never looks finished. An existing `final` is moved aside first (a rename
    cannot replace a folder that holds files) and removed once the new one is in place, unless
    keep(final) says it is as good as the new one (a cache another process just finished)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(final, "tmp")
    tmp.mkdir()  # mkdir, not mkdtemp: the folder gets the umask's mode, not 0700
    try:
        build(tmp)
        if final.exists() and keep(final):
            return
        old = sibling(final, "old")
        with contextlib.suppress(FileNotFoundError):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Is process `pid` (of this host) alive?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive: another user's process
        pass
    return True


def sweep_dead_siblings(final: Path) -> None:
    """Remove what a process killed mid-write left beside `final` (its sibling() folders)."""
    for left in final.parent.glob(f".{final.name}.*-*-*"):
        pid = left.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)


@contextlib.contextmanager
def exclusive(lock: Path, what: str):
    """Hold the lock file `lock` (it names our pid) for the block: while its holder lives,
    another process is refused in one line; a dead holder's lock is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or 0)
            except (OSError, ValueError):
                holder = 0  # being written this instant, or garbage: looked at again below
            if holder and pid_alive(holder):
                raise LensError(f"{what} is in use by another process (pid {holder}); wait "
                                "for it to finish, or choose another folder") from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise LensError(f"{what}: cannot take its lock {lock}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def json_safe(obj):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj
