"""The sparse Mixture-of-Experts block: router, SwiGLU experts, sigmoid-gated shared expert.

Sources: Shazeer et al. 2017 (top-k gating), Shazeer 2020 (SwiGLU); transformers `Qwen3MoeTopKRouter`,
`OlmoeTopKRouter`, `MixtralTopKRouter`, `Qwen3_5MoeSparseMoeBlock`, `Qwen3NextSparseMoeBlock`.
"""

from __future__ import annotations

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.reference.ops import linear, sigmoid, silu, softmax
from flashmoe.arch.tensors import WeightSource


def route(logits: np.ndarray, k: int, norm_topk_prob: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all experts, then the top k (softmax-then-top-k, as every supported family).

    logits: (T, E) router logits x·W_gateᵀ. Returns ids (T, k) int64, experts in decreasing probability,
    and weights (T, k) in logits' dtype: the top-k probabilities, divided by their sum when
    `norm_topk_prob` (ModelConfig.norm_topk_prob holds each family's rule: Mixtral and Qwen3.5 always
    renormalise; Qwen3-MoE, Qwen3-Next and OLMoE follow the config).
    """
    probs = softmax(logits, axis=-1)  # (T, E)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # (T, k)
    weights = np.take_along_axis(probs, ids, axis=-1)  # (T, k)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids.astype(np.int64), weights


def swiglu(x: np.ndarray, gate_proj: np.ndarray, up_proj: np.ndarray, down_proj: np.ndarray) -> np.ndarray:
    """SwiGLU feed-forward: (SiLU(x·W_gateᵀ) ⊙ x·W_upᵀ)·W_downᵀ (Shazeer 2020).
    x: (T, hidden); gate_proj, up_proj: (I, hidden); down_proj: (hidden, I) -> (T, hidden)."""
    return linear(silu(linear(x, gate_proj)) * linear(x, up_proj), down_proj)


def moe_block(x: np.ndarray, layer: int, weights: WeightSource, cfg: ModelConfig, dtype: type) -> np.ndarray:
    """The sparse MoE feed-forward of decoder layer `layer`. x: (T, hidden) normed -> (T, hidden).

      ids, p = route(x·W_routerᵀ)
      y_t = Σ_j p_tj · SwiGLU_{ids_tj}(x_t)
      y_t += σ(x_t·W_sgᵀ) · SwiGLU_shared(x_t)            (shared expert, Qwen3.5/Next)
    Each routed expert is fetched once and applied to all tokens routed to it.
    """
    p = f"layers.{layer}.mlp."
    get = lambda name: np.asarray(weights.tensor(p + name), dtype)  # noqa: E731
    ids, probs = route(linear(x, get("gate.weight")), cfg.num_experts_per_tok, cfg.norm_topk_prob)  # (T, k)
    y = np.zeros_like(x)  # (T, hidden)
    for e in np.unique(ids):
        tokens, slot = np.nonzero(ids == e)  # tokens routed to e, and where e sits in their top-k
        ex = {n: np.asarray(a, dtype) for n, a in weights.expert(layer, int(e)).items()}
        y[tokens] += probs[tokens, slot, None] * swiglu(x[tokens], ex["gate_proj"], ex["up_proj"], ex["down_proj"])
    if cfg.has_shared_expert:
        shared = swiglu(x, get("shared_expert.gate_proj.weight"), get("shared_expert.up_proj.weight"),
                        get("shared_expert.down_proj.weight"))
        y += sigmoid(linear(x, get("shared_expert_gate.weight"))) * shared  # gate: (T, 1)
    return y


def dense_mlp(x: np.ndarray, layer: int, weights: WeightSource, dtype: type) -> np.ndarray:
    """The dense SwiGLU MLP of a non-MoE layer (`mlp_only_layers`, `decoder_sparse_step`). (T, hidden)."""
    p = f"layers.{layer}.mlp."
    return swiglu(x, *(np.asarray(weights.tensor(p + f"{n}.weight"), dtype)
                       for n in ("gate_proj", "up_proj", "down_proj")))
