"""Checkpoint integrity: a manifest of every file a checkpoint holds, verification against it,
damaged checkpoints moved aside, leftover temporary folders, and a full disk told in one line.

Orbax writes a checkpoint into a temporary folder and renames it when complete, so a kill
mid-write leaves the previous checkpoints whole; it does not notice a file damaged afterwards
(truncated by a full disk during a copy, bit rot, a deleted ``_METADATA``), and restoring one
fails with a TensorStore dump or a misleading pytree structure error. After each save the
trainer writes :data:`MANIFEST` into the step folder: every file's size and CRC-32. Restore
checks it first (:func:`verify_step`) and names the first file that differs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import zlib
from typing import Optional

MANIFEST = "hiper_manifest.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
_CHUNK_BYTES = 1 << 22


class CheckpointDamagedError(RuntimeError):
    """No checkpoint could be restored (or the newest is damaged and fallback is off); the
    message names the bad file of each."""


class DiskFullError(OSError):
    """The disk filled up while the trainer wrote its outputs; the message says what is kept."""


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: str) -> list[str]:
    """Paths relative to ``step_dir`` of every file under it but the manifest, sorted."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def write_manifest(step_dir: str) -> dict[str, dict[str, int]]:
    """Writes ``step_dir/MANIFEST`` (``{file: {"bytes": n, "crc32": c}}``) atomically; returns it."""
    manifest = {rel: {"bytes": os.path.getsize(os.path.join(step_dir, rel)),
                      "crc32": _crc32(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"files": manifest}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))
    return manifest


def verify_step(step_dir: str) -> Optional[str]:
    """None when every file of ``step_dir`` matches its manifest, else what is wrong, naming
    the file. A checkpoint without a manifest (written before manifests existed, or killed
    between the orbax commit and the manifest) is not judged here: None."""
    manifest_path = os.path.join(step_dir, MANIFEST)
    if not os.path.isdir(step_dir):
        return f"{step_dir}: missing"
    if not os.path.exists(manifest_path):
        return None
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest_path}: unreadable ({error})"
    for rel, want in sorted(files.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{path}: missing"
        size = os.path.getsize(path)
        if size != want["bytes"]:
            return f"{path}: {size} bytes, {want['bytes']} were written"
        if _crc32(path) != want["crc32"]:
            return f"{path}: contents changed since it was written (CRC-32 mismatch)"
    return None


def remove_tmp_dirs(root: str) -> list[str]:
    """Removes orbax's temporary folders (``*.orbax-checkpoint-tmp-*``) left in ``root`` by an
    interrupted or failed save; returns their paths."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        if TMP_MARKER in name:
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def move_aside(step_dir: str) -> str:
    """Moves a damaged checkpoint folder out of the manager's way, into
    ``<checkpoints>_damaged/<step>-<unix time>``, so the run can write that step again; returns
    the new path."""
    root, step = os.path.split(os.path.normpath(step_dir))
    target = os.path.join(root + "_damaged", f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(step_dir, target)
    return target


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or anything in its cause/context chain is a full disk (ENOSPC, or an
    error text that says so, as TensorStore's do)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def short_error(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text, at most ``limit`` characters (TensorStore and
    orbax errors run to pages)."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}"
    return line if len(line) <= limit else line[: limit - 3] + "..."
