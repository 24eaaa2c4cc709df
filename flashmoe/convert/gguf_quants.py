"""llama.cpp's affine block formats repacked into flashmoe's group-wise affine tensors, exactly.

Every format below stores, per block of 32 (or per 16- or 32-value sub-block of a 256-value super-block),
integer codes q and values ``w = s * q + b`` for a per-group scale s and bias b that the block's float16
fields determine. The import computes s and b in float32, rearranges the codes into MLX's packing (a bit
shuffle, never a rounding) and keeps s and b as float32, so ``scales * q + biases`` equals llama.cpp's own
dequantisation (ggml-quants.c's dequantize_row_*, gguf-py's quants.py) value for value: each product of a
float16 and a small integer is exact in float32, and where llama.cpp adds a min it rounds once, as here.

| GGML type | codes | group | scale s | bias b |
|---|---|---|---|---|
| Q4_0 | 4 bits | 32 | d | -8·d |
| Q4_1 | 4 bits | 32 | d | m |
| Q5_0 | 5 bits | 32 | d | -16·d |
| Q5_1 | 5 bits | 32 | d | m |
| Q8_0 | 8 bits (int8 + 128) | 32 | d | -128·d |
| Q2_K | 2 bits | 16 | d·sc | -(dmin·m) |
| Q3_K | 3 bits (q + 4) | 16 | d·(sc - 32) | -4·d·(sc - 32) |
| Q4_K, Q5_K | 4, 5 bits | 32 | d·sc | -(dmin·m) |
| Q6_K | 6 bits (q + 32) | 16 | d·sc | -32·d·sc |

(d, dmin, m: float16 fields; sc, m in K-quants: the 4-, 6- or 8-bit sub-block scales and mins.) Block
layouts: ggml-common.h's block_q4_0 ... block_q6_K.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from flashmoe.convert.gguf import GGML_TYPES
from flashmoe.errors import CheckpointError
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.quant import QuantizedTensor, pack

_Blocks = tuple[np.ndarray, np.ndarray, np.ndarray]  # codes [n, block] uint8, scales and biases [n, groups] f32


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> [n, 1] float32 of the little-endian float16 they hold."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Bytes [n, k*width/2] -> 4-bit codes [n, k*width]: in each run of `width/2` bytes the low nibbles
    are values 0..width/2-1, the high nibbles the next width/2."""
    n = qs.shape[0]
    runs = qs.reshape(n, -1, 1, width // 2) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (runs & np.uint8(0x0F)).reshape(n, -1)


def _bit_planes(qh: np.ndarray, width: int, step: int) -> np.ndarray:
    """Bytes [n, k*width] -> fields of `step` bits [n, k*(8/step)*width]: field j of run r is bits
    [j*step, (j+1)*step) of the run's bytes, value index r*(8/step)*width + j*width + byte."""
    n = qh.shape[0]
    shifts = np.arange(0, 8, step, dtype=np.uint8).reshape(1, 1, -1, 1)
    return ((qh.reshape(n, -1, 1, width) >> shifts) & np.uint8((1 << step) - 1)).reshape(n, -1)


def _q4_0(b: np.ndarray) -> _Blocks:
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:18], 32), d, -8 * d


def _q4_1(b: np.ndarray) -> _Blocks:
    return _nibbles(b[:, 4:20], 32), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # bit i of the little-endian uint32 is value i's
    return _nibbles(qs, 32) | (high << np.uint8(4))


def _q5_0(b: np.ndarray) -> _Blocks:
    d = _f16(b[:, 0:2])
    return _q5(b[:, 2:6], b[:, 6:22]), d, -16 * d


def _q5_1(b: np.ndarray) -> _Blocks:
    return _q5(b[:, 4:8], b[:, 8:24]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b: np.ndarray) -> _Blocks:
    d = _f16(b[:, 0:2])
    return b[:, 2:34] ^ np.uint8(0x80), d, -128 * d  # int8 x as x + 128


def _q2_k(b: np.ndarray) -> _Blocks:
    sc, d, dmin = b[:, 0:16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    codes = _bit_planes(b[:, 16:80], 32, 2)
    return codes, d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32))


def _q3_k(b: np.ndarray) -> _Blocks:
    hmask, qs, packed, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bit_planes(packed[:, 0:8], 8, 4)  # scale j's low 4 bits
    high = _bit_planes(packed[:, 8:12], 4, 2)  # and its high 2 bits
    sc = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = d * sc
    # llama.cpp subtracts 4 where the hmask bit is 0: the 3-bit code is the 2 low bits with the hmask bit above
    codes = _bit_planes(qs, 32, 2) | (_bit_planes(hmask, 32, 1) << np.uint8(2))
    return codes, dl, -4 * dl


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins [n, 8] (ggml's get_scale_min_k4)."""
    n = packed.shape[0]
    d, m, md = (p.reshape(n, 4) for p in np.split(packed.reshape(n, 3, 4), 3, axis=1))
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray) -> _Blocks:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    return _nibbles(b[:, 16:144], 64), d * sc, -(dmin * mn)


