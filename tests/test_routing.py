"""The routers of reference/routing.py: each family's named router gives the ids and weights its transformers
router gives, and `route` reaches it through the Family record."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import FAMILIES
from flashmoe.reference.routing import ROUTERS, route, softmax_topk

MIXTRAL = {"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "vocab_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 8}
LOGITS = np.log(np.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.4, 0.1]], np.float32))  # softmax = these rows


def test_softmax_topk_keeps_the_k_most_probable_in_order_renormalised_when_the_config_says():
    norm = ModelConfig.from_dict(MIXTRAL)  # Mixtral always renormalises
    ids, weights = softmax_topk(LOGITS, norm, 2)
    assert ids.dtype == np.int64 and weights.dtype == np.float32
    assert ids.tolist() == [[1, 3], [2, 0]]  # the tie 0.25/0.25 goes to the lower id
    np.testing.assert_allclose(weights, [[0.4 / 0.7, 0.3 / 0.7], [0.4 / 0.65, 0.25 / 0.65]], rtol=1e-6)
    plain = ModelConfig.from_dict(dict(MIXTRAL, model_type="olmoe", norm_topk_prob=False))
    np.testing.assert_allclose(softmax_topk(LOGITS, plain, 2)[1], [[0.4, 0.3], [0.4, 0.25]], rtol=1e-6)


def test_route_calls_the_family_router_with_the_configs_k_unless_given():
    cfg = ModelConfig.from_dict(MIXTRAL)
    np.testing.assert_array_equal(route(LOGITS, cfg)[0], [[1, 3], [2, 0]])
    ids, weights = route(LOGITS, cfg, k=1)
    assert ids.tolist() == [[1], [2]] and weights.tolist() == [[1.0], [1.0]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_names_a_router_that_exists(family):
    assert FAMILIES[family].router in ROUTERS
