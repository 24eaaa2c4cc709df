"""FP8 e4m3 block-scaled weights: dequantised exactly as transformers' fine-grained FP8 path, and a checkpoint
stored so converts to the same model as its dequantised float twin."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from checkpoints import prompt_tokens
from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.convert.fp8 import dequantize_fp8_blocks
from flashmoe.errors import CheckpointError
from flashmoe.reference import ReferenceModel

torch = pytest.importorskip("torch", reason="FP8 checkpoints are written with torch's float8_e4m3fn")


def _to_fp8_blocks(w: "torch.Tensor", block: tuple[int, int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """DeepSeek's block quantiser (inference/kernel.py act_quant's weight analogue): per block, scale = amax/448
    and W_fp8 = W / scale; returns (float8_e4m3fn weight, float32 scale_inv grid)."""
    br, bc = block
    rows, cols = w.shape
    grid = (-(-rows // br), -(-cols // bc))
    scale = torch.empty(grid)
    q = torch.empty_like(w)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = tile / scale[i, j]
    return q.to(torch.float8_e4m3fn), scale


def test_fp8_blocks_dequantise_as_transformers_with_partial_edge_blocks():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * 0.05
    q, scale = _to_fp8_blocks(w, (128, 128))  # 3 x 2 blocks, the last row and column of blocks partial
    ours = dequantize_fp8_blocks(q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), scale.numpy(),
                                 (128, 128))
    theirs = _dequantize_fp8_weight(q, scale, [128, 128], torch.float32).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert np.abs(ours - w.numpy()).max() < 0.07 * np.abs(w.numpy()).max()  # e4m3: 3 mantissa bits


def test_fp8_scale_grid_that_does_not_fit_is_named():
    q = np.zeros((256, 256), ml_dtypes.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"'layers.0.mlp.gate_proj.weight'.*\[2, 2\]"):
        dequantize_fp8_blocks(q, np.ones((2, 3), np.float32), (128, 128), "layers.0.mlp.gate_proj.weight")


def _fp8_twins(src: Path, root: Path, block: tuple[int, int]) -> tuple[Path, Path]:
    """From a float checkpoint: one whose 2-D weights are FP8 + `_scale_inv` (and a quantization_config), and
    its float twin holding exactly the dequantised values."""
    from safetensors.torch import load_file, save_file

    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    tensors = load_file(src / "model.safetensors")
    fp8, twin = {}, {}
    for name, t in tensors.items():
        if t.ndim == 2 and "embed_tokens" not in name and ".gate.weight" not in name:
            q, scale = _to_fp8_blocks(t, block)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            twin[name] = _dequantize_fp8_weight(q, scale, list(block), torch.float32)
        else:
            fp8[name] = twin[name] = t
    config = json.loads((src / "config.json").read_text())
    dirs = []
    for kind, tensors in (("fp8", fp8), ("twin", twin)):
        d = root / kind
        d.mkdir()
        cfg = dict(config, quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                                   weight_block_size=list(block))) if kind == "fp8" else config
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(d / "model.safetensors"))
        dirs.append(d)
    return dirs[0], dirs[1]


def test_fp8_checkpoint_converts_to_the_logits_of_its_dequantised_twin(hf_checkpoint, tmp_path):
    fp8_dir, twin_dir = _fp8_twins(hf_checkpoint("qwen3_moe", "no_norm_topk_k2"), tmp_path, (32, 16))
    logits = []
    for d in (fp8_dir, twin_dir):
        out = convert_checkpoint(d, tmp_path / f"{d.name}-out", bits="none", progress=False, log=lambda m: None)
        logits.append(ReferenceModel.from_dir(out).forward(prompt_tokens(12)))
    np.testing.assert_array_equal(logits[0], logits[1])


def test_fp8_weight_without_its_scales_is_named(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    fp8_dir, _ = _fp8_twins(hf_checkpoint("qwen3_moe", "no_norm_topk_k2"), tmp_path, (32, 16))
    tensors = load_file(fp8_dir / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(tensors, str(fp8_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_proj.weight'.*without its .*_scale_inv"):
        convert_checkpoint(fp8_dir, tmp_path / "out", bits="none", progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()