def _q5_k(b: np.ndarray) -> _Blocks:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    codes = _nibbles(b[:, 48:176], 64) | (_bit_planes(b[:, 16:48], 32, 1) << np.uint8(4))
    return codes, d * sc, -(dmin * mn)


def _q6_k(b: np.ndarray) -> _Blocks:
    n = b.shape[0]
    low = _nibbles(b[:, 0:128], 128).reshape(n, 2, 4, 32)  # per 128-value half: 4 runs of 32
    high = _bit_planes(b[:, 128:192], 32, 2).reshape(n, 2, 4, 32)
    codes = (low | (high << np.uint8(4))).reshape(n, 256)
    dl = _f16(b[:, 208:210]) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return codes, dl, -32 * dl


#: GGML type name -> (bits, group size, values per block, block decoder)
AFFINE: dict[str, tuple[int, int, int, Callable[[np.ndarray], _Blocks]]] = {
    "Q4_0": (4, 32, 32, _q4_0), "Q4_1": (4, 32, 32, _q4_1), "Q5_0": (5, 32, 32, _q5_0),
    "Q5_1": (5, 32, 32, _q5_1), "Q8_0": (8, 32, 32, _q8_0), "Q2_K": (2, 16, 256, _q2_k),
    "Q3_K": (3, 16, 256, _q3_k), "Q4_K": (4, 32, 256, _q4_k), "Q5_K": (5, 32, 256, _q5_k),
    "Q6_K": (6, 16, 256, _q6_k)}
_TYPE_SIZE = {t.name: t.type_size for t in GGML_TYPES.values()}
#: The GGML type of MXFP4 blocks (gpt-oss's experts), imported by mxfp4_tensor.
MXFP4_TYPE = "MXFP4"
#: Float GGML types -> their NumPy dtype (BF16 as its uint16 bits, widened exactly by float_tensor)
FLOATS = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def affine_tensor(raw: np.ndarray, type_name: str, where: str) -> QuantizedTensor:
    """A GGML tensor of an affine block type as a QuantizedTensor with float32 scales and biases.

    raw: its bytes ``[..., rows, bytes per row]`` (GGUFFile.raw). Returns weight uint32 ``[..., rows,
    row * bits / 32]``, scales/biases float32 ``[..., rows, row / group]``. Raises CheckpointError naming
    `where` for a type that is not affine (see AFFINE) or a non-finite block scale.
    """
    if type_name not in AFFINE:
        raise CheckpointError(f"{where}: GGML type {type_name} is not one of the affine block types "
                              f"({', '.join(AFFINE)})")
    bits, group, block, decode = AFFINE[type_name]
    lead, row_bytes = raw.shape[:-1], raw.shape[-1]
    size = _TYPE_SIZE[type_name]
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    codes, scales, biases = decode(blocks)
    if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
        raise CheckpointError(f"{where}: a {type_name} block has a non-finite scale or min")
    row = row_bytes // size * block
    return QuantizedTensor(weight=pack(codes.reshape(lead + (row,)), bits),
                           scales=np.ascontiguousarray(scales.reshape(lead + (row // group,))),
                           biases=np.ascontiguousarray(biases.reshape(lead + (row // group,))),
                           bits=bits, group_size=group)


def mxfp4_tensor(raw: np.ndarray) -> Mxfp4Tensor:
    """A GGML MXFP4 tensor (type 39) as flashmoe's Mxfp4Tensor, exactly: the same E8M0 scale bytes and E2M1
    codes, the codes moved to flashmoe's (the checkpoint's) nibble order.

    raw: its bytes ``[..., rows, in / 32 * 17]``, each block one scale byte then 16 code bytes whose low nibbles
    are values 0-15 and high nibbles 16-31 (ggml-common.h's block_mxfp4; llama.cpp's converter,
    GptOssModel.transform_nibble_layout, moves the checkpoint's codes so). Returns blocks uint8
    ``[..., rows, in / 2]`` (value 2i in the low nibble of byte i, 2i + 1 in the high one) and scales uint8
    ``[..., rows, in / 32]``. ggml decodes a block as e8m0_to_fp32_half(s) · kvalues[code], which equals
    flashmoe's 2^(s - 127) · FP4_VALUES[code] for every s and code (kvalues are the E2M1 values doubled).
    """
    lead = raw.shape[:-1]
    b = np.ascontiguousarray(raw).reshape(lead + (-1, 17))
    codes = np.concatenate([b[..., 1:] & np.uint8(0x0F), b[..., 1:] >> np.uint8(4)], axis=-1)  # values 0..31
    blocks = codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))
    return Mxfp4Tensor(np.ascontiguousarray(blocks.reshape(lead + (-1,))), np.ascontiguousarray(b[..., 0]))


def float_tensor(raw: np.ndarray, type_name: str) -> np.ndarray:
    """A float GGML tensor's bytes ``[..., rows, bytes per row]`` as its values ``[..., rows, row]``: F32 and
    F16 as they are, BF16 widened to float32 (exact)."""
    values = np.ascontiguousarray(raw).view(FLOATS[type_name])
    if type_name == "BF16":
        return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return values
