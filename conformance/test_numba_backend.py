"""What the numba backend promises beyond matching the reference: streamed weights are used in place, bad
indices are refused before a kernel (which does not bounds-check) could read outside an array, and
experts the fused kernels cannot take still run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba", reason="the numba backend needs numba")

from flashmoe.backends import get_backend  # noqa: E402
from flashmoe.backends.base import BackendError  # noqa: E402
from flashmoe.backends.numba_backend import _as_weight  # noqa: E402
from flashmoe.conformance.op_cases import make_expert_views, make_weight  # noqa: E402


def test_bf16_expert_is_used_in_place_without_copying_words_or_scales():
    expert = make_expert_views(np.random.default_rng(0), 128, 64, 4, 64, "bfloat16")
    for name, qt in expert.items():
        kw = _as_weight(qt, name)
        assert np.shares_memory(kw.words, qt.weight), name
        assert np.shares_memory(kw.scales, qt.scales) and np.shares_memory(kw.biases, qt.biases), name
        assert kw.bf16


def test_embed_refuses_token_ids_outside_the_vocabulary():
    w = make_weight(np.random.default_rng(0), 10, 64, 4, 64, "bfloat16")
    with pytest.raises(BackendError, match=r"token ids 3\.\.10 outside 0\.\.9"):
        get_backend("numba").embed(np.array([3, 10]), w)


def test_attention_refuses_query_positions_beyond_the_cache():
    q = np.zeros((1, 2, 8), np.float32)
    kv = np.zeros((4, 1, 8), np.float32)
    with pytest.raises(BackendError, match="query positions 4..4 outside the 4 cached keys"):
        get_backend("numba").attention(q, kv, kv, np.array([4]), 1.0)


def test_experts_of_mixed_widths_run_one_by_one_and_match_the_reference():
    rng = np.random.default_rng(1)
    experts = [make_expert_views(rng, 128, 64, bits, 64, "bfloat16") for bits in (4, 8)]
    x = rng.standard_normal(128).astype(np.float32)
    weights = np.array([0.7, 0.3], np.float32)
    got = get_backend("numba").experts_ffn(x, experts, weights)
    want = get_backend("numpy").experts_ffn(x, experts, weights)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_float16_scales_are_widened_exactly():
    w = make_weight(np.random.default_rng(2), 8, 64, 4, 32, "float16")
    kw = _as_weight(w, "w")
    assert kw.scales.dtype == np.float32 and np.array_equal(kw.scales, w.scales.astype(np.float32))
