"""Speculative reads of the next layer's experts (Engine + ExpertStore.speculate): same logits, bounded reads."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.runtime.load import load_engine

TOKENS = [1, 200, 31, 7, 99, 4000, 12, 5]


def _decode(engine) -> np.ndarray:
    state = engine.new_state()
    logits = [engine.forward(np.array(TOKENS[:3]), state)]
    logits += [engine.forward(np.array([t]), state) for t in TOKENS[3:]]
    engine.store.clear_cache()  # waits for stopped guesses, so their bytes are counted
    return np.concatenate(logits)


@pytest.mark.parametrize("io", ["pagecache", "direct"])
def test_speculation_changes_no_logit_and_guesses_k_experts_per_layer_after_the_first(io):
    """The bundled trained model: with speculation every logit is bit-identical, each decode token guesses
    up to k experts for every MoE layer but the first, and a trained router guesses well above chance (k / E)."""
    plain = load_engine(None, backend="numpy", io=io, context=64)
    engine = load_engine(None, backend="numpy", io=io, context=64, speculate=True)
    # This small model's experts are all in the page cache, where pagecache mode uses them in place and
    # guesses nothing (tests/test_store_in_place.py): read them, as for a model larger than memory.
    plain.store.in_place = engine.store.in_place = False
    want = _decode(plain)
    got = _decode(engine)
    np.testing.assert_array_equal(got, want)

    t, cfg = engine.stats.totals, engine.cfg
    decode_tokens = len(TOKENS) - 3
    assert engine.store.guess_slots == cfg.num_experts_per_tok
    # At most k per layer after the first; fewer while stopped guesses still finish a piece in their slots.
    most = decode_tokens * (len(engine.model_dir.moe_layers) - 1) * cfg.num_experts_per_tok
    assert most // 2 <= t.guesses <= most
    assert t.guesses_used / t.guesses > 2 * cfg.num_experts_per_tok / cfg.num_experts
    assert plain.stats.totals.guesses == 0
    # Guesses are real reads on top of the demand ones; a used guess replaces a demand read.
    assert t.reads >= plain.stats.totals.reads
