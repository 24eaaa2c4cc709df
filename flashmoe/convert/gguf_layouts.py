"""The inverse of what llama.cpp's converter does to tensor layouts: the q/k rows of `llama` models (Mixtral),
permuted for its interleaved RoPE (convert_hf_to_gguf.py, LlamaModel.permute), MLA's RoPE rows, which it keeps
interleaved as the checkpoint has them (flashmoe's canonical rows are rotate-half, families.rope_deinterleave_rows),
and the GatedDeltaNet tensors
(conversion/qwen.py, Qwen3NextModel and _LinearAttentionVReorderBase; bench/gguf_export.py's
_linear_attention_transform does it forwards).

llama.cpp stores every value-head axis in tiled order (value head j of every key head, then j + 1), which
ggml's broadcast expects; the checkpoints, and flashmoe's canonical tensors, group the value heads by key
head. It also stores A as -exp(A_log), conv1d as [C, K] and the shared-expert gate as [H]. Undoing the
reorder is a permutation of whole rows (or of whole quantisation groups of columns, for out_proj), so
quantised tensors stay exact; A_log = log(-A) is float arithmetic (within an ulp of the checkpoint's).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import rope_deinterleave_rows
from flashmoe.arch.gguf_names import ROPE_PERMUTED
from flashmoe.errors import CheckpointError
from flashmoe.format.quant import QuantizedTensor

Stored = QuantizedTensor | np.ndarray


def _grouped_order(cfg: ModelConfig, n: int, head_dim: int, start: int = 0) -> np.ndarray:
    """Indices that take n tiled entries (after the first `start`, heads of `head_dim`) to grouped order."""
    kh, vh = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    v = np.arange(start, n).reshape(vh // kh, kh, head_dim).swapaxes(0, 1).reshape(-1)
    return np.concatenate([np.arange(start), v])


def _rows(w: Stored, order: np.ndarray) -> Stored:
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.weight[order], w.scales[order], w.biases[order], w.bits, w.group_size)
    return w[order]


def _columns(w: Stored, order: np.ndarray, where: str) -> Stored:
    if not isinstance(w, QuantizedTensor):
        return w[:, order]
    g = w.group_size
    groups = order.reshape(-1, g)
    if (groups != groups[:, :1] + np.arange(g)).any() or (groups[:, 0] % g).any():
        raise CheckpointError(f"{where}: its value heads do not fill whole groups of {g}; cannot reorder exactly")
    gidx = groups[:, 0] // g
    per = g * w.bits // 32  # uint32 words per group
    words = (gidx[:, None] * per + np.arange(per)).reshape(-1)
    return QuantizedTensor(w.weight[:, words], w.scales[:, gidx], w.biases[:, gidx], w.bits, g)


def gguf_layout(cfg: ModelConfig, arch: str, name: str) -> Callable[[Stored, str], Stored] | None:
    """For canonical tensor `name` of a `cfg` model read from a GGUF of architecture `arch`, the function
    (stored tensor, where) -> its canonical layout; None when llama.cpp stores it as flashmoe does."""
    if arch in ROPE_PERMUTED and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
        return lambda w, where: _rows(w, _rotate_half_order(w.shape[0], heads))
    if (order := rope_deinterleave_rows(name, cfg)) is not None:  # llama.cpp keeps MLA's interleaved RoPE rows
        return lambda w, where: _rows(w, order)
    return linear_attention_layout(cfg, name)


def _rotate_half_order(n: int, heads: int) -> np.ndarray:
    """Indices that take llama.cpp's interleaved q/k rows (pairs adjacent) back to rotate-half order: the
    inverse of LlamaModel.permute, `w.reshape(heads, 2, d/2, ...).swapaxes(1, 2)`."""
    return np.arange(n).reshape(heads, -1, 2).swapaxes(1, 2).reshape(-1)


def linear_attention_layout(cfg: ModelConfig, name: str) -> Callable[[Stored, str], Stored] | None:
    """For canonical tensor `name` of a GatedDeltaNet model, the function (stored tensor, where) -> its
    canonical layout; None for every other tensor (and for models without linear attention)."""
    if cfg.linear_num_key_heads == 0:  # no GatedDeltaNet layers
        return None
    dv, qk = cfg.linear_value_head_dim, 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
    rest = name.split(".", 2)[2] if name.startswith("layers.") else name

    def rows(head_dim: int, start: int = 0) -> Callable[[Stored, str], Stored]:
        return lambda w, where: _rows(w, _grouped_order(cfg, w.shape[0], head_dim, start))

    def a_log(w: Stored, where: str) -> Stored:
        return np.log(-_rows(w, _grouped_order(cfg, w.shape[0], 1)).astype(np.float64)).astype(w.dtype)

    return {
        "linear_attn.in_proj_qkv.weight": rows(dv, qk),
        "linear_attn.in_proj_z.weight": rows(dv),
        "linear_attn.in_proj_b.weight": rows(1),
        "linear_attn.in_proj_a.weight": rows(1),
        "linear_attn.dt_bias": rows(1),
        "linear_attn.A_log": a_log,
        "linear_attn.conv1d.weight": lambda w, where: rows(dv, qk)(w, where)[:, None, :],
        "linear_attn.out_proj.weight": lambda w, where: _columns(
            w, _grouped_order(cfg, w.shape[-1], dv), where),
        "mlp.shared_expert_gate.weight": lambda w, where: w.reshape(1, -1),
    }.get(rest)
