"""The MLX backend: MLX arrays end to end, MLX's built-in quantised kernels, Metal kernels on Apple.

Every activation stays an ``mx.array`` (float32) from the embedding to the logits; the engine's glue
(``+``, ``*``, ``reshape``, slicing) works on them as on NumPy arrays. Quantised linears are
``mx.quantized_matmul`` on the MLX-layout words as they are (flashmoe.format.quant is bit-exact with
``mx.quantize``); RMSNorm is ``mx.fast.rms_norm``; attention is ``mx.fast.scaled_dot_product_attention``
(grouped-query natively, causal mask from the query positions).

Activations stay float32 on the CPU: MLX's CPU ``quantized_matmul`` with bfloat16 inputs loses about 2% of the
output's scale (issue 7). RoPE does not use ``mx.fast.rope``: it computes ``position * inv_freq`` in float32,
which at position 32000 is 1.5e-4 off the reference's float64 angle (measured); the cos/sin table here is
computed once in float64 and applied with MLX ops.

Streamed experts: ``mx.array(numpy_array)`` always copies (0.6 ms for a 7 MB expert here, ~11 GB/s). MLX
memory can however be exposed to NumPy as a writable view, so :meth:`MlxBackend.allocate_buffer` hands
out page-aligned read buffers that MLX owns; an expert read into one is used in place (no copy) — the
backend recognises such views by their buffer's owner. Buffers from anywhere else are copied.

On Apple silicon (``mx.metal.is_available()``) the fused 4-bit expert kernels in ``shaders/`` are loaded
with ``mx.fast.metal_kernel`` (with ``mx.fast.cuda_kernel`` from their CUDA twins under MLX's CUDA
back-end); on the CPU ``mx.fast.metal_kernel`` exists but raises "No Metal back-end" when called, so the
device is checked, not the attribute, and MLX's built-in ops run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashmoe.arch.config import YarnRope
from flashmoe.arch.tensors import EXPERT_PROJS
from flashmoe.backends.base import Backend, BackendError, ClampedSwiGLU, Expert, PackedWeight
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.quant import QuantizedTensor

# Full float32 matrix products: MLX runs float32 GEMMs as TF32 on NVIDIA GPUs and M5-class Apple GPUs unless
# told otherwise (measured on an H200: 2.5e-4 relative error on a float linear), outside the reference's tolerance.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

try:  # the loader in backends/__init__.py turns an ImportError into "backend 'mlx' is not available"
    import mlx.core as mx
except ImportError as e:  # pragma: no cover - exercised only without mlx installed
    raise ImportError(f"mlx is not installed ({e}); pip install 'mlx[cpu]' (Linux) or 'mlx' (macOS)") from e

_PAGE = 4096
# shaders/ beside backends/ in a source checkout; flashmoe/shaders in an installed wheel.
_SHADER_DIRS = (Path(__file__).resolve().parent.parent / "shaders", Path(__file__).resolve().parent / "shaders")
# The smallest group mx.quantized_matmul and mx.dequantize take; groups of 16 go through _group_halves.
_MLX_MIN_GROUP = 32
# Grow the RoPE cos/sin table to at least this many positions at a time.
_ROPE_TABLE_MIN = 4096


@dataclass(frozen=True)
class MxQuantized:
    """A quantised weight as MLX arrays, exactly ``mx.quantize``'s output: words uint32 ``[out, in*bits/32]``,
    scales and biases ``[out, in/group_size]`` (float32 for resident weights; a streamed expert's bf16/f16
    scales are kept as they are — ``quantized_matmul`` widens them exactly and returns float32)."""

    words: Any
    scales: Any
    biases: Any
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the float weight this represents."""
        return self.scales.shape[0], self.scales.shape[1] * self.group_size


def _mx_dtype(dt: np.dtype) -> Any:
    """The MLX dtype of a NumPy dtype (bfloat16 from ml_dtypes included)."""
    return {
        "uint8": mx.uint8, "uint16": mx.uint16, "uint32": mx.uint32, "int32": mx.int32,
        "float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16,
    }[np.dtype(dt).name]


