"""Group-wise affine quantisation in the MLX layout, bit for bit.

A weight ``w [.., out, in]`` is split into groups of ``group_size`` consecutive inputs. Each group stores
``scale`` and ``bias`` (the input's float dtype) and ``q = clip(rint((w - bias) / scale), 0, 2**bits - 1)``;
``w ≈ scale * q + bias``. The ``q`` values of a row form one little-endian bit stream, least significant bits
first, viewed as uint32 words ``[.., out, in * bits / 32]``. For 2, 4 and 8 bits every word holds
``32 / bits`` whole values; 3, 5 and 6 bits pack 8 values into every 3, 5 and 6 bytes, so values straddle word
boundaries — the same bytes a bit stream gives.

Source of the arithmetic: ``mlx/backend/cpu/quantized.cpp`` (``quantize``), MLX 0.32; checked bit for bit
against ``mlx.core.quantize`` by tests/test_quant.py. All arithmetic is float32 whatever the input dtype, as
in MLX; only the final scales and biases are rounded to the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

BITS = (2, 3, 4, 5, 6, 8)
#: Group sizes the quantiser takes (mlx.core.quantize's, and convert's and synth's --group-size).
GROUP_SIZES = (32, 64, 128)
#: Group sizes the format holds: the quantiser's, and 16, the sub-blocks of llama.cpp's Q2_K, Q3_K and Q6_K
#: (imported exactly from a GGUF with float32 scales and biases, flashmoe/convert/gguf_quants.py). Every
#: backend takes all of them (conformance/op_cases.py).
FORMAT_GROUP_SIZES = (16,) + GROUP_SIZES
_EPS = np.float32(1e-7)
# Quantise this many input elements at a time so float32 temporaries stay small for huge embeddings.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class QuantizedTensor:
    """One MLX-layout quantised tensor.

    weight: uint32 ``[..., out, in * bits / 32]``; scales, biases: ``[..., out, in / group_size]`` in
    float32, float16 or bfloat16 (``ml_dtypes.bfloat16``). Leading dimensions (stacked experts) are allowed.
    """

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the float tensor this represents: ``(..., out, in)``."""
        return tuple(self.scales.shape[:-1]) + (self.scales.shape[-1] * self.group_size,)

    @property
    def nbytes(self) -> int:
        """Bytes of weight + scales + biases."""
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes

    def dequantize(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Float tensor ``(..., out, in)``: ``scales * q + biases``, computed in float32, returned as dtype."""
        return dequantize(self, dtype)


def _check_params(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")


def _chunk_layout(bits: int) -> tuple[int, int]:
    """(values per chunk, bytes per chunk): a uint32 of whole values for 2/4/8 bits; for 3, 5 and 6 bits, whose
    values straddle words, 8 values in `bits` bytes (handled as the low bytes of a uint64)."""
    return (32 // bits, 4) if 32 % bits == 0 else (8, bits)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``q [..., n]`` (each < 2**bits) into uint32 words ``[..., n * bits / 32]``.

    Requires ``n * bits`` to be a multiple of 32 (always true for n a multiple of 32). `q` may be any view
    (a transpose, a column slice); the words are C-contiguous.
    """
    per_chunk, chunk_bytes = _chunk_layout(bits)
    n = q.shape[-1]
    if (n * bits) % 32 or n % per_chunk:
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole uint32 words")
    lead = q.shape[:-1]
    word = np.dtype("<u4" if chunk_bytes == 4 else "<u8")
    # C order first: the widening view below needs the last axis contiguous, whatever the view given
    q = np.ascontiguousarray(q, dtype=word).reshape(lead + (n // per_chunk, per_chunk))
    shifts = np.arange(per_chunk, dtype=word) * word.type(bits)
    words = np.bitwise_or.reduce(q << shifts, axis=-1).astype(word)
    if chunk_bytes == 4:
        return words
    stream = words.view(np.uint8).reshape(lead + (n // per_chunk, 8))[..., :chunk_bytes]
    return np.ascontiguousarray(stream).reshape(lead + (-1,)).view("<u4")


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint32 ``[..., m]`` -> uint8 codes ``[..., m * 32 / bits]``."""
    per_chunk, chunk_bytes = _chunk_layout(bits)
    lead = words.shape[:-1]
    word = np.dtype("<u4" if chunk_bytes == 4 else "<u8")
    stream = np.ascontiguousarray(words).astype("<u4", copy=False).view(np.uint8)
    chunks = stream.reshape(lead + (-1, chunk_bytes))
    if chunk_bytes != word.itemsize:
        chunks = np.concatenate([chunks, np.zeros(chunks.shape[:-1] + (word.itemsize - chunk_bytes,), np.uint8)],
                                -1)
    chunk_words = np.ascontiguousarray(chunks).view(word)  # [..., n_chunks, 1]
    shifts = np.arange(per_chunk, dtype=word) * word.type(bits)
    q = (chunk_words >> shifts) & word.type((1 << bits) - 1)
    return q.astype(np.uint8).reshape(lead + (-1,))


def _quantize_rows(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX's affine quantiser on float32 rows ``[rows, in]``: (q uint8, scale f32, bias f32)."""
    rows, n = w.shape
    g = w.reshape(rows, n // group_size, group_size)
    n_bins = np.float32((1 << bits) - 1)
    w_max = g.max(axis=-1)
    w_min = g.min(axis=-1)
    # The edge with the larger magnitude is represented exactly: scale is nudged so edge / scale is an integer.
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, _EPS)
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scale)
    nonzero = q0 != 0
    scale = np.where(nonzero, edge / np.where(nonzero, q0, np.float32(1)), scale)
    bias = np.where(nonzero, edge, np.float32(0))
    q = np.rint((g - bias[..., None]) / scale[..., None])
    q = np.clip(q, np.float32(0), n_bins).astype(np.uint8)
    return q.reshape(rows, n), scale, bias


def first_non_finite(w: np.ndarray) -> tuple[int, ...] | None:
    """The index of `w`'s first NaN or infinity (C order), or None where every value is finite. Reads `w`
    (float, any shape, possibly memory-mapped) in chunks of ~16M values, so a large tensor costs no copy."""
    flat = w.reshape(-1)
    for start in range(0, flat.size, _CHUNK_ELEMENTS):
        chunk = flat[start : start + _CHUNK_ELEMENTS]
        bad = np.flatnonzero(~np.isfinite(chunk))
        if bad.size:
            return tuple(int(i) for i in np.unravel_index(start + int(bad[0]), w.shape))
    return None


def quantize(w: np.ndarray, bits: int = 4, group_size: int = 64) -> QuantizedTensor:
    """Quantise a float tensor ``[..., out, in]`` exactly as ``mlx.core.quantize(w, group_size, bits)``.

    w: float32, float16 or bfloat16, ``in`` a multiple of ``group_size``. Scales and biases keep w's dtype.
    Raises ValueError for unsupported bits/group_size, a non-float dtype, an indivisible last dimension or
    non-finite values (MLX's output for those is not meaningful).
    """
    _check_params(bits, group_size)
    w = np.asarray(w)
    if w.dtype not in (np.float32, np.float16, ml_dtypes.bfloat16):
        raise ValueError(f"quantize needs float32/float16/bfloat16 input, got {w.dtype}")
    if w.ndim < 2 or w.shape[-1] % group_size:
        raise ValueError(f"quantize needs [..., out, in] with in a multiple of {group_size}, got {w.shape}")
    lead, n = w.shape[:-1], w.shape[-1]
    rows = int(np.prod(lead))
    flat = w.reshape(rows, n)
    words = np.empty((rows, n * bits // 32), dtype=np.uint32)
    scales = np.empty((rows, n // group_size), dtype=w.dtype)
    biases = np.empty_like(scales)
    step = max(1, _CHUNK_ELEMENTS // n)
    for r in range(0, rows, step):
        chunk = flat[r : r + step].astype(np.float32)
        if not np.isfinite(chunk).all():
            raise ValueError(f"quantize got non-finite values in rows {r}..{r + len(chunk) - 1}")
        q, s, b = _quantize_rows(chunk, bits, group_size)
        words[r : r + step] = pack(q, bits)
        scales[r : r + step] = s.astype(w.dtype)
        biases[r : r + step] = b.astype(w.dtype)
    return QuantizedTensor(
        weight=words.reshape(lead + (-1,)),
        scales=scales.reshape(lead + (-1,)),
        biases=biases.reshape(lead + (-1,)),
        bits=bits,
        group_size=group_size,
    )


def dequantize(qt: QuantizedTensor, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Float tensor ``[..., out, in]`` = ``scales * q + biases`` per group, in float32, cast to dtype."""
    q = unpack(qt.weight, qt.bits).astype(np.float32)
    lead = q.shape[:-1]
    q = q.reshape(lead + (-1, qt.group_size))
    w = q * qt.scales.astype(np.float32)[..., None] + qt.biases.astype(np.float32)[..., None]
    return w.reshape(lead + (-1,)).astype(dtype, copy=False)


def infer_bits(weight_shape: tuple[int, ...], scales_shape: tuple[int, ...], group_size: int) -> int:
    """Bits of a quantised tensor from its shapes: ``32 * weight.shape[-1] / (scales.shape[-1] * group_size)``.

    Accepts arrays too (their shapes are used). Raises ValueError when the shapes give no supported width.
    """
    weight_shape = getattr(weight_shape, "shape", weight_shape)
    scales_shape = getattr(scales_shape, "shape", scales_shape)
    in_features = scales_shape[-1] * group_size
    packed_bits = 32 * weight_shape[-1]
    if in_features == 0 or packed_bits % in_features or packed_bits // in_features not in BITS:
        raise ValueError(
            f"weight {tuple(weight_shape)} and scales {tuple(scales_shape)} with group_size {group_size} "
            f"give no supported bit width {BITS}"
        )
    return packed_bits // in_features
