"""The numba backend's q8 kernels (backends/numba_q8.py) against the q8 reference (flashmoe.reference.q8):
the same activation codes bit for bit, and outputs equal up to the order of float32 sums."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.backends.base import get_backend
from flashmoe.backends.numba_backend import _addresses, _as_weight, _call
from flashmoe.backends.numba_packed import stacked_biases
from flashmoe.conformance.op_cases import CLAMPED_ACT, MXFP4, SCALE_DTYPES, make_expert_views, make_weight
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.reference import q8 as ref
from flashmoe.reference.moe import clamped_swiglu

q8 = pytest.importorskip("flashmoe.backends.numba_q8", reason="numba is not installed")
pytestmark = pytest.mark.skipif(q8.numba is None, reason="numba is not installed")

#: Bound on max|numba - reference| / max|reference| for q8: the codes and int32 sums are identical, so
#: only the order of float32 sums differs.
Q8_KERNEL_TOLERANCE = 1e-5


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("paired", [False, True])
def test_quantize_gives_the_reference_codes_scales_and_sums(paired):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 256)) * 3).astype(np.float32)
    x[1, :32] = 0
    xq, d, xsum = np.empty((3, 256), np.int8), np.empty((3, 8), np.float32), np.empty((3, 4), np.float32)
    q8.quantize_q8(x, 32, paired, xq, d, xsum)
    want_q, want_d = ref.quantize_q8(x)
    if paired:
        want_q = want_q.reshape(3, 4, 32, 2).transpose(0, 1, 3, 2).reshape(3, 256)
    np.testing.assert_array_equal(xq, want_q)
    np.testing.assert_array_equal(d, want_d)
    x_hat = ref.quantize_q8(x)[0].reshape(3, 8, 32).sum(-1) * want_d
    np.testing.assert_allclose(xsum, x_hat.reshape(3, 4, 2).sum(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,group_size,sdtype,inp", [  # x86: paired 4-bit; units (4-bit whose 96 inputs are
    (4, 64, "bfloat16", 512), (4, 128, "bfloat16", 384), (4, 32, "bfloat16", 96),  # not runs of 64, other widths,
    (2, 64, "float16", 256), (3, 32, "float16", 128), (6, 128, "float16", 256), (8, 32, "float16", 128),  # groups
    (2, 16, "float32", 128), (3, 16, "bfloat16", 256), (5, 32, "bfloat16", 256), (6, 16, "float32", 256),  # of 16);
    (4, 16, "bfloat16", 128), (8, 16, "float16", 128)])  # 8-bit in groups of 32 natural
@pytest.mark.parametrize("tokens", [1, 9])  # decode; prefill (tiles of 4 and one left)
def test_q8_linear_matches_the_q8_reference(bits, group_size, sdtype, inp, tokens):
    rng = np.random.default_rng(bits + inp)
    qt = make_weight(rng, 72, inp, bits, group_size, sdtype)
    x = rng.standard_normal((tokens, inp)).astype(np.float32)
    got, = q8.linears(x, q8.linears_plan([_as_weight(qt, "w")], _addresses), _call)
    assert _rel(got, ref.linear_q8(x, qt)) <= Q8_KERNEL_TOLERANCE


def test_a_tokens_output_is_the_same_bits_alone_or_in_a_prefill_tile():
    """Prefill runs the x86 rows (4-bit affine and MXFP4 paired, other widths in units) over tiles of
    Q8_TILE_TOKENS tokens, each token's sums in the order of a decode call, so a prompt token's output does
    not depend on the tokens beside it."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((q8.Q8_TILE_TOKENS + 3, 512)).astype(np.float32)
    affine = [_as_weight(make_weight(rng, 40, 512, b, g, "bfloat16"), "w") for b, g in ((4, 64), (6, 16))]
    fp4 = Mxfp4Tensor(rng.integers(0, 256, (40, 256), dtype=np.uint8), rng.integers(120, 130, (40, 16), dtype=np.uint8))
    for weight in (*affine, _as_weight(fp4, "w")):
        plan = q8.linears_plan([weight], _addresses)
        alone = np.concatenate([q8.linears(x[t : t + 1], plan, _call)[0] for t in range(len(x))])
        np.testing.assert_array_equal(q8.linears(x, plan, _call)[0], alone)


@pytest.mark.parametrize("tokens", [1, 2])
def test_q8_linears_of_one_input_match_the_q8_reference_each(tokens):
    """q/k/v-like: three matrices of one input and different row counts (not multiples of the row chunk)
    in one parallel region, each output equal to its own q8 linear."""
    rng = np.random.default_rng(5)
    qts = [make_weight(rng, rows, 256, 4, 64, "bfloat16") for rows in (72, 24, 40)]
    x = rng.standard_normal((tokens, 256)).astype(np.float32)
    got = q8.linears(x, q8.linears_plan([_as_weight(qt, "w") for qt in qts], _addresses), _call)
    for g, qt in zip(got, qts):
        assert g.shape == (tokens, qt.weight.shape[0])
        assert _rel(g, ref.linear_q8(x, qt)) <= Q8_KERNEL_TOLERANCE


