"""Checkpoints: one file, no pickle, written atomically, checked when read.

A checkpoint is a zip archive (stored, not compressed) holding

* ``header.json``: format name and version, one entry per leaf of the saved
  pytree (its key path, shape and dtype, in ``jax.tree`` flatten order), the
  run configuration, free-form metadata, and a SHA-256 checksum over the
  header (without the checksum itself) and every leaf's bytes;
* ``leaf_00000.npy``, ``leaf_00001.npy``, ...: the leaves, written and read
  with ``numpy.lib.format`` and ``allow_pickle=False``.

``np.load(path, allow_pickle=False)`` opens it as an ``.npz`` too, and
``unzip -p path header.json`` shows the header.

Writes go to a temporary file in the same directory, are flushed and
``fsync``-ed, then ``os.replace``-d over the target, so a reader sees either
the old checkpoint or the new one, never half of one. ``restore`` rejects a
file whose bytes do not match its checksum, or whose leaves do not have the
paths, shapes and dtypes of the given template, with a ``CheckpointError``
that says what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CheckpointError", "save", "load", "restore", "read_header", "atomic_write", "FILENAME"]

FORMAT = "jax_lstm-checkpoint"
VERSION = 1
FILENAME = "checkpoint.npz"
HEADER = "header.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, or does not fit the model it is loaded into.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from jax_lstm import checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.npz")
      >>> try:
      ...     checkpoint.load(path)                                 # no such file
      ... except checkpoint.CheckpointError as e:
      ...     print(type(e).__name__)
      CheckpointError
    """


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from jax_lstm import checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.npz")
      >>> checkpoint.atomic_write(path + ".txt", b"the whole file or nothing")
      >>> open(path + ".txt", "rb").read()
      b'the whole file or nothing'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _leaf_name(i: int) -> str:
    return f"leaf_{i:05d}.npy"


def _paths(tree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in flat], [a for _, a in flat], treedef


def _checksum(header: dict, arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in header.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _to_numpy(path: str, leaf) -> np.ndarray:
    a = np.asarray(jax.device_get(leaf))
    if a.dtype.kind not in "biuf" or np.dtype(a.dtype.str) != a.dtype:
        raise TypeError(f"cannot save leaf {path} of dtype {a.dtype}: only bool, integer and float32/64 arrays")
    return a


def save(path: str | os.PathLike, tree, *, config: dict | None = None, meta: dict | None = None) -> Path:
    """Save a pytree of arrays atomically.

    Args:
      path: the checkpoint file; its directory must exist.
      tree: a pytree whose leaves are arrays (jax or numpy) or scalars.
      config: JSON-serialisable run configuration, stored in the header.
      meta: JSON-serialisable metadata (step, timings, ...), stored in the header.

    Returns:
      The path written.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from jax_lstm import checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.npz")
      >>> written = checkpoint.save(path, {"w": jnp.ones(3)}, config={"hidden": 4}, meta={"step": 10})
      >>> checkpoint.read_header(written)["meta"]
      {'step': 10}
    """
    path = Path(path)
    names, leaves, _ = _paths(tree)
    arrays = [_to_numpy(n, a) for n, a in zip(names, leaves, strict=True)]
    header = {
        "format": FORMAT,
        "version": VERSION,
        "leaves": [
            {"path": n, "shape": list(a.shape), "dtype": a.dtype.str} for n, a in zip(names, arrays, strict=True)
        ],
        "config": config or {},
        "meta": meta or {},
    }
    header["sha256"] = _checksum(header, arrays)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr(HEADER, json.dumps(header, indent=1))
        for i, a in enumerate(arrays):
            with z.open(_leaf_name(i), "w", force_zip64=True) as m:
                np.lib.format.write_array(m, a, allow_pickle=False)
    atomic_write(path, buf.getvalue())
    return path


# What a damaged or foreign file can make the readers below raise: zipfile's own errors, and the ones its
# parsing lets through when a bit of a header is flipped (an unknown compression method: NotImplementedError;
# the "encrypted" flag: RuntimeError; a deflate flag on stored data: zlib.error; a broken extra field:
# struct.error; a garbled name: UnicodeDecodeError, a ValueError), plus short reads (EOFError), I/O errors
# and allocation failures. TypeError, AttributeError and NameError are left alone: they are programming errors.
_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    RuntimeError,
    OverflowError,
    MemoryError,
    zlib.error,
    struct.error,
)


@contextlib.contextmanager
def _reading(path: Path):
    """Turn any failure to read ``path`` into one ``CheckpointError`` naming the file."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        yield
    except CheckpointError:
        raise
    except _READ_ERRORS as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the library wrote
        raise CheckpointError(
            f"{path} is not a readable jax_lstm checkpoint (truncated, corrupted or another kind of file): {reason}"
        ) from None


def _check_header(header, path: Path) -> dict:
    """The parsed header.json, checked to be what ``save`` writes before anything trusts its fields."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise CheckpointError(f"{path} is not a jax_lstm checkpoint (header format {found!r})")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {header.get('version')}, expected {VERSION}")
    leaves = header.get("leaves")
    ok = isinstance(leaves, list) and all(
        isinstance(e, dict)
        and isinstance(e.get("path"), str)
        and isinstance(e.get("dtype"), str)
        and isinstance(e.get("shape"), list)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in e["shape"])
        for e in leaves
    )
    if not ok or not all(isinstance(header.get(k, {}), dict) for k in ("config", "meta")):
        raise CheckpointError(f"{path} is corrupted: its header does not describe the arrays it holds")
    return header


