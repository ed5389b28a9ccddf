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


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_every_single_bit_flip_is_rejected_or_harmless(tmp_path):
    """Each of the ~8000 one-bit corruptions of a small checkpoint either raises CheckpointError naming the
    file or (a flip in a field the reader does not use) loads exactly the saved data; nothing else escapes."""
    tree = {"w": np.arange(3, dtype=np.float32), "n": np.array(7, np.int32)}
    path = checkpoint.save(tmp_path / "c.npz", tree, config={"hidden": 5}, meta={"step": 2})
    original = path.read_bytes()
    header0, arrays0 = checkpoint.load(path)
    rejected = 0
    for bit in range(8 * len(original)):
        path.write_bytes(_flip(original, bit))
        try:
            header, arrays = checkpoint.load(path)
            assert checkpoint.read_header(path) == header0, bit
        except CheckpointError as e:
            assert str(path) in str(e) and "\n" not in str(e), (bit, str(e))
            rejected += 1
            continue
        assert header == header0, bit
        for a, b in zip(arrays, arrays0, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), bit
    assert rejected > 0.5 * 8 * len(original)


def _central_directory(data: bytes) -> int:
    return data.index(b"PK\x01\x02")  # the first central-directory entry


@pytest.mark.parametrize(
    "field, bit, reason",
    [
        (10, 1, "NotImplementedError"),  # compression method 0 -> 2: "That compression method is not supported"
        (8, 0, "RuntimeError"),  # general-purpose flag bit 0: "File ... is encrypted"
    ],
)
def test_zip_directory_damage_is_a_checkpoint_error(tmp_path, field, bit, reason):
    tree = _tree()
    path = checkpoint.save(tmp_path / "c.npz", tree)
    data = path.read_bytes()
    path.write_bytes(_flip(data, 8 * (_central_directory(data) + field) + bit))
    for read in (checkpoint.read_header, checkpoint.load, lambda p: checkpoint.restore(p, tree)):
        with pytest.raises(CheckpointError, match="not a readable jax_lstm checkpoint") as info:
            read(path)
        assert str(path) in str(info.value) and reason in str(info.value)


def test_array_header_is_checked_before_allocating(tmp_path):
    """A .npy header that claims a huge shape (with a matching zip CRC) is refused without a MemoryError."""
    tree = {"w": np.arange(3, dtype=np.float32)}
    path = checkpoint.save(tmp_path / "c.npz", tree)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["leaf_00000.npy"] = members["leaf_00000.npy"].replace(b"(3,)", b"(9999999999999,)".ljust(4))
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(CheckpointError, match=r"leaf \['w'\] has shape \(9999999999999,\)") as info:
        checkpoint.load(path)
    assert str(path) in str(info.value)