def _mlx_owner(a: np.ndarray) -> tuple[Any, int] | None:
    """If ``a`` views memory owned by an MLX array (see :meth:`MlxBackend.allocate_buffer`): that array and
    the byte offset of ``a`` inside it; else None."""
    base = a.base
    while isinstance(base, np.ndarray):  # dtype views and reshapes keep an ndarray base; follow it to the owner
        base = base.base
    if not (isinstance(base, memoryview) and isinstance(base.obj, mx.array)):
        return None
    start = np.frombuffer(base, np.uint8).ctypes.data
    return base.obj, a.ctypes.data - start


def _from_numpy(a: np.ndarray) -> Any:
    """NumPy array -> mx.array of the same dtype and shape, in place when MLX owns ``a``'s memory."""
    owner = _mlx_owner(a) if a.flags.c_contiguous else None
    if owner is None:
        return mx.array(a)
    m, offset = owner
    flat = m.reshape(-1).view(mx.uint8)
    return flat[offset : offset + a.nbytes].view(_mx_dtype(a.dtype)).reshape(a.shape)


def _f32(x: Any) -> Any:
    """Any array-like -> float32 mx.array."""
    if isinstance(x, mx.array):
        return x if x.dtype == mx.float32 else x.astype(mx.float32)
    return mx.array(np.asarray(x, dtype=np.float32))


def shader_source(filename: str) -> str:
    """The text of ``shaders/<filename>``. Raises BackendError naming the directories searched."""
    for d in _SHADER_DIRS:
        if (d / filename).is_file():
            return (d / filename).read_text()
    raise BackendError(f"shader {filename} not found in {', '.join(str(d) for d in _SHADER_DIRS)}")


def _cuda_available() -> bool:
    """MLX's CUDA back-end is present and sees a GPU (older MLX releases have no ``mx.cuda``)."""
    return hasattr(mx, "cuda") and mx.cuda.is_available()


def gpu_language() -> str | None:
    """The GPU MLX can run custom kernels on here: "metal" (Apple silicon), "cuda" (MLX's CUDA back-end)
    or None. ``mx.fast.metal_kernel`` and ``mx.fast.cuda_kernel`` exist in every build and raise "No
    Metal/CUDA back-end" when called without one, so the device is asked, not the attribute."""
    if mx.default_device() != mx.gpu:  # custom kernels run only on the GPU stream
        return None
    if mx.metal.is_available():
        return "metal"
    if _cuda_available():
        return "cuda"
    return None


def _dequantize(q: MxQuantized) -> Any:
    return mx.dequantize(q.words, q.scales, q.biases, group_size=q.group_size, bits=q.bits)


def _group_halves(q: MxQuantized) -> tuple[MxQuantized, MxQuantized]:
    """A weight in groups of 16 as two weights in groups of 32 over the same words: the first with the even
    groups' scales and biases (right on the first 16 values of every 32), the second with the odd groups'."""
    g = 2 * q.group_size
    return (MxQuantized(q.words, q.scales[:, 0::2], q.biases[:, 0::2], q.bits, g),
            MxQuantized(q.words, q.scales[:, 1::2], q.biases[:, 1::2], q.bits, g))


