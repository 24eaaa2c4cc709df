"""Every affine GGML block type imports exactly: flashmoe's dequantisation of the repacked tensor equals
gguf.quants' own dequantisation of the same bytes, value for value, over random and adversarial blocks."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from flashmoe.convert.gguf import GGML_TYPES
from flashmoe.convert.gguf_quants import AFFINE, affine_tensor, float_tensor
from flashmoe.errors import CheckpointError

gguf = pytest.importorskip("gguf", reason="gguf.quants is the independent dequantiser")
QT = gguf.GGMLQuantizationType
# gguf.quants quantises these itself; the K-quants it only dequantises, so their blocks are random bytes
QUANTISABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_blocks(rng, name: str, rows: int, row: int, extreme: bool) -> np.ndarray:
    """Random bytes for [rows, row] values with each float16 field a finite value: ordinary magnitudes, or
    (extreme) the largest, smallest subnormal and negative ones."""
    size, block = GGML_TYPES[int(QT[name])].type_size, GGML_TYPES[int(QT[name])].block_size
    b = rng.integers(0, 256, (rows * row // block, size), dtype=np.uint8)
    pool = np.array([65504, -65504, 2.0 ** -24, -(2.0 ** -24), 6.1e-5, 0.0, -0.0], np.float16) if extreme else \
        (rng.standard_normal(64) * 0.02).astype(np.float16)
    for at in _F16_FIELDS[name]:
        b[:, at:at + 2] = rng.choice(pool, len(b)).view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


def _check(raw: np.ndarray, name: str) -> None:
    ours = affine_tensor(raw, name, "t").dequantize()
    theirs = gguf.quants.dequantize(raw, QT[name])
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)  # equal values (+0.0 == -0.0; no tolerance)


@pytest.mark.parametrize("name", list(AFFINE))
@pytest.mark.parametrize("extreme", [False, True])
def test_random_blocks_import_exactly(name, extreme):
    rng = np.random.default_rng(zlib.crc32(f"{name}{extreme}".encode()))
    raw = _random_blocks(rng, name, 3, 512, extreme)
    _check(raw, name)
    bits, group = AFFINE[name][:2]
    qt = affine_tensor(raw, name, "t")
    assert (qt.bits, qt.group_size, qt.weight.shape, qt.scales.dtype) == (bits, group, (3, 512 * bits // 32),
                                                                          np.float32)


@pytest.mark.parametrize("name", QUANTISABLE)
def test_quantised_tensors_import_exactly(name):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    w[0] = 0.25  # all-equal block values
    w[1, :32] = 1e4  # an extreme scale
    w[2] = -np.abs(w[2]) - 3  # all negative: a negative min
    _check(gguf.quants.quantize(w, QT[name]), name)


def test_stacked_experts_keep_their_leading_dimension():
    raw = _random_blocks(np.random.default_rng(3), "Q4_K", 2 * 3, 256, False).reshape(2, 3, -1)
    qt = affine_tensor(raw, "Q4_K", "blk.0.ffn_up_exps.weight")
    assert qt.shape == (2, 3, 256)
    np.testing.assert_array_equal(qt.dequantize()[1], gguf.quants.dequantize(raw[1], QT.Q4_K))


def test_non_affine_and_non_finite_are_refused_by_name():
    raw = np.zeros((1, 18), np.uint8)
    with pytest.raises(CheckpointError, match="blk.0.x: GGML type IQ4_NL is not one of the affine"):
        affine_tensor(raw, "IQ4_NL", "blk.0.x")
    raw[0, :2] = np.array([np.inf], np.float16).view(np.uint8)
    with pytest.raises(CheckpointError, match="blk.0.x: a Q4_0 block has a non-finite scale"):
        affine_tensor(raw, "Q4_0", "blk.0.x")


def test_float_types_widen_exactly():
    w = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    for name, qt in (("F32", QT.F32), ("F16", QT.F16), ("BF16", QT.BF16)):
        raw = gguf.quants.quantize(w, qt).view(np.uint8).reshape(3, -1)
        np.testing.assert_array_equal(float_tensor(raw, name).astype(np.float32),
                                      gguf.quants.dequantize(raw, qt))


def test_mxfp4_imports_exactly_over_every_code_and_scale():
    """ggml's MXFP4 blocks (scale byte, then value i and i + 16 in byte i) -> flashmoe's (2i, 2i + 1 in byte
    i): equal values for random bytes (every scale 0..254, so subnormal and huge), all 256 code bytes, and a
    tensor gguf.quants quantised itself."""
    from flashmoe.convert.gguf_quants import mxfp4_tensor

    rng = np.random.default_rng(11)
    raw = rng.integers(0, 256, (255, 2 * 17), dtype=np.uint8)
    raw[:, 0], raw[:, 17] = np.arange(255), np.arange(255)[::-1]  # every scale byte but 255 (NaN in OCP)
    raw[:16, 1:17] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    w = rng.standard_normal((3, 64)).astype(np.float32) * np.float32(1e-3)
    for data in (raw, gguf.quants.quantize(w, QT.MXFP4)):
        with np.errstate(over="ignore"):
            ours, theirs = mxfp4_tensor(data).dequantize(), gguf.quants.dequantize(data, QT.MXFP4)
        np.testing.assert_array_equal(ours, theirs)  # +0.0 == -0.0: code 8 is -0 in flashmoe, +0 in ggml
    t = mxfp4_tensor(raw.reshape(5, 51, -1))
    assert t.blocks.shape == (5, 51, 32) and t.scales.shape == (5, 51, 2)
