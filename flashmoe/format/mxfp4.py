"""MXFP4: the OCP microscaling format in which gpt-oss publishes its expert weights, decoded bit for bit.

A weight ``w [.., out, in]`` is split into blocks of 32 consecutive inputs. Each block stores 32 FP4 E2M1
codes (two per byte, the even element in the low nibble) and one E8M0 scale byte ``s``:

    w[r, 32·b + j] = FP4_VALUES[code(r, b, j)] · 2^(s[r, b] − 127)

E2M1 (1 sign bit, 2 exponent bits, 1 mantissa bit) has the 16 values of FP4_VALUES; E8M0 is a bare exponent,
so ``s`` = 0 … 254 gives 2^-127 … 2^127. The decode is transformers' ``integrations/mxfp4.py``
(``_convert_moe_packed_tensors``: a lookup table of the 16 values, then ``ldexp`` by ``s − 127``), the
same table and order as OpenAI's gpt-oss reference; tests/test_mxfp4.py checks every code and every scale
against it. Source of the format: OCP Microscaling Formats (MX) v1.0, §5.3 (E2M1) and §5.4 (E8M0).

flashmoe stores ``blocks`` as uint8 ``[.., out, in / 2]`` (the checkpoint's ``[.., out, in / 32, 16]``
flattened: the same bytes) and ``scales`` as uint8 ``[.., out, in / 32]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashmoe.errors import FormatError

#: Values per block (one E8M0 scale each).
BLOCK = 32
#: E2M1 code -> value; codes 8..15 are the negatives of 0..7 (transformers' FP4_VALUES, same order).
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
#: E8M0 bias: a scale byte s means 2^(s - 127).
SCALE_BIAS = 127


@dataclass(frozen=True)
class Mxfp4Tensor:
    """One MXFP4 tensor: blocks uint8 ``[..., out, in / 2]`` and scales uint8 ``[..., out, in / 32]``.
    Leading dimensions (stacked experts) are allowed."""

    blocks: np.ndarray
    scales: np.ndarray

    @classmethod
    def from_checkpoint(cls, blocks: np.ndarray, scales: np.ndarray, name: str = "tensor") -> "Mxfp4Tensor":
        """From a checkpoint's ``*_blocks`` ``[..., out, in/32, 16]`` (or already ``[..., out, in/2]``) and
        ``*_scales`` ``[..., out, in/32]``, both uint8; the bytes are kept as they are.
        Raises FormatError naming `name` when the dtypes or shapes do not fit together."""
        blocks, scales = np.asarray(blocks), np.asarray(scales)
        if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
            raise FormatError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
        if blocks.ndim == scales.ndim + 1 and blocks.shape[-1] == BLOCK // 2:
            blocks = blocks.reshape(blocks.shape[:-2] + (-1,))
        t = cls(blocks, scales)
        t.check(name)
        return t

    def check(self, name: str = "tensor") -> None:
        """Raise FormatError naming `name` unless blocks ``[..., out, in/2]`` and scales ``[..., out, in/32]``
        are uint8 and agree."""
        b, s = self.blocks, self.scales
        if (b.dtype != np.uint8 or s.dtype != np.uint8 or b.ndim < 2 or b.shape[:-1] != s.shape[:-1]
                or b.shape[-1] != s.shape[-1] * (BLOCK // 2)):
            raise FormatError(f"{name}: MXFP4 blocks {b.shape} {b.dtype} and scales {s.shape} {s.dtype} do not "
                              f"agree (expected uint8 [..., out, in/2] and [..., out, in/{BLOCK}])")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the float tensor this represents: ``(..., out, in)``."""
        return tuple(self.scales.shape[:-1]) + (self.scales.shape[-1] * BLOCK,)

    @property
    def nbytes(self) -> int:
        """Bytes of blocks + scales (4.25 bits per weight)."""
        return self.blocks.nbytes + self.scales.nbytes

    def dequantize(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """The float tensor ``(..., out, in)``; see :func:`dequantize_mxfp4`."""
        return dequantize_mxfp4(self.blocks, self.scales).astype(dtype, copy=False)


def fp4_codes(blocks: np.ndarray) -> np.ndarray:
    """The E2M1 codes of packed bytes ``[..., n]`` -> uint8 ``[..., 2n]``: low nibble first (element 2i),
    high nibble second (element 2i + 1)."""
    codes = np.empty(blocks.shape[:-1] + (blocks.shape[-1], 2), np.uint8)
    codes[..., 0] = blocks & 0x0F
    codes[..., 1] = blocks >> 4
    return codes.reshape(blocks.shape[:-1] + (-1,))


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 ``[..., out, in]`` from blocks uint8 ``[..., out, in/2]`` and scales uint8 ``[..., out, in/32]``.

    ``FP4_VALUES[code] · 2^(scale − 127)`` by ``np.ldexp``, which is exact (a power-of-two product) and, like
    torch.ldexp in transformers, gives ±inf where 6·2^127 overflows float32 and subnormals at 2^-127.
    """
    values = FP4_VALUES[fp4_codes(blocks)]  # (..., out, in)
    lead = values.shape[:-1]
    values = values.reshape(lead + (-1, BLOCK))  # (..., out, in/32, 32)
    exponents = scales.astype(np.int32)[..., None] - SCALE_BIAS  # (..., out, in/32, 1)
    with np.errstate(over="ignore"):
        return np.ldexp(values, exponents).reshape(lead + (-1,))
