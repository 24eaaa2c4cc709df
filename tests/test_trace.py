"""The engine's trace (flashmoe.runtime.trace.Tracer, `flashmoe generate --trace`) against independent counts: the
store's counters for bytes, hits and time, the reference model's router for the experts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from chat_helpers import TINY_QWEN35, write_model_dir
from checkpoints import prompt_tokens
from flashmoe.runtime.replay import replay
from flashmoe.cli import app
from flashmoe.errors import FormatError
from flashmoe.runtime.load import load_engine
from flashmoe.runtime.expert_files import slot_bytes
from flashmoe.convert.synth import synth_model
from flashmoe.runtime.trace import TraceHeader, TraceWriter, read_trace, record_trace


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random Qwen3.5-MoE text model (4 MoE layers, 16 experts, k=4) with a small tokenizer."""
    out = tmp_path_factory.mktemp("trace") / "tiny"
    synth_model(out, TINY_QWEN35, tokenizer=None)
    write_model_dir(out, None)
    return out


def _greedy_run(engine, prompt: np.ndarray, tokens: int) -> list[int]:
    """Prefill `prompt`, then decode `tokens` greedy tokens, marking each token in engine.stats like
    generate does. Returns the sequence fed to the model."""
    state, seq = engine.new_state(), [int(t) for t in prompt]
    engine.stats.start()
    logits = engine.forward(prompt, state)
    for _ in range(tokens):
        seq.append(int(np.argmax(logits[-1])))
        engine.stats.token_done()
        logits = engine.forward(np.array(seq[-1:]), state)
    engine.stats.token_done()
    return seq


@pytest.mark.parametrize("io, max_memory", [("pagecache", None), ("direct", "4G")])
def test_trace_bytes_hits_and_times_add_up_to_the_store_counters(tiny_model, tmp_path, io, max_memory):
    engine = load_engine(tiny_model, backend="numpy", io=io, max_memory=max_memory, context=64)
    engine.store.evict_page_cache()
    path = tmp_path / "t.jsonl"
    with record_trace(engine, path, model="tiny"):
        seq = _greedy_run(engine, prompt_tokens(6, seed=3) % 1000, tokens=5)
    engine.store.close()
    header, tokens = read_trace(path)
    stats = engine.stats
    assert header == TraceHeader(16, 4, (0, 1, 2, 3), "tiny", io=io, expert_bytes=engine.store.nbytes)
    assert [t.token for t in tokens] == seq and [t.prefill for t in tokens] == [True] * 6 + [False] * 5
    assert sum(int(t.bytes_read.sum()) for t in tokens) == stats.totals.bytes_read > 0
    assert sum(int(t.disk_bytes.sum()) for t in tokens) == stats.totals.disk_bytes > 0
    assert sum(int((~t.hit).sum()) for t in tokens) == stats.totals.misses > 0
    # decode: one lookup per routed expert, so the token's hits and misses are the store's for that token
    for t, record in zip(tokens[6:], stats.tokens[1:]):
        c = record.counters
        assert (int(t.hit.sum()), int((~t.hit).sum())) == (c.hits, c.misses)
        assert int(t.bytes_read.sum()) == c.bytes_read
        assert t.io_wait_ms.sum() == pytest.approx(1e3 * c.io_wait_s, abs=1e-3)
    compute_ms = sum(t.compute_ms.sum() for t in tokens)
    assert compute_ms == pytest.approx(1e3 * (stats.totals.compute_s - stats.stage_s["lm_head"]), rel=1e-3)
    if io == "direct":  # the cache holds every expert: the second prompt token using an expert already hits
        assert stats.totals.misses == len({(l, e) for t in tokens for l, row in enumerate(t.experts) for e in row})
        assert all(int(t.bytes_read.sum()) == slot_bytes(engine.store.nbytes) * int((~t.hit).sum()) for t in tokens)


def test_traced_experts_are_the_reference_routers_top_k(tmp_path, monkeypatch):
    """On the bundled trained model (real, skewed routing), prompt and greedy decode tokens."""
    from flashmoe.runtime.load import default_model_dir
    from flashmoe.reference import moe
    from flashmoe.reference.model import ReferenceModel

    from flashmoe.serve.tokenizer import Tokenizer

    engine = load_engine(None, backend="numpy", context=64)
    prompt = Tokenizer(default_model_dir()).encode("And God said,")
    with record_trace(engine, tmp_path / "t.jsonl"):
        seq = _greedy_run(engine, np.array(prompt), tokens=6)
    header, tokens = read_trace(tmp_path / "t.jsonl")

    routed = []  # the reference's (T, k) ids and weights, one call per MoE layer in order
    original = moe.route

    def recording_route(logits, cfg, k=None):
        routed.append(original(logits, cfg, k))
        return routed[-1]

    monkeypatch.setattr(moe, "route", recording_route)
    ReferenceModel.from_dir(default_model_dir()).forward(np.array(seq))
    assert len(routed) == len(header.moe_layers) == 8
    for j, (ids, weights) in enumerate(routed):
        np.testing.assert_array_equal(np.stack([t.experts[j] for t in tokens]), ids)
        np.testing.assert_allclose(np.stack([t.weights[j] for t in tokens]), weights, atol=1e-4)