def test_a_plan_is_kept_for_prepared_weights_and_found_again_by_identity():
    """NumbaBackend keeps the q8 plan of a tuple of prepared weights (a decode layer's q/k/v), keyed by their
    ids and checked by identity: a plan left under ids that now name other weights (a weight freed, its id
    reused) is not used for them."""
    be = get_backend("numba", "q8")
    rng = np.random.default_rng(8)
    ws = [be.prepare(make_weight(rng, rows, 256, 4, 64, "bfloat16")) for rows in (72, 24)]
    others = [be.prepare(make_weight(rng, rows, 256, 4, 64, "bfloat16")) for rows in (72, 24)]
    x = rng.standard_normal((1, 256)).astype(np.float32)
    want = [q8.linears(x, q8.linears_plan(group, _addresses), _call) for group in (ws, others)]
    got = be.linears(x, ws)
    plan = be._plans[("q8", *map(id, ws))][1]
    assert be._q8_plan(ws) is plan
    be._plans[("q8", *map(id, others))] = be._plans[("q8", *map(id, ws))]  # as if the ids were reused
    for g, w in zip([got, be.linears(x, ws), be.linears(x, others)], [want[0], want[0], want[1]]):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)
    assert be._q8_plan(others) is not plan


def _clamped_expert_q8(x: np.ndarray, e: dict) -> np.ndarray:
    """gpt-oss's expert with q8 activations on every projection, biases and the clamped SwiGLU."""
    gate, up = (ref.linear_q8(x, e[p]) + e[f"{p}.bias"] for p in ("gate_proj", "up_proj"))
    h = clamped_swiglu(gate, up, CLAMPED_ACT.limit, CLAMPED_ACT.alpha)
    return ref.linear_q8(h, e["down_proj"]) + e["down_proj.bias"]


@pytest.mark.parametrize("bits,group_size,sdtype,clamped", [
    (4, 32, "bfloat16", False), (3, 64, "float16", False), (6, 16, "bfloat16", False), (MXFP4, 32, "", True),
    (4, 64, "bfloat16", True)])
def test_q8_experts_match_the_q8_reference_weighted_sum(bits, group_size, sdtype, clamped):
    """SwiGLU experts, and gpt-oss's (biases, the clamped SwiGLU) in MXFP4 or converted to affine: one
    kernel for both formats."""
    rng = np.random.default_rng(7)
    k, hidden, inter = 4, 256, 192
    experts = [make_expert_views(rng, hidden, inter, bits, group_size, sdtype, 64 * e, biases=clamped)
               for e in range(k)]
    weights = rng.dirichlet(np.ones(k)).astype(np.float32)
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    expert = _clamped_expert_q8 if clamped else ref.swiglu_q8
    want = sum(w * expert(x, e)[0] for w, e in zip(weights, experts))
    packed = {n: [_as_weight(e[n], n) for e in experts] for n in ("gate_proj", "up_proj", "down_proj")}
    g_bias, u_bias, d_bias = (stacked_biases(experts, n, packed[n][0].out_features) for n in packed)
    act = np.array([CLAMPED_ACT.limit, CLAMPED_ACT.alpha] if clamped else [], np.float32)
    g, u, d = (packed[n] for n in ("gate_proj", "up_proj", "down_proj"))
    h = q8.experts_gate_up(x, g[0], _addresses(g), _addresses(u), g_bias, u_bias, act, _call)
    got = q8.experts_down(h, d[0], _addresses(d), d_bias, weights, _call)
    assert _rel(got, want) <= Q8_KERNEL_TOLERANCE


def test_every_affine_width_takes_q8_activations():
    """flashmoe.reference.q8.uses_q8: every width with a row kernel, in groups of 16 (GGUF's K-quants) too."""
    assert all(ref.uses_q8(bits, g) for bits in (2, 3, 4, 5, 6, 8) for g in (16, 32, 64, 128))


@pytest.mark.parametrize("bits,group_size,row", [(4, 64, "paired"), (MXFP4, 32, "paired"), (8, 64, "natural"),
                                                  (6, 16, "units2"), (5, 32, "units1")])
def test_the_x86_row_kernels_use_the_integer_multiply_add_instructions(bits, group_size, row):
    """The x86 mat-vecs (4-bit and MXFP4 paired, 8-bit natural order, other widths in units of 32 codes)
    compile to vpdpbusd (AVX-512 VNNI) or vpmaddubsw + vpmaddwd (AVX2), and all but the 8-bit one prefetch
    their codes ahead (prefetcht0). numba shows no assembly for a kernel loaded from its disk cache, so the
    test compiles a fresh copy."""
    if q8.INT8_INSTRUCTIONS is None:
        pytest.skip("this CPU has no AVX2: the portable loop runs")
    rng = np.random.default_rng(0)
    w = _as_weight(make_weight(rng, 64, 256, bits, group_size, "bfloat16"), "w")
    xq, d, xsum, kind = q8.quantize(rng.standard_normal((1, 256)).astype(np.float32), w.bits, w.group_size)
    fresh = q8.numba.njit(q8.q8_kernels(w.bits, w.scale, kind).matvecs.py_func)
    fresh(_addresses([w]), np.array([0, 64]), xq, d, xsum, np.empty((1, 64), np.float32))
    asm = fresh.inspect_asm(fresh.signatures[0])
    want = ["vpdpbusd"] if q8.INT8_INSTRUCTIONS == "avx512-vnni" else ["vpmaddubsw", "vpmaddwd"]
    want += ["prefetcht0"] if row != "natural" else []
    assert kind == row and all(ins in asm for ins in want), want