def _even_group_mask(q: MxQuantized) -> Any:
    """bool ``[in]``: True on the inputs of even groups."""
    return (mx.arange(q.shape[1]) // q.group_size) % 2 == 0


def _small_group_matmul(x: Any, q: MxQuantized) -> Any:
    """``x Wᵀ`` for a weight in groups of 16, which MLX's quantized_matmul does not take (0.32: it refuses
    them, or at 2 bits returns wrong values): ``x_even Wᵀ_even + x_odd Wᵀ_odd``, where x_even keeps the
    inputs of even groups (zero elsewhere) and W_even is the weight read in groups of 32 with the even groups'
    scales (:func:`_group_halves`): each product sees only the inputs its scales are right for. Exact
    arithmetic; twice the reads of one group-32 product (docs/benchmarks.md, "group 16 on MLX")."""
    even, odd = _group_halves(q)
    mask = _even_group_mask(q)
    zero = mx.zeros_like(x)
    return sum(mx.quantized_matmul(mx.where(m, x, zero), h.words, h.scales, h.biases, transpose=True,
                                   group_size=h.group_size, bits=h.bits) for m, h in ((mask, even), (~mask, odd)))


class FusedKernels:
    """The 4-bit expert kernels of ``shaders/``, JIT-compiled by MLX for its GPU (Metal or CUDA sources of
    the same kernels, with the same inputs, template and launch geometry).

    Each method's exact arithmetic is written out by its NumPy twin in
    ``flashmoe.conformance.kernel_twins``; conformance/test_mlx_backend.py checks kernel against twin on a
    machine with the GPU, and twin against the reference everywhere.
    """

    ROWS = 8  # output rows (SIMD groups / warps of 32) per threadgroup

    def __init__(self, language: str):
        make, ext = {"metal": (mx.fast.metal_kernel, ".metal"), "cuda": (mx.fast.cuda_kernel, ".cu")}[language]
        self.language = language

        def load(name: str, inputs: list[str], outputs: list[str]) -> Any:
            return make(name=f"flashmoe_{name}", input_names=inputs, output_names=outputs,
                        source=shader_source(name + ext))

        self._matvec = load("dequant_matvec_4bit", ["x", "w", "scales", "biases"], ["y"])
        self._swiglu = load("swiglu_4bit", ["x", "gate_w", "gate_scales", "gate_biases", "up_w", "up_scales",
                                            "up_biases"], ["h"])
        self._combine = load("moe_combine", ["expert_out", "weights", "shared", "shared_gate", "residual"], ["out"])

    @staticmethod
    def supports(*weights: Any) -> bool:
        """Whether every weight is a 4-bit MxQuantized in groups of 32 or more with one scale dtype (what the
        kernels take)."""
        return all(isinstance(w, MxQuantized) and w.bits == 4 and w.group_size >= _MLX_MIN_GROUP
                   for w in weights) and \
            len({w.scales.dtype for w in weights}) == 1

    def _rows_launch(self, q: MxQuantized) -> dict:
        out, inp = q.shape
        return dict(template=[("T", q.scales.dtype), ("IN", inp), ("GROUP", q.group_size), ("OUT", out)],
                    grid=(32, out, 1), threadgroup=(32, self.ROWS, 1), output_shapes=[(out,)],
                    output_dtypes=[mx.float32])

    def dequant_matvec_4bit(self, x: Any, w: MxQuantized) -> Any:
        """``W x`` for x float32 ``[in]`` -> float32 ``[out]`` (shaders/dequant_matvec_4bit.*)."""
        return self._matvec(inputs=[x, w.words, w.scales, w.biases], **self._rows_launch(w))[0]

    def swiglu_4bit(self, x: Any, gate: MxQuantized, up: MxQuantized) -> Any:
        """``silu(G x) * (U x)`` for x float32 ``[hidden]`` -> float32 ``[I]`` (shaders/swiglu_4bit.*)."""
        return self._swiglu(inputs=[x, gate.words, gate.scales, gate.biases, up.words, up.scales, up.biases],
                            **self._rows_launch(gate))[0]

    def moe_combine(self, expert_out: Any, weights: Any, shared: Any, shared_gate: Any, residual: Any) -> Any:
        """``residual + shared_gate * shared + sum_e weights[e] * expert_out[e]``: expert_out ``[K, D]``,
        weights ``[K]``, shared and residual ``[D]``, shared_gate ``[1]``, all float32 -> ``[D]``
        (shaders/moe_combine.*)."""
        k, d = expert_out.shape
        return self._combine(inputs=[expert_out, weights, shared, shared_gate, residual],
                             template=[("K", k), ("D", d)], grid=(d, 1, 1), threadgroup=(256, 1, 1),
                             output_shapes=[(d,)], output_dtypes=[mx.float32])[0]


class MlxBackend(Backend):
    """MLX on its default device (the GPU on Apple silicon, the CPU elsewhere). Handles: float32 mx arrays
    for float weights, :class:`MxQuantized` for quantised ones."""

    name = "mlx"
    experts_in_place = False  # experts are read into MLX-owned buffers (allocate_buffer)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None  # importing mlx.core succeeded; the CPU device always exists

    @staticmethod
    def device_description() -> str:
        """Where MLX computes here, e.g. "cpu (mlx 0.32.4)" or "gpu: Metal, Apple M3 Max (mlx 0.32.4)"."""
        if mx.default_device() != mx.gpu:
            return f"cpu (mlx {mx.__version__})"
        kind = "Metal" if mx.metal.is_available() else "CUDA" if _cuda_available() else "gpu"
        name = mx.device_info().get("device_name", "") if hasattr(mx, "device_info") else ""
        return f"gpu: {kind}{', ' + name if name else ''} (mlx {mx.__version__})"

    def __init__(self) -> None:
        language = gpu_language()
        #: The fused kernels of shaders/ on a GPU, None on the CPU (where MLX's built-in ops run).
        self.kernels = FusedKernels(language) if language else None
        # MLX 0.32.4's CUDA quantized_matmul returns garbage for 2+ rows when in_features is 64 (one group;
        # 128 and more are right; measured on an H200, bits 4 and 8, f32 and bf16 scales): dequantise there.
        self._cuda_small_k_qmm_broken = language == "cuda"
        self._rope_tables: dict[tuple[float, int], tuple[Any, Any]] = {}

    # -- arrays and weights ------------------------------------------------------------------------------
    def asarray(self, x: Any) -> Any:
        return _f32(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.array(_f32(x), dtype=np.float32)  # a copy: MLX arrays are immutable, NumPy's are not

    def allocate_buffer(self, nbytes: int) -> np.ndarray:
        """A writable, page-aligned np.uint8 ``[nbytes]`` whose memory MLX owns, for the expert store to
        ``pread`` into: experts viewed in it reach MLX without a copy. Zeroed."""
        m = mx.zeros((nbytes + _PAGE,), dtype=mx.uint8)
        mx.eval(m)
        whole = np.array(m, copy=False)  # writable view of MLX's buffer (MLX allocations are not page-aligned)
        skip = -whole.ctypes.data % _PAGE
        return whole[skip : skip + nbytes]

    def prepare(self, t: Any) -> Any:
        if isinstance(t, MxQuantized):
            return t
        if isinstance(t, (QuantizedTensor, PackedWeight)):
            q = self._quantized(t)
            return MxQuantized(q.words, q.scales.astype(mx.float32), q.biases.astype(mx.float32),
                               q.bits, q.group_size)
        return _f32(t)

    def _quantized(self, t: QuantizedTensor | PackedWeight | MxQuantized) -> MxQuantized:
        """A 2-D quantised weight as MLX arrays, sharing memory with ``t`` where MLX owns it."""
        if isinstance(t, MxQuantized):
            return t
        words = t.words if isinstance(t, PackedWeight) else t.weight
        if words.ndim != 2 or t.scales.shape != t.biases.shape or t.scales.shape[0] != words.shape[0] \
                or words.shape[1] * 32 != t.scales.shape[1] * t.group_size * t.bits:
            raise BackendError(
                f"quantised weight: expected words [out, in*bits/32] and scales/biases [out, in/group_size] "
                f"for {t.bits} bits, group {t.group_size}; got {words.shape}, {t.scales.shape}, {t.biases.shape}"
            )
        return MxQuantized(_from_numpy(np.ascontiguousarray(words)), _from_numpy(np.ascontiguousarray(t.scales)),
                           _from_numpy(np.ascontiguousarray(t.biases)), int(t.bits), int(t.group_size))

    def _weight(self, w: Any) -> Any:
        """A weight in any accepted form -> float32 mx.array or MxQuantized."""
        if isinstance(w, (QuantizedTensor, PackedWeight, MxQuantized)):
            return self._quantized(w)
        if isinstance(w, np.ndarray) and w.dtype == np.float32:
            return _from_numpy(np.ascontiguousarray(w))
        return _f32(w)

    # -- dense ops ---------------------------------------------------------------------------------------
    def linear(self, x: Any, w: Any) -> Any:
        if isinstance(w, Mxfp4Tensor):  # MLX's own mxfp4 mode decodes the same bytes bit for bit
            blocks = _from_numpy(np.ascontiguousarray(w.blocks).view(np.uint32))
            return mx.quantized_matmul(_f32(x), blocks, _from_numpy(np.ascontiguousarray(w.scales)),
                                       transpose=True, group_size=32, bits=4, mode="mxfp4")
        x, w = _f32(x), self._weight(w)
        if isinstance(w, MxQuantized):
            if w.group_size < _MLX_MIN_GROUP:
                return _small_group_matmul(x, w)
            if self._cuda_small_k_qmm_broken and x.shape[0] > 1 and w.shape[1] < 128:
                return x @ mx.dequantize(w.words, w.scales, w.biases, group_size=w.group_size, bits=w.bits).T
            return mx.quantized_matmul(x, w.words, w.scales, w.biases, transpose=True,
                                       group_size=w.group_size, bits=w.bits)
        return x @ w.T

    def embed(self, ids: np.ndarray, w: Any) -> Any:
        rows = mx.array(np.asarray(ids, dtype=np.int32))
        w = self._weight(w)
        if isinstance(w, MxQuantized):
            # dequantize computes in the scales' dtype: widen bf16/f16 scales first to get float32 rows
            q = MxQuantized(w.words[rows], w.scales[rows].astype(mx.float32), w.biases[rows].astype(mx.float32),
                            w.bits, w.group_size)
            if q.group_size < _MLX_MIN_GROUP:
                even, odd = _group_halves(q)
                return mx.where(_even_group_mask(q), _dequantize(even), _dequantize(odd))
            return _dequantize(q)
        return w[rows]

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        return mx.fast.rms_norm(_f32(x), _f32(weight), eps)

    def _rope_table(self, theta: float, rotary_dim: int, end: int, yarn: YarnRope | None) -> tuple[Any, Any]:
        """cos, sin ``[>= end, rotary_dim/2]`` float32 for positions 0.., angles in float64."""
        key = (float(theta), int(rotary_dim), yarn)
        cached = self._rope_tables.get(key)
        if cached is None or cached[0].shape[0] < end:
            n = max(end, _ROPE_TABLE_MIN, 2 * (cached[0].shape[0] if cached else 0))
            angles = self.rope_angles(np.arange(n), theta, rotary_dim, yarn)
            cached = (mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32)))
            self._rope_tables[key] = cached
        return cached

    def rope(self, x: Any, positions: np.ndarray, theta: float, rotary_dim: int, yarn: YarnRope | None = None) -> Any:
        x = _f32(x)
        positions = np.asarray(positions, dtype=np.int64)
        cos, sin = self._rope_table(theta, rotary_dim, int(positions.max()) + 1, yarn)
        idx = mx.array(positions.astype(np.int32))
        cos, sin = cos[idx][:, None, :], sin[idx][:, None, :]  # [T, 1, rotary_dim/2]
        half = rotary_dim // 2
        x1, x2 = x[..., :half], x[..., half:rotary_dim]
        rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        if rotary_dim < x.shape[-1]:
            rotated.append(x[..., rotary_dim:])
        return mx.concatenate(rotated, axis=-1)

    def attention(self, q: Any, k: Any, v: Any, q_positions: np.ndarray, scale: float, sinks: Any = None) -> Any:
        q, k, v = (_f32(t).transpose(1, 0, 2)[None] for t in (q, k, v))  # [1, heads, T or S, D]
        T, S = q.shape[2], k.shape[2]
        q_positions = np.asarray(q_positions, dtype=np.int64)
        if np.array_equal(q_positions, np.arange(S - T, S)):
            mask = "causal" if T > 1 else None  # MLX aligns the causal mask to the last key
        else:
            mask = mx.array(np.arange(S)[None, :] <= q_positions[:, None])  # [T, S] visible
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask,
                                                   sinks=None if sinks is None else _f32(sinks))
        return out[0].transpose(1, 0, 2)

    def causal_conv1d(self, x: Any, state: Any, weight: Any) -> tuple[Any, Any]:
        x, weight = _f32(x), _f32(weight)
        T, K = x.shape[0], weight.shape[1]
        xs = mx.concatenate([_f32(state), x], axis=0)  # [K-1+T, C]
        y = sum(weight[:, j] * xs[j : j + T] for j in range(K))
        return self.silu(y), xs[T:]

    def gated_delta_rule(self, q: Any, k: Any, v: Any, g: Any, beta: Any, state: Any) -> tuple[Any, Any]:
        q, k, v, g, beta, S = (_f32(t) for t in (q, k, v, g, beta, state))
        T, H, _ = v.shape
        rep = H // q.shape[1]
        if rep > 1:
            q, k = mx.repeat(q, rep, axis=1), mx.repeat(k, rep, axis=1)  # [T, H, Dk]
        decay = mx.exp(g)  # [T, H]
        outs = []
        for t in range(T):
            S = S * decay[t][:, None, None]
            kt = k[t][:, :, None]  # [H, Dk, 1]
            recalled = (S * kt).sum(axis=1)  # Sᵀk: [H, Dv]
            S = S + kt * ((v[t] - recalled) * beta[t][:, None])[:, None, :]
            outs.append((S * q[t][:, :, None]).sum(axis=1))  # Sᵀq: [H, Dv]
        return mx.stack(outs), S

    # -- elementwise glue --------------------------------------------------------------------------------
    def sigmoid(self, x: Any) -> Any:
        return mx.sigmoid(_f32(x))

    def silu(self, x: Any) -> Any:
        x = _f32(x)
        return x * mx.sigmoid(x)

    def softplus(self, x: Any) -> Any:
        return mx.logaddexp(_f32(x), 0.0)

    def l2_normalize(self, x: Any, eps: float = 1e-6) -> Any:
        x = _f32(x)
        return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)

    def clip(self, x: Any, limit: float) -> Any:
        return mx.clip(_f32(x), -limit, limit)

    # -- experts -----------------------------------------------------------------------------------------
    def clamped_swiglu(self, gate: Any, up: Any, act: ClampedSwiGLU) -> Any:
        g = mx.minimum(_f32(gate), act.limit)
        return (mx.clip(_f32(up), -act.limit, act.limit) + 1) * g * mx.sigmoid(act.alpha * g)

    def expert_ffn(self, x: Any, expert: Expert, act: ClampedSwiGLU | None = None) -> Any:
        y = super().expert_ffn(x, expert, act)
        # Evaluate now: the expert may live in a read buffer the store reuses as soon as this returns.
        mx.eval(y)
        return y

    def experts_ffn(self, x: Any, experts: list[Expert], weights: np.ndarray, keys: list | None = None,
                    act: ClampedSwiGLU | None = None) -> Any:
        x = _f32(x)
        if act is not None:  # gpt-oss: biases and the clamped SwiGLU, expert by expert
            y = super().experts_ffn(x, experts, weights, keys, act)
            mx.eval(y)
            return y
        w = mx.array(np.asarray(weights, dtype=np.float32))
        projs = [[self._weight(e[p]) for p in EXPERT_PROJS] for e in experts]
        if self.kernels is not None and self.kernels.supports(*(q for e in projs for q in e)):
            kern = self.kernels
            ys = mx.stack([kern.dequant_matvec_4bit(kern.swiglu_4bit(x, g, u), d) for g, u, d in projs])
            # The engine adds the shared expert and the residual itself (the interface has no combine
            # op), so both are zero here.
            zeros = mx.zeros(x.shape, dtype=mx.float32)
            y = kern.moe_combine(ys, w, zeros, mx.zeros((1,), dtype=mx.float32), zeros)
        else:
            y = super().experts_ffn(x, [dict(zip(EXPERT_PROJS, e)) for e in projs], weights)
        mx.eval(y)  # as in expert_ffn: the read buffers are released after this call
        return y
