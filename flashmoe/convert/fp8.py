"""FP8 (e4m3) weights with one scale per block, dequantised at conversion.

DeepSeek-V3/R1/V3.1, Kimi K2, GLM-4.5-FP8 and MiniMax-M2 publish their linear weights as `float8_e4m3fn`
with a float32 `<name>_scale_inv` holding one factor per block of `weight_block_size` = [128, 128]
(config.json's `quantization_config`, `quant_method` "fp8"):

    W[r, c] = float(W_fp8[r, c]) · scale_inv[r // block_rows, c // block_cols]

The last block of a row or column may be partial (the scale grid is the ceiling of the weight shape over the
block). This is transformers' fine-grained FP8 path (`integrations/finegrained_fp8.py`,
`_dequantize_fp8_weight`) and DeepSeek's `inference/fp8_cast_bf16.py` (`weight_dequant`). flashmoe keeps no
FP8 format of its own: the float result is quantised to the requested bits like any bf16 checkpoint.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_dtypes
import numpy as np

from flashmoe.errors import CheckpointError

#: The suffix of a weight's block scales in the published checkpoints.
SCALE_SUFFIX = "_scale_inv"
#: The block DeepSeek-V3's config gives (`quantization_config.weight_block_size`).
DEFAULT_BLOCK = (128, 128)

FP8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def is_fp8(array: np.ndarray) -> bool:
    """True when `array` holds float8 e4m3 values (safetensors dtype F8_E4M3)."""
    return array.dtype == FP8_E4M3


def block_size(config: Mapping[str, Any], source: str = "config.json") -> tuple[int, int]:
    """(block_rows, block_cols) from config.json's `quantization_config.weight_block_size`, or DEFAULT_BLOCK
    when the config names none. Raises CheckpointError naming `source` for a malformed value."""
    quant = config.get("quantization_config") or {}
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if block is None:
        return DEFAULT_BLOCK
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{source}: quantization_config.weight_block_size must be two positive integers, "
                              f"got {block!r}")
    return block[0], block[1]


def dequantize_fp8_blocks(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK,
                          name: str = "weight") -> np.ndarray:
    """Float32 W = W_fp8 · scale_inv, one scale per `block` of the last two axes.

    weight: float8_e4m3fn (..., rows, cols); scale_inv: float32/bf16 (..., ceil(rows/br), ceil(cols/bc)).
    Returns float32 (..., rows, cols). Raises CheckpointError naming `name` when the scale grid does not
    match the weight's shape for this block size.
    """
    if not is_fp8(weight):
        raise CheckpointError(f"tensor {name!r}: dtype {weight.dtype} is not float8_e4m3fn")
    br, bc = block
    rows, cols = weight.shape[-2:]
    grid = (*weight.shape[:-2], -(-rows // br), -(-cols // bc))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"tensor {name!r}: {name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}, expected "
                              f"{list(grid)} for a weight of shape {list(weight.shape)} in {br}x{bc} blocks")
    scale = np.asarray(scale_inv, np.float32)
    scale = np.repeat(np.repeat(scale, br, axis=-2), bc, axis=-1)[..., :rows, :cols]  # (..., rows, cols)
    return weight.astype(np.float32) * scale
