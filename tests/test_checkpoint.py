"""Checkpoints: exact round trip, no pickle, atomic replacement, and clear rejection of bad files."""

from __future__ import annotations

import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_lstm import checkpoint, init_params
from jax_lstm.checkpoint import CheckpointError


def _tree(hidden=5, seed=0):
    params = {"lstm": init_params(jax.random.PRNGKey(seed), 3, hidden, dtype=jnp.float32), "w": jnp.arange(4.0)}
    opt_state = optax.adam(1e-3).init(params)
    return {"params": params, "opt_state": opt_state, "key": jax.random.PRNGKey(7), "carry": None}


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(a) == jax.tree.structure(b)


def test_round_trip_is_exact(tmp_path):
    tree = _tree()
    tree["params"]["f64"] = jnp.linspace(0, 1, 7, dtype=jnp.float64) / 3
    path = checkpoint.save(tmp_path / "c.npz", tree, config={"hidden": 5}, meta={"step": 12})
    back, header = checkpoint.restore(path, tree)
    _assert_same(back, tree)
    assert header["config"] == {"hidden": 5} and header["meta"] == {"step": 12}
    assert checkpoint.read_header(path)["meta"]["step"] == 12


def test_format_needs_no_pickle(tmp_path):
    path = checkpoint.save(tmp_path / "c.npz", _tree())
    with np.load(path, allow_pickle=False) as z:  # an ordinary .npz of plain arrays
        names = sorted(n for n in z.files if n.startswith("leaf_"))
        assert names[0] == "leaf_00000" and len(names) == len(jax.tree.leaves(_tree()))
        np.testing.assert_array_equal(z["leaf_00000"], np.asarray(jax.tree.leaves(_tree())[0]))
    with zipfile.ZipFile(path) as z:
        header = json.loads(z.read("header.json"))
    assert header["format"] == "jax_lstm-checkpoint" and len(header["sha256"]) == 64
    assert header["leaves"][0]["path"].startswith("['key']") or header["leaves"][0]["path"].startswith("['opt")


def test_refuses_object_arrays(tmp_path):
    with pytest.raises(TypeError, match="cannot save leaf"):
        checkpoint.save(tmp_path / "c.npz", {"a": np.array([{"x": 1}], dtype=object)})
    assert not list(tmp_path.iterdir())


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    checkpoint.save(path, _tree(seed=0), meta={"step": 1})
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, _tree(seed=1), meta={"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]  # no temp file left behind
    assert checkpoint.read_header(path)["meta"]["step"] == 1


def _corrupt(path, offset_from_middle=0):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 + offset_from_middle
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["flip_byte", "truncate", "garbage", "empty", "missing", "no_header", "checksum"],
)
def test_bad_files_are_rejected_clearly(tmp_path, damage):
    tree = _tree()
    path = tmp_path / "c.npz"
    checkpoint.save(path, tree)
    if damage == "flip_byte":
        _corrupt(path)
        expect = "corrupted"
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        expect = "not a readable jax_lstm checkpoint"
    elif damage == "garbage":
        path.write_bytes(b"hello, this is not a checkpoint" * 10)
        expect = "not a readable jax_lstm checkpoint"
    elif damage == "empty":
        path.write_bytes(b"")
        expect = "not a readable jax_lstm checkpoint"
    elif damage == "missing":
        path.unlink()
        expect = "no checkpoint at"
    elif damage == "no_header":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("leaf_00000.npy", b"")
        expect = "no header.json"
    else:  # a consistent zip whose array was changed without updating the checksum
        with zipfile.ZipFile(path) as z:
            members = {n: z.read(n) for n in z.namelist()}
        header = json.loads(members["header.json"])
        arr = np.lib.format.read_array(zipfile.ZipFile(path).open("leaf_00003.npy"))
        import io

        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr + 1)
        members["leaf_00003.npy"] = buf.getvalue()
        with zipfile.ZipFile(path, "w") as z:
            for n, b in members.items():
                z.writestr(n, b)
        assert json.loads(zipfile.ZipFile(path).read("header.json")) == header
        expect = "checksum does not match"
    with pytest.raises(CheckpointError, match=expect) as info:
        checkpoint.restore(path, tree)
    assert str(path) in str(info.value)


def test_other_model_size_is_rejected_with_both_shapes(tmp_path):
    path = checkpoint.save(tmp_path / "c.npz", _tree(hidden=5))
    with pytest.raises(CheckpointError, match=r"does not fit this model") as info:
        checkpoint.restore(path, _tree(hidden=8))
    msg = str(info.value)
    assert "['params']['lstm'].W has shape (5, 20) in the checkpoint, (8, 32) in this model" in msg


def test_other_structure_and_dtype_are_rejected(tmp_path):
    tree = _tree()
    path = checkpoint.save(tmp_path / "c.npz", tree)
    other = dict(tree, extra=jnp.zeros(3))
    with pytest.raises(CheckpointError, match=r"only in this model: \['extra'\]"):
        checkpoint.restore(path, other)
    f64 = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, tree)
    with pytest.raises(CheckpointError, match="dtype <f4 in the checkpoint, <f8 in this model"):
        checkpoint.restore(path, f64)
