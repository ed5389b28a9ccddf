"""Compiling for an H100 on a machine without a GPU, and counting the kernels of the result.

``h100_mesh()`` builds a one-device mesh on a deviceless CUDA topology described by
``h100_target_config.txtpb``; ``compile_for`` lowers and compiles a function for it with
XLA's GPU pipeline (its Triton and cuBLAS passes included; nothing runs). It needs the CUDA
PJRT plugin (``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` at jax's version) and the CPU as
jax's platform (tests/conftest.py sets it); where either is missing the test is skipped.

``loop_kernels`` reads the compiled HLO text and counts, for every ``while`` loop, the
instructions of its body that launch a kernel (fusions, library calls, copies and any op left
unfused); that is the number of kernels each time step of a scan costs on the GPU.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path

import jax
import pytest

TARGET_CONFIG = Path(__file__).with_name("h100_target_config.txtpb")

# Instructions that launch nothing: they name buffers, pass them along or are folded into a launch.
_NO_KERNEL = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "constant",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = .*? (?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+) \(.*\{\s*$")


@functools.cache
def _mesh_or_reason():
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=TARGET_CONFIG.read_text(), topology="1x1x1")
        return topologies.make_mesh(topo, (1,), ("x",)), None
    except Exception as e:  # no CUDA plugin, or jax already bound to another platform
        return None, f"no deviceless CUDA topology ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def h100_mesh():
    """The one-device H100 mesh, or skip the test where the CUDA plugin is absent."""
    mesh, reason = _mesh_or_reason()
    if mesh is None:
        pytest.skip(reason)
    return mesh


def abstract(tree, mesh):
    """ShapeDtypeStructs of ``tree``'s arrays, replicated on ``mesh``."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def compile_for(mesh, fn, *args, static_argnums=()):
    """``jax.jit(fn)`` lowered and compiled for the mesh's GPU at the shapes of ``args``; the Compiled."""
    return jax.jit(fn, static_argnums=static_argnums).lower(*abstract(args, mesh)).compile()


def _computations(hlo: str) -> dict[str, list[tuple[str, str, str]]]:
    """Computation name -> its instructions as (name, opcode, the text after the opening parenthesis)."""
    comps, current = {}, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            current = comps.setdefault(m["name"], [])
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            i = _INSTR.match(line)
            if i:
                current.append((i["name"], i["op"], i["rest"]))
    return comps


def _called(rest: str, attr: str) -> list[str]:
    m = re.search(attr + r"=\{?([^}\s,]+(?:,\s*%[\w.\-]+)*)\}?", rest)
    return [] if m is None else [n.strip().lstrip("%") for n in m.group(1).split(",")]


def _kernels(comps, name: str) -> Counter:
    """Kernel launches of one run of computation ``name`` by kind; nested loops are left out."""
    kinds = Counter()
    for _, op, rest in comps.get(name, []):
        if op in _NO_KERNEL or op == "while":
            continue
        if op == "call":
            kinds += _kernels(comps, _called(rest, "to_apply")[0])
        elif op == "conditional":
            branches = [_kernels(comps, b) for b in _called(rest, "branch_computations")]
            kinds += max(branches, key=lambda c: sum(c.values()), default=Counter())
        elif op in ("fusion", "custom-call"):
            kinds[_launch_kind(op, rest)] += 1
        else:
            kinds[op] += 1
    return kinds


def _launch_kind(op: str, rest: str) -> str:
    """``gemm`` for a matmul (a Triton gemm fusion or a cuBLAS call), else ``fusion`` or the call's target."""
    backend = re.search(r'"kind":"([^"]+)"', rest)
    if op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        gemm = (backend is not None and "gemm" in backend[1]) or (called is not None and "gemm" in called[1])
        return "gemm" if gemm else "fusion"
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    target = target[1] if target else "?"
    return "gemm" if ("gemm" in target or "cublas" in target) else f"custom-call:{target}"


def loop_kernels(hlo: str) -> list[dict]:
    """One record per ``while`` loop of the compiled HLO text: kernels per iteration of its body
    (``per_step``, with ``kinds``), of its condition, and the trip count where XLA knows it."""
    comps = _computations(hlo)
    loops = []
    for comp in comps.values():
        for name, op, rest in comp:
            if op != "while":
                continue
            body, cond = _called(rest, "body")[0], _called(rest, "condition")[0]
            kinds = _kernels(comps, body)
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
            loops.append(
                {
                    "loop": name,
                    "per_step": sum(kinds.values()),
                    "kinds": dict(sorted(kinds.items())),
                    "condition": sum(_kernels(comps, cond).values()),
                    "trip_count": int(trip[1]) if trip else None,
                }
            )
    return loops


def custom_calls(hlo: str) -> Counter:
    """Every custom-call target of the compiled HLO text, with its count."""
    return Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
