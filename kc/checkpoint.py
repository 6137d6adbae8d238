"""Atomic writes: a file is either the old version or the complete new one, never half of it (a run killed
mid-write resumes from the last complete checkpoint); after the rename the directory is synced too, so the new
name survives a power cut. Checkpoints carry a SHA-256 of their contents, so a file damaged afterwards
(truncated, bytes flipped) is refused with its name rather than loaded.

Nothing kc reads can run code: checkpoints hold tensors and plain values only (checked when saving) and are
read with torch.load(weights_only=True), so a planted pickle payload is refused, never executed.

A failed write (full disk, unwritable directory) raises WriteError naming the file; the previous version of the
file stays as it was.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import signal
import tempfile
from typing import Any

import torch

MAGIC = b"KCCKPT1\n"  # then 32 bytes of SHA-256 of the torch.save payload, then the payload
# every temporary kc writes is `NAME.XXXXXXXX.kc-tmp` (mkstemp's 8 characters): cleaning up after a killed write
# removes these names only, never a user's *.tmp
TMP_SUFFIX = ".kc-tmp"
TMP_PATTERN = re.compile(r"\.[a-z0-9_]{8}\.kc-tmp$")


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
def fsync_dir(directory: str) -> None:
    """Makes the entries of a directory (a rename, a new file) durable; file systems that cannot sync a directory
    (EINVAL) are left as they are."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise write_error(directory, e) from e
    finally:
        os.close(fd)


def _atomic(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=directory)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point()
        os.replace(tmp, path)
        tmp = None
        fsync_dir(directory)
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def is_temporary(name: str) -> bool:
    return TMP_PATTERN.search(name) is not None


def remove_temporaries(directory: str, recursive: bool = True) -> int:
    """Deletes the temporaries that writes killed mid-way left in directory (and below it when recursive): kc's
    own `NAME.XXXXXXXX.kc-tmp` names only. Returns how many. Only for a directory no other process is writing to."""
    n = 0
    for root, dirs, files in os.walk(directory):
        for f in files:
            if is_temporary(f):
                os.remove(os.path.join(root, f))
                n += 1
        if not recursive:
            break
    return n


def write_error(path: str, e: OSError) -> WriteError:
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only"}.get(e.errno, e.strerror or str(e))
    return WriteError(e.errno, f"cannot write {path}: {why}; its previous version (if any) is kept. Free space or "
                               "choose a writable --out, then continue with --resume")


PLAIN = (bool, int, float, str, type(None))


def _check_plain(obj: Any, where: str) -> None:
    """Raises TypeError unless obj is tensors and plain values (what weights_only loading reads back)."""
    if isinstance(obj, torch.Tensor) or type(obj) in PLAIN:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if type(k) not in PLAIN:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not a plain value")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__name__} is not a tensor or plain value; checkpoints must load without "
                    "pickle (convert it, e.g. float() for a NumPy scalar)")


def save(obj: Any, path: str) -> None:
    """torch.save, atomically, behind a header with the payload's SHA-256. obj must be tensors and plain values
    (dict, list, tuple, str, int, float, bool, None), so that load needs no pickle."""
    _check_plain(obj, os.path.basename(path))
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()

    def write(f):
        f.write(MAGIC)
        f.write(hashlib.sha256(payload).digest())
        f.write(payload)

    _atomic(path, write)


def load(path: str) -> Any:
    """Loads a checkpoint written by save (checking its SHA-256); DamagedFile when it is truncated or corrupted,
    or holds anything but tensors and plain values (never unpickled: that could run code)."""
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
        return torch.load(body, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)|Unsupported (\w+ \S+)", str(e))
        what = f" ({found.group(1) or found.group(2)})" if found else ""
        raise DamagedFile(f"{path}: refused: holds Python objects{what} that only pickle can load, which could run "
                          "code; kc checkpoints hold tensors and plain values. Delete it and rerun its stage with "
                          "--resume") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DamagedFile(f"{path}: unreadable checkpoint ({type(e).__name__}: {first}); delete it and rerun its "
                          "stage with --resume") from None


def write_json(path: str, obj: Any) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_array(path: str, arr) -> None:
    """A .npy file, atomically (plain dtypes only: np.save refuses to pickle objects here)."""
    import numpy as np

    _atomic(path, lambda f: np.save(f, arr, allow_pickle=False))


def write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path}: not valid JSON ({e}); the file is damaged") from None


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def listed_file(directory: str, name: Any, entry: Any, manifest: str, names: "re.Pattern") -> str:
    """The path of a file a manifest lists, after checking that the name is a plain file name of the expected
    form (no path, no `..`: what a manifest names stays in its folder), that the entry carries the file's size
    and SHA-256, and that the file is a regular file (not a device or a fifo) of that size and digest.
    ValueError naming the file or the manifest otherwise."""
    if not isinstance(name, str) or not names.fullmatch(name) or os.path.basename(name) != name:
        raise ValueError(f"{manifest}: lists {name!r}, which is not a file name of this folder's kind; refused")
    path = os.path.join(directory, name)
    if (not isinstance(entry, dict) or type(entry.get("bytes")) is not int
            or not isinstance(entry.get("sha256"), str) or not SHA256_HEX.fullmatch(entry["sha256"])):
        raise ValueError(f"{manifest}: the entry of {name} lacks its size or SHA-256; refused")
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if os.path.lexists(path) and size is None:
        raise ValueError(f"{path}: not a regular file; refused")
    if size != entry["bytes"]:
        raise ValueError(f"{path}: truncated or missing ({size} bytes, {manifest} says {entry['bytes']})")
    if file_sha256(path) != entry["sha256"]:
        raise ValueError(f"{path}: corrupted (SHA-256 differs from {manifest}'s)")
    return path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
