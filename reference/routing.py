"""Routing: router logits -> the experts each token uses and their weights, as named functions.

A Family record (flashmoe/arch/families.py) names its router; `route` calls it for the reference and the
engine alike. Every router has the signature of `Router`:

    router(router_logits (T, E) float, cfg, k) -> ids (T, k) int64, weights (T, k) in router_logits' dtype

ids list each token's experts in decreasing preference; the result lives on the host because the ids decide
which experts are read from disk. Routers that need more than the config (a per-layer tensor such as
DeepSeek-V3's score correction bias) take it as a keyword argument.

Sources: Shazeer et al. 2017 (top-k gating); transformers `Qwen3MoeTopKRouter`, `OlmoeTopKRouter`,
`MixtralTopKRouter`, `Qwen3_5MoeSparseMoeBlock`, `Qwen3NextSparseMoeBlock`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import family_of
from flashmoe.reference.ops import softmax

Router = Callable[[np.ndarray, ModelConfig, int], tuple[np.ndarray, np.ndarray]]


def softmax_topk(router_logits: np.ndarray, cfg: ModelConfig, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all E experts, then the k most probable, renormalised to sum 1 when cfg.norm_topk_prob.

    router_logits: (T, E) x·W_gateᵀ. Returns ids (T, k) int64 in decreasing probability (ties: lower id first)
    and weights (T, k) in router_logits' dtype. ModelConfig.norm_topk_prob holds each family's rule (some
    always renormalise, others read the config key).
    """
    probs = softmax(router_logits, axis=-1)  # (T, E)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # (T, k)
    weights = np.take_along_axis(probs, ids, axis=-1)  # (T, k)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids.astype(np.int64), weights


#: Router name (Family.router) -> function.
ROUTERS: dict[str, Router] = {
    "softmax_topk": softmax_topk,
}


def route(router_logits: np.ndarray, cfg: ModelConfig, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Route T tokens with cfg's family router: ids (T, k) int64 and weights (T, k) (see the module doc).

    router_logits: (T, num_experts); k: experts per token, cfg.num_experts_per_tok unless given (the engine's
    experts_per_token setting).
    """
    router = ROUTERS[family_of(cfg).router]
    return router(router_logits, cfg, cfg.num_experts_per_tok if k is None else k)