def _read_header(z: zipfile.ZipFile, path: Path) -> dict:
    try:
        raw = z.read(HEADER)
    except KeyError:
        raise CheckpointError(f"{path} has no {HEADER}: not a jax_lstm checkpoint") from None
    return _check_header(json.loads(raw), path)


def _read_leaf(raw: bytes, entry: dict, path: Path) -> np.ndarray:
    """Parse one ``.npy`` member, checking its header against ``entry`` before allocating anything."""
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran, dtype = readers[version](f)
    if list(shape) != entry["shape"] or dtype.str != entry["dtype"] or dtype.hasobject:
        raise CheckpointError(
            f"{path} is corrupted: leaf {entry['path']} has shape {shape} and dtype {dtype.str}, "
            f"its header says {tuple(entry['shape'])} and {entry['dtype']}"
        )
    data = raw[f.tell() :]
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"leaf {entry['path']} holds {len(data)} bytes of data, its shape needs more or fewer")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C").copy()


def read_header(path: str | os.PathLike) -> dict:
    """The header of a checkpoint (config, meta, leaves) without reading the arrays or checking them.

    Raises:
      CheckpointError: the file is missing, unreadable or not a checkpoint.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from jax_lstm import checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.npz")
      >>> written = checkpoint.save(path, {"w": jnp.ones(3)}, config={"hidden": 4})
      >>> checkpoint.read_header(path)["config"]
      {'hidden': 4}
    """
    path = Path(path)
    with _reading(path), zipfile.ZipFile(path) as z:
        return _read_header(z, path)


def load(path: str | os.PathLike) -> tuple[dict, list[np.ndarray]]:
    """Read and verify a checkpoint.

    Returns:
      ``(header, arrays)``: the arrays in flatten order, each checked against
      the shape and dtype in the header and, all together, against the checksum.

    Raises:
      CheckpointError: the file is missing, truncated, corrupted or not a checkpoint:
        every failure to read it, whatever the zip or ``.npy`` layer raised.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from jax_lstm import checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.npz")
      >>> written = checkpoint.save(path, {"w": jnp.ones(3)})
      >>> header, arrays = checkpoint.load(path)                    # verified against the checksum
      >>> arrays[0].shape
      (3,)
    """
    path = Path(path)
    with _reading(path), zipfile.ZipFile(path) as z:
        header = _read_header(z, path)
        arrays = []
        for i, entry in enumerate(header["leaves"]):
            try:
                raw = z.read(_leaf_name(i))
            except KeyError:
                msg = f"{path} is corrupted: leaf {entry['path']} ({_leaf_name(i)}) is missing"
                raise CheckpointError(msg) from None
            arrays.append(_read_leaf(raw, entry, path))
        if _checksum(header, arrays) != header.get("sha256"):
            raise CheckpointError(f"{path} is corrupted: its SHA-256 checksum does not match its contents")
    return header, arrays


def restore(path: str | os.PathLike, template, *, rename: Callable[[str], str] | None = None) -> tuple[Any, dict]:
    """Load a checkpoint into the structure of ``template``.

    Args:
      path: the checkpoint file.
      template: a pytree with the structure, shapes and dtypes expected (e.g. a
        freshly initialised train state of the same configuration).
      rename: maps a saved leaf's path to the template's path for the same
        leaf (reading files written with an older layout); None keeps them.

    Returns:
      ``(tree, header)``: the saved leaves as jax arrays in ``template``'s structure.

    Raises:
      CheckpointError: as ``load``, or if the saved leaves differ from the
        template's in number, key paths, shapes or dtypes; the message lists
        the differences.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from jax_lstm import checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.npz")
      >>> written = checkpoint.save(path, {"w": jnp.ones(3)})
      >>> tree, header = checkpoint.restore(path, {"w": jnp.zeros(3)})   # the template's structure, shapes, dtypes
      >>> tree["w"].tolist()
      [1.0, 1.0, 1.0]
    """
    header, arrays = load(path)
    names, leaves, treedef = _paths(template)
    saved = header["leaves"]
    if rename is not None:
        saved = [{**e, "path": rename(e["path"])} for e in saved]
    problems = []
    if [e["path"] for e in saved] != names:
        only_saved = [e["path"] for e in saved if e["path"] not in set(names)]
        only_here = [n for n in names if n not in {e["path"] for e in saved}]
        problems.append(
            f"it holds {len(saved)} arrays, this model has {len(names)}"
            + (f"; only in the checkpoint: {', '.join(only_saved[:4])}" if only_saved else "")
            + (f"; only in this model: {', '.join(only_here[:4])}" if only_here else "")
        )
    else:
        # shallowest paths first: a model's own arrays before the optimizer's copies of them
        order = sorted(range(len(names)), key=lambda i: (names[i].count("["), i))
        for name, entry, leaf in ((names[i], saved[i], leaves[i]) for i in order):
            shape = tuple(np.shape(leaf))
            dtype = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype).str
            if tuple(entry["shape"]) != shape:
                problems.append(f"{name} has shape {tuple(entry['shape'])} in the checkpoint, {shape} in this model")
            elif entry["dtype"] != dtype:
                problems.append(f"{name} has dtype {entry['dtype']} in the checkpoint, {dtype} in this model")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"checkpoint {path} does not fit this model: {shown}")
    return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays]), header
