"""Speculative reads of the next layer's experts (Engine + ExpertStore.speculate): same logits, bounded reads."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.runtime.load import load_engine

TOKENS = [1, 200, 31, 7, 99, 4000, 12, 5]


def _decode(engine, tokens: list[int] = TOKENS) -> np.ndarray:
    state = engine.new_state()
    logits = [engine.forward(np.array(tokens[:3]), state)]
    logits += [engine.forward(np.array([t]), state) for t in tokens[3:]]
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


def test_guesses_follow_the_routing_rule_of_a_router_with_a_correction_bias(hf_checkpoint, tmp_path):
    """GLM-4.5's sigmoid routing in expert groups with a correction bias large enough to change the choice:
    the guesses for the next layer are its router's own top choices on the current layer's input, which
    here differ from the largest raw router logits."""
    from flashmoe.convert.checkpoint import convert_checkpoint
    from flashmoe.reference.routing import noaux_tc

    path = hf_checkpoint("glm4_moe", "groups_no_norm_topk_all_moe")  # 4 groups, 2 kept; every layer MoE
    engine = load_engine(convert_checkpoint(path, tmp_path / "m", bits="none", progress=False, log=lambda _: None),
                         backend="numpy", context=64, speculate=True)
    seen, guessed = [], []
    speculate, store_speculate = engine._speculate, engine.store.speculate
    engine._speculate = lambda layer, x, after: (seen.append((layer, engine.backend.to_numpy(x))),
                                                 speculate(layer, x, after))[1]
    engine.store.speculate = lambda layer, ids, after: (guessed.append(ids), store_speculate(layer, ids, after))[1]
    _decode(engine, [t % engine.cfg.vocab_size for t in TOKENS])

    cfg, slots, differ = engine.cfg, engine.store.guess_slots, 0
    assert len(seen) == len(guessed) == (len(TOKENS) - 3) * (len(cfg.moe_layers) - 1)
    for (layer, x), ids in zip(seen, guessed):
        logits = x @ engine._w[f"layers.{layer}.mlp.gate.weight"].T
        bias = engine._router_tensors[layer]["e_score_correction_bias"]
        want, _ = noaux_tc(logits, cfg, slots, e_score_correction_bias=bias)
        assert ids == [int(e) for e in want[0]]
        differ += ids != [int(e) for e in np.argsort(-logits[0], kind="stable")[:slots]]
    assert differ > 0  # ranking by raw logits would have guessed other experts
