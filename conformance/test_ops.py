"""Every Backend operation of every available backend vs the NumPy reference backend, on sizes drawn by
hypothesis (odd sizes, every bit width, group size and scale dtype, k experts), plus the quick suite.

The comparison and tolerances are conformance/op_cases.py's, so a failure here reads like a failing case
of ``flashmoe conformance``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashmoe.backends import available_backends, get_backend
from flashmoe.conformance.op_cases import (BITS, FORMAT_GROUP_SIZES, QUICK_CASES, SCALE_DTYPES, OpCase, array_glue_mismatches,
                                           mxfp4_extremes_excess, run_case)

# The NumPy backend is the reference these are compared with; every other registered backend is checked.
CHECKED = [name for name in available_backends() if name != "numpy"]
UNAVAILABLE = {name: why for name, why in available_backends().items() if why is not None}

EXAMPLES = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                    derandomize=True)


@pytest.fixture(params=CHECKED)
def backend(request) -> str:
    if request.param in UNAVAILABLE:
        pytest.skip(f"backend {request.param} unavailable here: {UNAVAILABLE[request.param]}")
    return request.param


def check(backend: str, case: OpCase) -> None:
    mode = case.p.get("activations", "float")
    if mode not in get_backend(backend).activation_modes:
        pytest.skip(f"backend {backend} computes no {mode} activations (flashmoe.reference.q8)")
    result = run_case(backend, case)
    assert result.passed, result.describe()


quantised = st.one_of(st.none(), st.sampled_from(BITS))
group_sizes = st.sampled_from(FORMAT_GROUP_SIZES)
sdtypes = st.sampled_from(sorted(SCALE_DTYPES))
seeds = st.integers(0, 2**16)


def width(groups: int, group_size: int) -> int:
    """An input width of `groups` runs of max(group_size, 32) values: rows of 3-, 5- and 6-bit codes pack in
    runs of 32 (flashmoe.format.quant), so a width of one group of 16 holds no whole row."""
    return groups * max(group_size, 32)


def test_array_glue_matches_numpy_exactly(backend):
    assert array_glue_mismatches(backend) == []


@pytest.mark.parametrize("case", QUICK_CASES, ids=str)
def test_quick_suite_case_matches_reference(backend, case):
    check(backend, case)


@EXAMPLES
@given(bits=quantised, group_size=group_sizes, sdtype=sdtypes, out=st.integers(1, 80),
       groups=st.integers(1, 4), tokens=st.integers(1, 6), activations=st.sampled_from(["float", "q8"]), seed=seeds)
def test_linear_matches_reference(backend, bits, group_size, sdtype, out, groups, tokens, activations, seed):
    check(backend, OpCase.of("linear", seed, tokens=tokens, out=out, inp=width(groups, group_size), bits=bits,
                             group_size=group_size, sdtype=sdtype, activations=activations))


@EXAMPLES
@given(bits=quantised, group_size=group_sizes, sdtype=sdtypes, vocab=st.integers(1, 70),
       tokens=st.integers(1, 5), seed=seeds)
def test_embed_matches_reference(backend, bits, group_size, sdtype, vocab, tokens, seed):
    check(backend, OpCase.of("embed", seed, tokens=tokens, vocab=vocab, hidden=width(2, group_size), bits=bits,
                             group_size=group_size, sdtype=sdtype))


@EXAMPLES
@given(tokens=st.integers(1, 5), n=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 100.0]),
       eps=st.sampled_from([1e-6, 1e-5]), seed=seeds)
def test_rms_norm_matches_reference(backend, tokens, n, scale, eps, seed):
    check(backend, OpCase.of("rms_norm", seed, tokens=tokens, n=n, scale=scale, eps=eps))


@EXAMPLES
@given(tokens=st.integers(1, 6), heads=st.integers(1, 4), half=st.integers(1, 32), extra=st.integers(0, 3),
       theta=st.sampled_from([1e4, 1e6, 1e7]), max_position=st.sampled_from([8, 1000, 250000]), seed=seeds)
def test_rope_matches_reference(backend, tokens, heads, half, extra, theta, max_position, seed):
    rotary_dim = 2 * half
    check(backend, OpCase.of("rope", seed, tokens=tokens, heads=heads, head_dim=rotary_dim + 2 * extra * half,
                             rotary_dim=rotary_dim, theta=theta, max_position=max_position))


@EXAMPLES
@given(tokens=st.integers(1, 6), cached=st.integers(0, 40), kv_heads=st.integers(1, 3), group=st.integers(1, 4),
       head_dim=st.sampled_from([8, 16, 64, 128]), seed=seeds)
def test_attention_matches_reference(backend, tokens, cached, kv_heads, group, head_dim, seed):
    check(backend, OpCase.of("attention", seed, tokens=tokens, cached=cached, heads=kv_heads * group,
                             kv_heads=kv_heads, head_dim=head_dim))


@EXAMPLES
@given(tokens=st.integers(1, 8), channels=st.integers(1, 70), kernel=st.integers(2, 5), seed=seeds)
def test_causal_conv1d_matches_reference(backend, tokens, channels, kernel, seed):
    check(backend, OpCase.of("causal_conv1d", seed, tokens=tokens, channels=channels, kernel=kernel))


@EXAMPLES
@given(tokens=st.integers(1, 6), k_heads=st.integers(1, 3), rep=st.sampled_from([1, 2, 4]),
       dk=st.sampled_from([4, 16, 32]), dv=st.integers(1, 24), seed=seeds)
def test_gated_delta_rule_matches_reference(backend, tokens, k_heads, rep, dk, dv, seed):
    check(backend, OpCase.of("gated_delta_rule", seed, tokens=tokens, k_heads=k_heads, rep=rep, dk=dk, dv=dv))


@EXAMPLES
@given(bits=quantised, group_size=group_sizes, sdtype=sdtypes, tokens=st.integers(1, 7),
       hidden_groups=st.integers(1, 3), inter_groups=st.integers(1, 2), seed=seeds)
def test_expert_ffn_matches_reference(backend, bits, group_size, sdtype, tokens, hidden_groups, inter_groups, seed):
    check(backend, OpCase.of("expert_ffn", seed, tokens=tokens, hidden=width(hidden_groups, group_size),
                             inter=width(inter_groups, group_size), bits=bits, group_size=group_size, sdtype=sdtype))


@EXAMPLES
@given(bits=quantised, group_size=group_sizes, sdtype=sdtypes, k=st.integers(1, 10),
       hidden_groups=st.integers(1, 3), inter_groups=st.integers(1, 2), seed=seeds)
def test_experts_ffn_matches_reference(backend, bits, group_size, sdtype, k, hidden_groups, inter_groups, seed):
    check(backend, OpCase.of("experts_ffn", seed, k=k, hidden=width(hidden_groups, group_size),
                             inter=width(inter_groups, group_size), bits=bits, group_size=group_size, sdtype=sdtype))


@EXAMPLES
@given(op=st.sampled_from(["sigmoid", "silu", "softplus", "l2_normalize"]), tokens=st.integers(1, 4),
       n=st.integers(1, 100), scale=st.sampled_from([0.1, 4.0, 60.0]), seed=seeds)
def test_elementwise_matches_reference(backend, op, tokens, n, scale, seed):
    check(backend, OpCase.of(op, seed, tokens=tokens, n=n, scale=scale))


@pytest.mark.parametrize("tokens,activations", [(2, "float"), (5, "float"), (2, "q8"), (5, "q8")])  # mat-vec,
# mat-mat, q8 decode, q8 prefill (a tile of 4 and one)
def test_mxfp4_linear_over_every_code_and_extreme_scales(backend, tokens, activations):
    if activations not in get_backend(backend).activation_modes:
        pytest.skip(f"backend {backend} computes no {activations} activations (flashmoe.reference.q8)")
    assert mxfp4_extremes_excess(backend, tokens, activations) <= 1
