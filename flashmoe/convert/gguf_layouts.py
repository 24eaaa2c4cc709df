"""The inverse of what llama.cpp's converter does to tensor layouts: attention's q, k and v rows concatenated
into one attn_qkv (its `--fuse-qkv` option), the q/k rows of `llama` models (Mixtral),
permuted for its interleaved RoPE (convert_hf_to_gguf.py, LlamaModel.permute), MLA's RoPE rows, which it keeps
interleaved as the checkpoint has them (flashmoe's canonical rows are rotate-half, families.rope_deinterleave_rows),
and the GatedDeltaNet tensors
(conversion/qwen.py, Qwen3NextModel and _LinearAttentionVReorderBase; bench/gguf_export.py's
_linear_attention_transform does it forwards).

For Qwen3.5 (qwen35moe) llama.cpp stores every value-head axis in tiled order (value head j of every key head,
then j + 1), which ggml's broadcast expects; the checkpoints, and flashmoe's canonical tensors, group the value
heads by key head, as llama.cpp's Qwen3-Next (qwen3next) files do too. Qwen3-Next files keep b and a fused as
the checkpoint's in_proj_ba (ssm_ba; per key head its b rows, then its a rows), and older ones in_proj_qkvz
(ssm_in; per key head q, k, v, z): flashmoe.arch.families.split_qkvz's rows. Both store A as -exp(A_log), conv1d
as [C, K] and the shared-expert gate as [H]. Undoing the reorder or the fusion takes whole rows (or whole
quantisation groups of columns, for out_proj), so quantised tensors stay exact; A_log = log(-A) is float
arithmetic (within an ulp of the checkpoint's).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import rope_deinterleave_rows, split_qkvz
from flashmoe.arch.gguf_names import FUSED_QKV, LEGACY_NAMES, ROPE_PERMUTED, TILED_VALUE_HEADS
from flashmoe.arch.tensors import attention_rows
from flashmoe.errors import CheckpointError
from flashmoe.format.quant import QuantizedTensor, pack, unpack

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
    # codes moved one by one: a group of 16 3-bit codes is 1.5 words, so words cannot move whole
    codes = unpack(w.weight, w.bits)[..., order]
    return QuantizedTensor(pack(codes, w.bits), w.scales[:, gidx], w.biases[:, gidx], w.bits, g)


def gguf_layout(cfg: ModelConfig, arch: str, name: str, source: str = "") -> Callable[[Stored, str], Stored] | None:
    """For canonical tensor `name` of a `cfg` model read from GGUF tensor `source` of a file of architecture
    `arch`, the function (stored tensor, where) -> its canonical layout; None when llama.cpp stores it as flashmoe
    does. A fused attn_qkv is split first, then the projection's own layout undone (llama.cpp fused after it)."""
    split, undo = _qkv_rows(cfg, name, source), _layout(cfg, arch, name, source)
    if split is None or undo is None:
        return split or undo
    return lambda w, where: undo(split(w, where), where)


def _qkv_rows(cfg: ModelConfig, name: str, source: str) -> Callable[[Stored, str], Stored] | None:
    """For canonical self_attn.{q,k,v}_proj.{weight,bias} read from a fused attn_qkv (FUSED_QKV), the function
    taking its rows (q's, then k's, then v's: sizes from the metadata's head counts); else None. Raises
    CheckpointError naming the tensor when its rows are not q's, k's and v's together."""
    parts = name.split(".")  # layers, i, self_attn, q_proj, weight
    if not source.endswith(("attn_qkv.weight", "attn_qkv.bias")) or parts[2:3] != ["self_attn"]:
        return None
    rows, proj = attention_rows(cfg), parts[3]
    order = list(rows)
    start, total = sum(rows[p] for p in order[:order.index(proj)]), sum(rows.values())

    def split(w: Stored, where: str) -> Stored:
        if w.shape[0] != total:
            raise CheckpointError(f"{where}: {w.shape[0]} rows, the metadata make q, k and v "
                                  f"{' + '.join(map(str, rows.values()))} = {total}")
        return _rows(w, slice(start, start + rows[proj]))
    return split


