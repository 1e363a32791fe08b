"""Checkpoint integrity helpers: manifests catch every kind of damage and name the file."""

import errno
import os
import re

import jax.numpy as jnp
import pytest

from hiper_jax.train import checkpoints


@pytest.fixture()
def step_dir(tmp_path):
    """An orbax checkpoint (state + meta, as the trainer writes it) with its manifest."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True))
    state = {"w": jnp.arange(4096, dtype=jnp.float32), "b": {"c": jnp.ones((16, 16))}}
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave({"iteration": 3})))
    manager.wait_until_finished()
    path = str(tmp_path / "checkpoints" / "3")
    checkpoints.write_manifest(path)
    return path


def largest_data_file(step_dir):
    files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
             for name in names if os.sep + "d" + os.sep in os.path.join(root, name)]
    return max(files, key=os.path.getsize)


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    (lambda d: truncate(largest_data_file(d)), r"\d+ bytes, \d+ were written"),
    (lambda d: flip_byte(largest_data_file(d)), "CRC-32 mismatch"),
    (lambda d: os.remove(os.path.join(d, "state", "_METADATA")), r"state/_METADATA: missing"),
    (lambda d: truncate(os.path.join(d, "meta", "metadata")), r"meta/metadata: \d+ bytes"),
    (lambda d: truncate(os.path.join(d, checkpoints.MANIFEST)), "hiper_manifest.json: unreadable"),
])
def test_damage_is_found_and_names_the_file(step_dir, damage, reason):
    assert checkpoints.verify_step(step_dir) is None
    damage(step_dir)
    problem = checkpoints.verify_step(step_dir)
    assert problem is not None and problem.startswith(step_dir) and re.search(reason, problem), problem


def test_a_checkpoint_without_manifest_is_left_to_the_restore(step_dir):
    os.remove(os.path.join(step_dir, checkpoints.MANIFEST))
    assert checkpoints.verify_step(step_dir) is None


def test_move_aside_and_tmp_cleanup(step_dir):
    root = os.path.dirname(step_dir)
    tmp = os.path.join(root, "5.orbax-checkpoint-tmp-1733000000")
    os.makedirs(os.path.join(tmp, "state"))
    assert checkpoints.remove_tmp_dirs(root) == [tmp] and not os.path.exists(tmp)
    moved = checkpoints.move_aside(step_dir)
    assert not os.path.exists(step_dir) and os.path.dirname(moved) == root + "_damaged"
    assert checkpoints.verify_step(moved) is None  # moved whole, manifest included


def test_disk_full_is_recognised_through_the_exception_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("async save failed") from inner
    except RuntimeError as outer:
        assert checkpoints.is_disk_full(outer)
    assert checkpoints.is_disk_full(ValueError("WRITE failed: [OS error: No space left on device]"))
    assert not checkpoints.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    long = RuntimeError("first line " + "x" * 1000 + "\nsecond line")
    assert checkpoints.short_error(long).startswith("RuntimeError: first line") and len(checkpoints.short_error(long)) == 300
    assert checkpoints.short_error(ValueError("")) == "ValueError: "