def test_generate_trace_option_writes_a_trace_the_benchmark_replays(tiny_model, tmp_path):
    path = tmp_path / "gen.jsonl"
    result = CliRunner().invoke(app, ["generate", str(tiny_model), "-p", "hello there", "-n", "4",
                                      "--temperature", "0", "--backend", "numpy", "--trace", str(path)])
    assert result.exit_code == 0, result.output
    header, tokens = read_trace(path)
    assert header.model == str(tiny_model) and header.io == "pagecache"
    n_prompt = sum(t.prefill for t in tokens)
    assert n_prompt > 0 and 1 <= len(tokens) - n_prompt <= 4
    assert all(t.hit is not None and t.bytes_read is not None for t in tokens)
    r = replay(path, fractions=(1.0,))
    assert r["tokens"] == len(tokens) and r["sizes"][0]["hit_rate"]["lru"] > 0
    assert not list(tmp_path.glob(".gen.jsonl.tmp-*"))


def test_store_fields_round_trip_and_router_only_lines_still_read(tmp_path):
    header = TraceHeader(8, 2, (1, 3), "m", io="direct", expert_bytes=4096)
    path = tmp_path / "t.jsonl"
    with TraceWriter(path, header) as w:
        w.write([[0, 5], [7, 2]], [[0.6, 0.4], [0.5, 0.5]], token=9, prefill=True, hit=[[False, True], [True, True]],
                bytes_read=[4096, 0], disk_bytes=[4096, 0], io_wait_ms=[0.123456, 0.0], compute_ms=[1.5, 2.25])
        w.write([[1, 2], [3, 4]])
    h, (a, b) = read_trace(path)
    assert h == header
    np.testing.assert_array_equal(a.hit, [[False, True], [True, True]])
    assert a.bytes_read.tolist() == [4096, 0] and a.disk_bytes.tolist() == [4096, 0]
    assert a.io_wait_ms.tolist() == [0.1235, 0.0] and a.compute_ms.tolist() == [1.5, 2.25]
    assert b.hit is None and b.bytes_read is None and b.compute_ms is None and b.token is None


def test_store_fields_of_the_wrong_shape_are_refused(tmp_path):
    header = TraceHeader(8, 2, (1, 3))
    with TraceWriter(tmp_path / "ok.jsonl", header) as w, pytest.raises(ValueError,
                                                                      match=r"bytes_read needs shape \[2\]"):
        w.write([[0, 1], [2, 3]], bytes_read=[1, 2, 3])
    path = tmp_path / "bad.jsonl"
    line = {"pos": 0, "experts": [[0, 1], [2, 3]], "hit": [[True], [False]]}
    path.write_text(json.dumps(header.to_dict()) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(FormatError, match=r"bad.jsonl:2: malformed trace token: "
                                          r"trace token field hit needs shape \[2, 2\]"):
        read_trace(path)


def test_a_failed_run_leaves_no_trace_file(tmp_path):
    path = tmp_path / "t.jsonl"
    with pytest.raises(RuntimeError), TraceWriter(path, TraceHeader(8, 2, (0,))) as w:
        w.write([[0, 1]])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_prompts_reads_go_to_the_first_token_using_each_expert_and_backend_held_experts_are_hits(tmp_path):
    from types import SimpleNamespace

    from flashmoe.runtime.stats import Stats
    from flashmoe.runtime.store import ExpertRead
    from flashmoe.runtime.trace import Tracer

    reads = {"f": [ExpertRead(1, False, 100, 100), ExpertRead(2, True, 100, 0), ExpertRead(3, False, 100, 100)]}
    store = SimpleNamespace(report=lambda f: reads[f])  # expert 4 is in no fetch: the backend holds it
    stats = Stats()
    path = tmp_path / "t.jsonl"
    with TraceWriter(path, TraceHeader(8, 2, (0,))) as writer:
        tracer = Tracer(writer, store, stats)
        tracer.begin(np.array([5, 6, 7]))
        stats.add_stage_time("experts", 0.003)
        stats.record_io_wait(0.0006)
        tracer.layer(0, np.array([[1, 2], [2, 3], [4, 1]]), np.full((3, 2), 0.5), ["f"])
    _, tokens = read_trace(path)
    assert [t.token for t in tokens] == [5, 6, 7] and all(t.prefill for t in tokens)
    assert [t.hit.tolist() for t in tokens] == [[[False, True]], [[True, False]], [[True, True]]]
    assert [t.bytes_read.tolist() for t in tokens] == [[200], [100], [0]]
    assert [t.disk_bytes.tolist() for t in tokens] == [[100], [100], [0]]
    assert [t.compute_ms.tolist() for t in tokens] == [[1.0]] * 3
    assert [t.io_wait_ms.tolist() for t in tokens] == [[0.2]] * 3
