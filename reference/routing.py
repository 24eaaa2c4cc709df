"""Routing: router logits -> the experts each token uses and their weights, as named functions.

A Family record (flashmoe/arch/families.py) names its router; `route` calls it for the reference and the
engine alike. Every router has the signature of `Router`:

    router(router_logits (T, E) float, cfg, k) -> ids (T, k) int64, weights (T, k) in router_logits' dtype

ids list each token's experts in decreasing preference; the result lives on the host because the ids decide
which experts are read from disk. Routers that need more than the config (a per-layer tensor such as
DeepSeek-V3's score correction bias) take it as a keyword argument.

Sources: Shazeer et al. 2017 (top-k gating); DeepSeek-V3 Technical Report §2.1.2 (noaux_tc); transformers
`Qwen3MoeTopKRouter`, `OlmoeTopKRouter`, `MixtralTopKRouter`, `Qwen3_5MoeSparseMoeBlock`,
`Qwen3NextSparseMoeBlock`, `DeepseekV3TopkRouter`, `GptOssTopKRouter`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import family_of
from flashmoe.reference.ops import sigmoid, softmax

Router = Callable[[np.ndarray, ModelConfig, int], tuple[np.ndarray, np.ndarray]]


def softmax_topk(router_logits: np.ndarray, cfg: ModelConfig, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all E experts, then the k most probable, renormalised to sum 1 when cfg.norm_topk_prob.

    router_logits: (T, E) x·W_gateᵀ. Returns ids (T, k) int64 in decreasing probability (ties: lower id first)
    and weights (T, k) in router_logits' dtype. ModelConfig.norm_topk_prob holds each family's rule (some
    always renormalise, others read the config key).
    """
    probs = softmax(router_logits, axis=-1)  # (T, E)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # (T, k)
    weights = probs[np.arange(len(ids))[:, None], ids]  # (T, k): take_along_axis's values, not its index building
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids.astype(np.int64), weights


def noaux_tc(router_logits: np.ndarray, cfg: ModelConfig, k: int, *,
             e_score_correction_bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores, a bias that only chooses, group-limited top-k, renormalise, scale ("noaux_tc").

    DeepSeek-V3 (and Kimi K2, GLM-4.5) balance expert load without an auxiliary loss by a per-expert bias
    that is added to the scores for choosing experts only (DeepSeek-V3 report §2.1.2, eqs. 15–16; "node-
    limited routing" restricts a token to `topk_group` of `n_group` expert groups). transformers
    `DeepseekV3TopkRouter.forward`:
      s = σ(router_logits)                          (T, E)
      c = s + e_score_correction_bias                      choice scores
      group score = sum of the top 2 of c per group (T, n_group); keep the topk_group best groups
      ids = top k of c over the kept groups' experts
      w = s[ids] (unbiased), / Σ w when norm_topk_prob, · routed_scaling_factor

    router_logits: (T, E) float32 x·W_gateᵀ; e_score_correction_bias: (E,) float32 (`mlp.gate.…`).
    Returns ids (T, k) int64 in decreasing choice score and weights (T, k) in router_logits' dtype.
    """
    T, E = router_logits.shape
    scores = sigmoid(router_logits)  # (T, E)
    choice = scores + e_score_correction_bias.astype(scores.dtype)  # (T, E)
    if cfg.n_group > 1:
        groups = choice.reshape(T, cfg.n_group, E // cfg.n_group)  # (T, G, E/G)
        group_scores = -np.sort(-groups, axis=-1)[..., :2].sum(axis=-1)  # (T, G) sum of each group's top 2
        kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, : cfg.topk_group]  # (T, topk_group)
        keep = np.zeros((T, cfg.n_group), bool)
        np.put_along_axis(keep, kept, True, axis=-1)
        choice = np.where(np.repeat(keep, E // cfg.n_group, axis=-1), choice, -np.inf)  # other groups excluded
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :k]  # (T, k)
    weights = np.take_along_axis(scores, ids, axis=-1)  # (T, k) unbiased scores
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.asarray(1e-20, weights.dtype))
    return ids.astype(np.int64), weights * np.asarray(cfg.routed_scaling_factor, weights.dtype)


def topk_softmax(router_logits: np.ndarray, cfg: ModelConfig, k: int, *,
                 bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k largest biased router logits, then a softmax over those k only (gpt-oss, transformers
    `GptOssTopKRouter`: logits = x·W_gateᵀ + b).

    router_logits: (T, E) x·W_gateᵀ; bias: (E,) the router's bias (`mlp.gate.bias`). Returns ids (T, k) int64 in
    decreasing logit (ties: lower id first) and weights (T, k) in router_logits' dtype, summing to 1.
    """
    router_logits = router_logits + bias.astype(router_logits.dtype)  # (T, E)
    ids = np.argsort(-router_logits, axis=-1, kind="stable")[:, :k]  # (T, k)
    return ids.astype(np.int64), softmax(np.take_along_axis(router_logits, ids, axis=-1), axis=-1)


#: Router name (Family.router) -> function.
ROUTERS: dict[str, Router] = {
    "softmax_topk": softmax_topk,
    "noaux_tc": noaux_tc,
    "topk_softmax": topk_softmax,
}


def route(router_logits: np.ndarray, cfg: ModelConfig, k: int | None = None,
          **router_tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Route T tokens with cfg's family router: ids (T, k) int64 and weights (T, k) (see the module doc).

    router_logits: (T, num_experts); k: experts per token, cfg.num_experts_per_tok unless given (the engine's
    experts_per_token setting); router_tensors: the layer's `mlp.gate.{name}` tensors that Family.router_tensors
    names (DeepSeek-V3's e_score_correction_bias).
    """
    router = ROUTERS[family_of(cfg).router]
    return router(router_logits, cfg, cfg.num_experts_per_tok if k is None else k, **router_tensors)
