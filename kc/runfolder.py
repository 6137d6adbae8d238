"""A run folder is kc's alone: made by kc (a marker says so), used by one process at a time (a lock), and changed
only in ways that never lose what is there (a stage is rebuilt beside its folder and swapped in by rename).

    OUT/.kc-run            marker written when kc creates the folder; a non-empty folder without it is refused
    OUT/.kc-lock           held with flock for the whole run; holds the holder's PID
    OUT/STAGE.kc-build/    a stage's folder while it is being (re)built
    OUT/STAGE.kc-old/      the previous version during the swap, deleted right after

kc deletes only what it wrote: its own temporaries (checkpoint.TMP_PATTERN) in the run folder and its stage
folders, the build folders above and the previous version of a stage folder once the new one is in place.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from typing import Dict, Iterable, Optional

from kc import checkpoint

MARKER = ".kc-run"
LOCK_FILE = ".kc-lock"
BUILD, OLD, ADOPT = ".kc-build", ".kc-old", ".kc-adopt"


class RunFolderError(RuntimeError):
    """An --out that kc may not use: a file, a folder kc did not make, or one another kc process is using."""


def claim(out: str) -> None:
    """Creates out with its marker, or checks that it is a folder kc made (or an empty one, which it marks)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise RunFolderError(f"--out {out} is a file, not a folder; give a new folder or one made by kc")
    if os.path.isdir(out):
        if os.path.isfile(os.path.join(out, MARKER)):
            return
        if os.listdir(out):
            older = all(os.path.isfile(os.path.join(out, f)) for f in ("config.yaml", "state.json"))
            hint = (f"; if it is a run of an older kc, mark it as kc's with `touch {os.path.join(out, MARKER)}`"
                    if older else "")
            raise RunFolderError(f"--out {out} is not empty and was not made by kc (no {MARKER} marker); kc writes "
                                 f"only into a new folder or one it made. Choose another --out{hint}")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise checkpoint.write_error(out, e) from e
    checkpoint.fsync_dir(os.path.dirname(os.path.abspath(out)))
    checkpoint.write_json(os.path.join(out, MARKER), {"made_by": "kc", "format": 1})


# ---------------------------------------------------------------------------------------------- one run per folder
_held: Dict[str, int] = {}  # folder -> fd of its lock file: a process never blocks itself


def lock(out: str) -> None:
    """Takes out's lock for the life of the process (or until release); RunFolderError naming the holder's PID
    when another process has it. flock is released by the kernel when its holder dies, so a killed run never
    leaves a folder locked."""
    key = os.path.realpath(out)
    if key in _held:
        return
    path = os.path.join(out, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise checkpoint.write_error(path, e) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # no locks on this file system
            os.close(fd)
            raise checkpoint.write_error(path, e) from e
        holder = _holder(fd)
        os.close(fd)
        raise RunFolderError(f"{out} is in use by another kc process (PID {holder or 'unknown'}); wait for it to "
                             "end, or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def _holder(fd: int) -> str:
    """The PID the holder wrote (it writes it just after taking the lock: wait a moment for it)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return ""


def release(out: Optional[str] = None) -> None:
    """Releases out's lock (every lock this process holds when out is None)."""
    keys = list(_held) if out is None else [os.path.realpath(out)]
    for k in keys:
        fd = _held.pop(k, None)
        if fd is not None:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- stage folders
def begin(final: str, resume: bool, adopt: str = "link") -> str:
    """The folder a stage writes into instead of `final`: a fresh one, or (resume) the one an interrupted build
    left, or a copy of `final` to continue from. adopt: "link" for folders whose files are only ever replaced by
    rename (hard links then share nothing that changes), "copy" for files changed in place (memmaps)."""
    build = final + BUILD
    if not resume:
        _remove(build)
    elif not os.path.isdir(build) and os.path.isdir(final):
        tmp = final + ADOPT  # filled, then renamed: a build folder is never a partial copy
        _remove(tmp)
        os.makedirs(tmp)
        for name in sorted(os.listdir(final)):
            src, dst = os.path.join(final, name), os.path.join(tmp, name)
            if not os.path.isfile(src) or checkpoint.is_temporary(name):
                continue
            if adopt == "link":
                try:
                    os.link(src, dst)
                    continue
                except OSError:
                    pass
            shutil.copy2(src, dst)
        os.rename(tmp, build)
    os.makedirs(build, exist_ok=True)
    checkpoint.fsync_dir(os.path.dirname(build))
    return build


def commit(final: str) -> None:
    """Swaps a complete build folder in for `final`: final -> final.kc-old, build -> final, then the old one
    goes. A crash between the two renames is finished by recover()."""
    build, old = final + BUILD, final + OLD
    _remove(old)
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(build, final)
    checkpoint.fsync_dir(os.path.dirname(final))
    _remove(old)


def recover(out: str, stage_dirs: Iterable[str]) -> int:
    """After a crash: finishes swaps that were cut between their renames, and removes kc's temporaries and
    half-made copies. Returns how many temporaries went."""
    for name in stage_dirs:
        final = os.path.join(out, name)
        if os.path.isdir(final + OLD):
            if not os.path.isdir(final) and os.path.isdir(final + BUILD):
                os.rename(final + BUILD, final)
                checkpoint.fsync_dir(out)
            _remove(final + OLD)
        _remove(final + ADOPT)
    n = checkpoint.remove_temporaries(out, recursive=False)
    for name in stage_dirs:
        for d in (os.path.join(out, name), os.path.join(out, name) + BUILD):
            if os.path.isdir(d):
                n += checkpoint.remove_temporaries(d)
    return n


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
