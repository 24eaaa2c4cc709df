"""Which experts the numba backend's fused k-expert step of one decode token takes, and their addresses.

The fused kernels (numba_float.kernels, numba_q8.q8_kernels: one parallel region for all k experts'
gate/up, one for their down projections and the router-weighted sum) read each expert's arrays through an
int64 address table ``[k, 3]`` (words, scales, biases). Two ways in:

- ``experts_ffn`` with the experts as views (dicts of QuantizedTensor, as Backend.experts_ffn takes them):
  each weight becomes a KernelWeight and the table is read from its arrays;
- ``packed_experts_ffn`` with the experts as the store's packed bytes and their ExpertLayout (what the
  engine passes each decode token): the table is the experts' base addresses plus the layout's component
  offsets, one outer sum, with no per-expert view or object. Building 8 experts' views, KernelWeights and
  address tables cost ~0.25 ms a layer in Python (docs/benchmarks.md, "The per-layer leftovers").

Both end in NumbaBackend._fused_experts, so the kernels and the numerics are the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from flashmoe.arch.tensors import EXPERT_PROJS
from flashmoe.backends.base import PackedWeight
from flashmoe.format.manifest import AFFINE, DTYPES, MXFP4, ExpertLayout
from flashmoe.format.mxfp4 import BLOCK as MXFP4_BLOCK


@dataclass(frozen=True)
class FusedFormat:
    """What the fused kernels know of one projection, the same across the k experts: code width, group
    size, the scale kind (numba_packed.SCALE_KINDS), rows (out_features) and in_features.
    numba_backend.KernelWeight has the same attributes, so either describes a projection."""

    bits: int
    group_size: int
    scale: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class LayoutPlan:
    """How the fused kernels read experts packed by one ExpertLayout: the formats of gate/up (alike) and of
    down, each projection's component offsets int64 ``[3 projections (gate, up, down), 3 (words, scales,
    biases)]`` in bytes from the expert's start (an MXFP4 projection has no biases: its scales' offset
    stands in), and each projection's ``{proj}.bias`` component (gpt-oss), or None."""

    gate_up: FusedFormat
    down: FusedFormat
    offsets: np.ndarray
    biases: tuple

    def stacked_biases(self, buffers: list[np.ndarray]) -> list[np.ndarray]:
        """Per projection (gate, up, down) its biases float32 [k, out] from the k packed experts, or [k, 0]
        where it has none (then the kernels add nothing)."""
        out = []
        for c in self.biases:
            if c is None:
                out.append(_no_biases(len(buffers)))
            else:
                dtype = DTYPES[c.dtype]
                out.append(np.stack([b[c.offset : c.offset + c.nbytes].view(dtype) for b in buffers]).astype(np.float32))
        return out


@functools.lru_cache(maxsize=None)
def _no_biases(k: int) -> np.ndarray:
    """float32 [k, 0]: no biases for any of k experts; one array per k, made once (the kernels read nothing of
    it), as a decode layer asked for three each token."""
    return np.empty((k, 0), np.float32)


def layout_plan(layout: ExpertLayout) -> LayoutPlan | None:
    """The LayoutPlan of `layout` when the fused kernels take its experts (every projection affine with
    bfloat16 or float32 scales, or MXFP4; gate and up alike; float biases or none), else None (the views path
    then takes them, and names what is wrong). Cached per layout object (the model directory keeps one per
    expert file), since this runs for every MoE layer of every token."""
    hit = _PLANS.get(id(layout))
    if hit is not None and hit[0] is layout:
        return hit[1]
    if len(_PLANS) >= 1024:  # layouts of models long closed
        _PLANS.clear()
    plan = _plan(layout)
    _PLANS[id(layout)] = (layout, plan)
    return plan


_PLANS: dict[int, tuple[ExpertLayout, LayoutPlan | None]] = {}


def _plan(layout: ExpertLayout) -> LayoutPlan | None:
    comps = {c.name: c for c in layout.components}
    formats, offsets, biases = [], [], []
    for proj in EXPERT_PROJS:
        q = layout.quantization.get(proj)
        found = None if q is None else (_mxfp4(comps, proj) if q.format == MXFP4 else _affine(comps, proj, q))
        bias = comps.get(f"{proj}.bias")
        if found is None or (bias is not None and (bias.dtype not in _FLOATS or bias.shape != (found[0].out_features,))):
            return None
        formats.append(found[0])
        offsets.append(found[1])
        biases.append(bias)
    if formats[0] != formats[1]:
        return None
    return LayoutPlan(formats[0], formats[2], np.array(offsets, np.int64), tuple(biases))


_FLOATS = ("float32", "bfloat16", "float16")


def _affine(comps: dict, proj: str, q) -> tuple[FusedFormat, list[int]] | None:
    """An affine projection's format and (words, scales, biases) offsets, or None when the kernels cannot read
    it by address (float16 scales: the views widen them)."""
    if q.format != AFFINE:
        return None
    w, s, b = (comps[f"{proj}.{kind}"] for kind in ("weight", "scales", "biases"))
    in_features = s.shape[1] * q.group_size
    if (w.dtype != "uint32" or s.dtype not in ("bfloat16", "float32") or b.dtype != s.dtype
            or s.shape != b.shape or s.shape[0] != w.shape[0] or w.shape[1] * 32 != in_features * q.bits):
        return None
    return (FusedFormat(q.bits, q.group_size, "bf16" if s.dtype == "bfloat16" else "f32", w.shape[0], in_features),
            [w.offset, s.offset, b.offset])


def _mxfp4(comps: dict, proj: str) -> tuple[FusedFormat, list[int]] | None:
    """An MXFP4 projection's format (its blocks' bytes as 4-bit words, E8M0 scale bytes) and offsets."""
    w, s = comps[f"{proj}.blocks"], comps[f"{proj}.scales"]
    rows, in_features = w.shape[0], 2 * w.shape[1]
    if w.dtype != "uint8" or s.dtype != "uint8" or s.shape != (rows, in_features // MXFP4_BLOCK) or w.shape[1] % 4:
        return None
    return FusedFormat(4, MXFP4_BLOCK, "e8m0", rows, in_features), [w.offset, s.offset, s.offset]


def base_addresses(buffers: list[np.ndarray], nbytes: int) -> np.ndarray | None:
    """int64 [k]: where each packed expert starts, or None when one is shorter than `nbytes` (the views
    path then raises)."""
    if min(b.shape[0] for b in buffers) < nbytes:
        return None
    return np.array([b.__array_interface__["data"][0] for b in buffers], np.int64)


def fusable(packed: list[dict]) -> bool:
    """Whether the fused kernels take experts given as views: every projection quantised (a KernelWeight)
    with one (bits, group_size, shape, scale dtype) across the k experts, and gate and up alike (true for
    every converted model); anything else runs expert by expert."""
    gate_up = [e[n] for e in packed for n in ("gate_proj", "up_proj")]
    down = [e["down_proj"] for e in packed]
    return all(isinstance(w, PackedWeight) for w in gate_up + down) and all(
        len({(w.bits, w.group_size, w.words.shape, w.scales.dtype) for w in ws}) == 1 for ws in (gate_up, down))
