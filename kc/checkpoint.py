"""Atomic writes: a file is either the old version or the complete new one, never half of it (a run killed
mid-write resumes from the last complete checkpoint). Checkpoints carry a SHA-256 of their contents, so a file
damaged afterwards (truncated, bytes flipped) is refused with its name rather than loaded.

A failed write (full disk, unwritable directory) raises WriteError naming the file; the previous version of the
file stays as it was.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import tempfile
from typing import Any

import torch

MAGIC = b"KCCKPT1\n"  # then 32 bytes of SHA-256 of the torch.save payload, then the payload


class DamagedFile(RuntimeError):
    """A file of the run is truncated or corrupted; the message names it."""


class WriteError(OSError):
    """A file could not be written (full disk, unwritable directory); the message names it."""


# ---------------------------------------------------------------------------------------------- crash tests
# KC_TEST_KILL_AT=<stage>:<n> makes the process SIGKILL itself at the n-th crash point inside that stage (crash
# points: just before an atomic write replaces its file, between shard files, after a cache batch). Used by the
# kill-and-resume tests; unset, it costs one comparison per write.
_KILL_AT = os.environ.get("KC_TEST_KILL_AT", "")
_stage = {"name": None, "count": 0}


def enter_stage(name: str) -> None:
    _stage.update(name=name, count=0)


def crash_point() -> None:
    if not _KILL_AT:
        return
    stage, _, n = _KILL_AT.partition(":")
    if _stage["name"] == stage:
        _stage["count"] += 1
        if _stage["count"] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- writes
def _atomic(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point()
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def remove_temporaries(directory: str) -> int:
    """Deletes the temporaries that writes killed mid-way left under directory (`NAME.XXXXXXXX.tmp`); returns how
    many. Only for a directory no other process is writing to."""
    import re

    pat = re.compile(r"\.[A-Za-z0-9_]{8}\.tmp$|\.tmp$|\.tmp\.npy$")
    n = 0
    for root, _, files in os.walk(directory):
        for f in files:
            if pat.search(f):
                os.remove(os.path.join(root, f))
                n += 1
    return n


def write_error(path: str, e: OSError) -> WriteError:
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only"}.get(e.errno, e.strerror or str(e))
    return WriteError(e.errno, f"cannot write {path}: {why}; its previous version (if any) is kept. Free space or "
                               "choose a writable --out, then continue with --resume")


def save(obj: Any, path: str) -> None:
    """torch.save, atomically, behind a header with the payload's SHA-256."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()

    def write(f):
        f.write(MAGIC)
        f.write(hashlib.sha256(payload).digest())
        f.write(payload)

    _atomic(path, write)


def load(path: str) -> Any:
    """Loads a checkpoint written by save (checking its SHA-256); DamagedFile when it is truncated or corrupted."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob.startswith(MAGIC):
        head = len(MAGIC) + 32
        if len(blob) < head or hashlib.sha256(memoryview(blob)[head:]).digest() != blob[len(MAGIC):head]:
            raise DamagedFile(f"{path}: checkpoint is truncated or corrupted (checksum mismatch, {len(blob)} bytes); "
                              "delete it and rerun its stage with --resume")
        body = io.BytesIO(memoryview(blob)[head:])
    else:  # a checkpoint from before the header
        body = io.BytesIO(blob)
    del blob
    try:
        return torch.load(body, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise DamagedFile(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it and rerun its stage "
                          "with --resume") from None


def write_json(path: str, obj: Any) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path}: not valid JSON ({e}); the file is damaged") from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
