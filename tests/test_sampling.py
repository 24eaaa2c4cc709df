import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flashmoe.errors import FlashMoeError
from flashmoe.serve.sampling import Sampler


def test_greedy_picks_argmax():
    assert Sampler(temperature=0)(np.array([0.1, 3.0, -1.0, 2.9])) == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, 1.9, -1.0])
    # token 0 seen: 2.0 / 1.5 = 1.33 < 1.9, so greedy moves to token 1
    assert Sampler(repetition_penalty=1.5)(logits, history=[0]) == 1
    # a seen negative logit gets more negative: -1.0 * 1.5 = -1.5 < -1.2
    assert Sampler(repetition_penalty=1.5)(np.array([-1.0, -1.2]), history=[0]) == 1


def test_top_k_one_is_greedy_at_any_temperature():
    rng = np.random.default_rng(0)
    for seed in range(20):
        logits = rng.normal(size=50)
        assert Sampler(temperature=5.0, top_k=1, seed=seed)(logits) == int(np.argmax(logits))


def test_top_p_keeps_the_token_that_crosses_the_mass():
    # probabilities 0.5, 0.3, 0.2: top_p=0.6 keeps {0, 1}, never 2
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    picks = {Sampler(temperature=1.0, top_p=0.6, seed=s)(logits) for s in range(200)}
    assert picks == {0, 1}


def test_min_p_drops_tokens_below_fraction_of_top():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    picks = {Sampler(temperature=1.0, min_p=0.4, seed=s)(logits) for s in range(200)}
    assert picks == {0, 1}  # 0.1 < 0.4 * 0.6


def test_sampling_frequencies_follow_the_distribution():
    probs = np.array([0.7, 0.2, 0.1])
    sampler = Sampler(temperature=1.0, seed=1)
    draws = np.bincount([sampler(np.log(probs)) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(draws, probs, atol=0.03)


def test_same_seed_same_tokens():
    logits = np.random.default_rng(3).normal(size=100)
    first, second = Sampler(temperature=1.0, seed=7), Sampler(temperature=1.0, seed=7)
    assert [first(logits) for _ in range(10)] == [second(logits) for _ in range(10)]


def test_seed_minus_one_is_a_random_seed_and_other_negative_seeds_are_refused():
    """llama.cpp's convention: -1 draws a fresh seed (as None does); -2 is a mistake, named as such."""
    logits = np.zeros(1000)
    runs = [[Sampler(temperature=1.0, seed=-1)(logits) for _ in range(5)] for _ in range(2)]
    assert runs[0] != runs[1]  # equal by chance with probability 1e-15
    with pytest.raises(FlashMoeError) as e:
        Sampler(temperature=1.0, seed=-2)
    assert str(e.value) == "seed (--seed) must be >= 0, or -1 for a random seed, got -2"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=64), st.integers(0, 10), st.floats(0.05, 1.0))
def test_sampled_token_is_always_in_vocabulary(values, top_k, top_p):
    token = Sampler(temperature=0.7, top_k=top_k, top_p=top_p, seed=0)(np.array(values))
    assert 0 <= token < len(values)


def test_settings_at_the_edge_of_their_range_sample_without_overflow():
    """A temperature or repetition penalty near 0 (1e-320, --temperature 1e-320 as typed) made the probabilities
    NaN (overflow to inf, then inf - inf), a traceback from NumPy's choice: the limit is greedy, and the seen
    logits the penalty made infinite tie for the top."""
    logits = np.array([0.1, 3.0, -1.0, 2.9])
    for seed in range(10):
        assert Sampler(temperature=1e-320, seed=seed)(logits) == 1
        assert Sampler(temperature=1.0, repetition_penalty=1e-320, seed=seed)(logits, history=[0, 2]) == 0
        assert Sampler(temperature=1.0, repetition_penalty=1e-320, seed=seed)(logits, history=[1, 3]) in (1, 3)
    assert Sampler(temperature=float("inf"), seed=0)(logits) in range(4)  # uniform


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(min_p=1.0), dict(top_k=-2),
                                    dict(repetition_penalty=0)])
def test_invalid_settings_raise_clear_error(kwargs):
    with pytest.raises(FlashMoeError):
        Sampler(**kwargs)
