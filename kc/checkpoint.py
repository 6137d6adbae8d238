"""Atomic writes: a file is either the old version or the complete new one, never half of it (a run killed
mid-write resumes from the last complete checkpoint)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import torch


def _atomic(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    _atomic(path, lambda f: torch.save(obj, f))


def load(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def write_json(path: str, obj: Any) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
