"""MXFP4 decoding (flashmoe.format.mxfp4) is transformers' integrations/mxfp4.py, bit for bit, for every byte
of codes and every E8M0 scale, and checkpoint-shaped tensors are read without copying their bytes."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.errors import FormatError
from flashmoe.format.mxfp4 import BLOCK, Mxfp4Tensor, dequantize_mxfp4


def all_patterns() -> tuple[np.ndarray, np.ndarray]:
    """blocks (256, 256): every byte value in every row; scales (256, 16): row r has scale byte r."""
    blocks = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # (256 rows, 256 bytes = 512 values)
    scales = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 512 // BLOCK, axis=1)  # (256, 16)
    return blocks, scales


def test_every_code_and_scale_decodes_as_transformers_does():
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = all_patterns()
    got = dequantize_mxfp4(blocks, scales)  # (256, 512)
    # transformers takes [E, out, in/32, 16] and returns [E, in, out] (the GptOssExperts orientation)
    want = convert_moe_packed_tensors(torch.from_numpy(blocks.reshape(1, 256, 16, 16)),
                                      torch.from_numpy(scales[None]), dtype=torch.float32)[0].T.numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # signed zeros, infs, subnormals
    # byte b holds elements 2b (low nibble) and 2b + 1 (high nibble); row r has scale 2^(r - 127)
    assert got[0, 2] == 0.5 * 2.0 ** -127 and got[0, 3] == 0.0 and got[127, 30] == -6.0 and got[127, 31] == 0.0
    assert got[254, 30] == -np.inf and got[255, 2] == 2.0 ** 127


def test_checkpoint_blocks_are_flattened_without_changing_bytes():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3, 8, 2, 16), dtype=np.uint8)  # [E, out, in/32, 16]
    scales = rng.integers(120, 130, size=(3, 8, 2), dtype=np.uint8)
    t = Mxfp4Tensor.from_checkpoint(blocks, scales)
    assert t.blocks.shape == (3, 8, 32) and t.shape == (3, 8, 64) and t.nbytes == 3 * 8 * (32 + 2)
    assert t.blocks.tobytes() == blocks.tobytes()
    w = t.dequantize()
    assert w[1, 2, 33] == dequantize_mxfp4(blocks[1, 2].reshape(1, -1), scales[1, 2][None])[0, 33]


@pytest.mark.parametrize("blocks,scales", [
    (np.zeros((4, 16), np.uint8), np.zeros((4, 2), np.uint8)),  # 32 values per row, but 2 scales
    (np.zeros((4, 16), np.int8), np.zeros((4, 1), np.uint8)),
])
def test_mismatched_blocks_and_scales_name_the_tensor(blocks, scales):
    with pytest.raises(FormatError, match="layers.0.mlp.experts.gate_proj"):
        Mxfp4Tensor.from_checkpoint(blocks, scales, "layers.0.mlp.experts.gate_proj")