def _layout(cfg: ModelConfig, arch: str, name: str, source: str) -> Callable[[Stored, str], Stored] | None:
    """gguf_layout of a tensor as llama.cpp's converter stores it, once split out of a `--fuse-qkv` attn_qkv."""
    if arch in ROPE_PERMUTED and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
        return lambda w, where: _rows(w, _rotate_half_order(w.shape[0], heads))
    if (order := rope_deinterleave_rows(name, cfg)) is not None:  # llama.cpp keeps MLA's interleaved RoPE rows
        return lambda w, where: _rows(w, order)
    return linear_attention_layout(cfg, name, arch in TILED_VALUE_HEADS, source)


def source_name(tensors: Mapping[str, object], gname: str | None) -> str | None:
    """The GGUF tensor that holds `gname`: itself, or the fused tensor (LEGACY_NAMES, FUSED_QKV) when only that is
    in the file."""
    parts = (gname or "").split(".", 2)  # blk, N, X
    fused = LEGACY_NAMES.get(parts[2]) or FUSED_QKV.get(parts[2]) if len(parts) == 3 else None
    if gname in tensors or fused is None:
        return gname
    fused = f"blk.{parts[1]}.{fused}"
    return fused if fused in tensors else gname


def _rotate_half_order(n: int, heads: int) -> np.ndarray:
    """Indices that take llama.cpp's interleaved q/k rows (pairs adjacent) back to rotate-half order: the
    inverse of LlamaModel.permute, `w.reshape(heads, 2, d/2, ...).swapaxes(1, 2)`."""
    return np.arange(n).reshape(heads, -1, 2).swapaxes(1, 2).reshape(-1)


def linear_attention_layout(cfg: ModelConfig, name: str, tiled: bool = True,
                            source: str = "") -> Callable[[Stored, str], Stored] | None:
    """For canonical tensor `name` of a GatedDeltaNet model read from GGUF tensor `source`, the function (stored
    tensor, where) -> its canonical layout; None for every other tensor (and for models without linear attention).
    tiled: the file's value heads are in llama.cpp's tiled order (module docstring)."""
    if cfg.linear_num_key_heads == 0:  # no GatedDeltaNet layers
        return None
    dv, qk = cfg.linear_value_head_dim, 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
    rest = name.split(".", 2)[2] if name.startswith("layers.") else name
    if source.endswith(("ssm_ba.weight", "ssm_in.weight")):
        kind = "ba" if source.endswith("ssm_ba.weight") else "qkvz"
        return lambda w, where: _rows(w, _fused_rows(cfg, kind, rest, w.shape[0], where))

    def order(n: int, head_dim: int, start: int = 0) -> np.ndarray:
        return _grouped_order(cfg, n, head_dim, start) if tiled else np.arange(n)

    def rows(head_dim: int, start: int = 0) -> Callable[[Stored, str], Stored]:
        return lambda w, where: _rows(w, order(w.shape[0], head_dim, start))

    def a_log(w: Stored, where: str) -> Stored:
        return np.log(-_rows(w, order(w.shape[0], 1)).astype(np.float64)).astype(w.dtype)

    return {
        "linear_attn.in_proj_qkv.weight": rows(dv, qk),
        "linear_attn.in_proj_z.weight": rows(dv),
        "linear_attn.in_proj_b.weight": rows(1),
        "linear_attn.in_proj_a.weight": rows(1),
        "linear_attn.dt_bias": rows(1),
        "linear_attn.A_log": a_log,
        "linear_attn.conv1d.weight": lambda w, where: rows(dv, qk)(w, where)[:, None, :],
        "linear_attn.out_proj.weight": lambda w, where: _columns(w, order(w.shape[-1], dv), where),
        "mlp.shared_expert_gate.weight": lambda w, where: w.reshape(1, -1),
    }.get(rest)


def _fused_rows(cfg: ModelConfig, kind: str, rest: str, n: int, where: str) -> np.ndarray:
    """The rows of a fused in_proj_`kind` ('ba' or 'qkvz', n rows) that are canonical tensor `rest`
    (`linear_attn.in_proj_b.weight`, ...): split_qkvz applied to the row indices."""
    parts = dict(split_qkvz(where, "linear_attn", kind, "weight", np.arange(n), cfg))
    return parts[rest]
