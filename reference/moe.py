"""The sparse Mixture-of-Experts block: router, SwiGLU experts, sigmoid-gated shared expert.

Sources: Shazeer 2020 (SwiGLU); transformers `Qwen3MoeSparseMoeBlock`, `Qwen3_5MoeSparseMoeBlock`,
`Qwen3NextSparseMoeBlock`, `MixtralSparseMoeBlock`, `OlmoeSparseMoeBlock`. The router is the family's
(reference/routing.py).
"""

from __future__ import annotations

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.reference.ops import linear, sigmoid, silu
from flashmoe.reference.routing import route
from flashmoe.arch.tensors import WeightSource


def swiglu(x: np.ndarray, gate_proj: np.ndarray, up_proj: np.ndarray, down_proj: np.ndarray) -> np.ndarray:
    """SwiGLU feed-forward: (SiLU(x·W_gateᵀ) ⊙ x·W_upᵀ)·W_downᵀ (Shazeer 2020).
    x: (T, hidden); gate_proj, up_proj: (I, hidden); down_proj: (hidden, I) -> (T, hidden)."""
    return linear(silu(linear(x, gate_proj)) * linear(x, up_proj), down_proj)


def clamped_swiglu(gate: np.ndarray, up: np.ndarray, limit: float, alpha: float) -> np.ndarray:
    """gpt-oss's gated activation (transformers `GptOssExperts._apply_gate`), elementwise on (T, I):
      gate = min(gate, limit);  up = clip(up, −limit, limit)
      out  = (up + 1) · gate · σ(alpha · gate)
    """
    gate = np.minimum(gate, np.asarray(limit, gate.dtype))
    up = np.clip(up, np.asarray(-limit, up.dtype), np.asarray(limit, up.dtype))
    return (up + 1) * gate * sigmoid(np.asarray(alpha, gate.dtype) * gate)


def expert_ffn(x: np.ndarray, ex: dict[str, np.ndarray], cfg: ModelConfig) -> np.ndarray:
    """One routed expert on the tokens routed to it. x: (n, hidden) -> (n, hidden).

    ex: 'gate_proj', 'up_proj' (I, hidden), 'down_proj' (hidden, I) and, for gpt-oss, their biases
    '{proj}.bias'. SwiGLU, or gpt-oss's clamped SwiGLU when cfg.swiglu_limit is set.
    """
    if cfg.swiglu_limit is None:
        return swiglu(x, ex["gate_proj"], ex["up_proj"], ex["down_proj"])
    gate = linear(x, ex["gate_proj"], ex.get("gate_proj.bias"))  # (n, I)
    up = linear(x, ex["up_proj"], ex.get("up_proj.bias"))  # (n, I)
    return linear(clamped_swiglu(gate, up, cfg.swiglu_limit, cfg.swiglu_alpha), ex["down_proj"],
                  ex.get("down_proj.bias"))


def moe_block(x: np.ndarray, layer: int, weights: WeightSource, cfg: ModelConfig, dtype: type) -> np.ndarray:
    """The sparse MoE feed-forward of decoder layer `layer`. x: (T, hidden) normed -> (T, hidden).

      ids, p = route(x·W_routerᵀ)                         (the family's router, reference/routing.py)
      y_t = Σ_j p_tj · SwiGLU_{ids_tj}(x_t)
      y_t += σ(x_t·W_sgᵀ) · SwiGLU_shared(x_t)            (shared expert, Qwen3.5/Next; ungated: DeepSeek-V3, GLM)
    Each routed expert is fetched once and applied to all tokens routed to it.
    """
    p = f"layers.{layer}.mlp."
    get = lambda name: np.asarray(weights.tensor(p + name), dtype)  # noqa: E731
    router_tensors = {n: get(f"gate.{n}") for n in cfg.router_tensors}  # e.g. a correction bias
    ids, probs = route(linear(x, get("gate.weight")), cfg, **router_tensors)  # (T, k)
    y = np.zeros_like(x)  # (T, hidden)
    for e in np.unique(ids):
        tokens, slot = np.nonzero(ids == e)  # tokens routed to e, and where e sits in their top-k
        ex = {n: np.asarray(a, dtype) for n, a in weights.expert(layer, int(e)).items()}
        y[tokens] += probs[tokens, slot, None] * expert_ffn(x[tokens], ex, cfg)
    if cfg.has_shared_expert:
        shared = swiglu(x, get("shared_expert.gate_proj.weight"), get("shared_expert.up_proj.weight"),
                        get("shared_expert.down_proj.weight"))
        if cfg.has_shared_expert_gate:
            shared = sigmoid(linear(x, get("shared_expert_gate.weight"))) * shared  # gate: (T, 1)
        y += shared
    return y


def dense_mlp(x: np.ndarray, layer: int, weights: WeightSource, dtype: type) -> np.ndarray:
    """The dense SwiGLU MLP of a non-MoE layer (`mlp_only_layers`, `decoder_sparse_step`). (T, hidden)."""
    p = f"layers.{layer}.mlp."
    return swiglu(x, *(np.asarray(weights.tensor(p + f"{n}.weight"), dtype)
                       for n in ("gate_proj", "up_proj", "down_proj")))
