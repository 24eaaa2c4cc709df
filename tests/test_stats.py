"""Run statistics over many runs (a server's lifetime): bounded token records, exact running figures, and
time to first token counted from the start of a run's first prefill."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

import flashmoe.runtime.stats as stats_module
from flashmoe.runtime.stats import Stats


@pytest.fixture
def clock(monkeypatch):
    """A fake perf_counter the test advances by hand."""
    now = SimpleNamespace(t=0.0)
    monkeypatch.setattr(stats_module, "time", SimpleNamespace(perf_counter=lambda: now.t))
    return now


def test_token_records_stay_bounded_while_the_figures_cover_every_run(clock):
    stats = Stats(num_layers=2, window=4)
    for run in range(3):  # each run: prefill 1.0 s, then 9 decode tokens of 0.1 s and 2 reads each
        stats.start()
        clock.t += 1.0 + run
        stats.record_read(100, 10)
        stats.token_done()
        for _ in range(9):
            clock.t += 0.1
            stats.record_read(100, 10)
            stats.record_read(100, 0)
            stats.token_done()
    assert stats.token_count == 30 and stats.runs == 3
    assert 4 <= len(stats.tokens) <= 8  # the most recent records only
    assert stats.tokens[-1].counters.reads == 2 and not stats.tokens[-1].first
    assert stats.ttft_s == pytest.approx(3.0)  # the latest run's
    assert stats.mean_ttft_s == pytest.approx(2.0)
    assert stats.decode_tok_s == pytest.approx(10.0)  # 27 decode tokens in 2.7 s; first tokens left out
    mean = stats.per_token_mean()
    assert (mean.reads, mean.bytes_read, mean.disk_bytes) == pytest.approx((2, 200, 10))
    d = stats.to_dict()
    assert (d["tokens"], d["runs"], len(d["per_token"])) == (30, 3, len(stats.tokens))
    assert d["ttft_s"] == pytest.approx(3.0) and d["mean_ttft_s"] == pytest.approx(2.0)
    assert "tokens: 30 in 3 runs" in stats.summary()
    assert "time to first token: 3.000 s (last run; mean 2.000 s over 3)" in stats.summary()


def test_a_run_that_ends_before_its_first_token_leaves_the_next_runs_figures_alone(clock):
    stats = Stats()
    stats.start()  # e.g. a request whose prefill failed
    clock.t += 50.0
    stats.start()
    clock.t += 0.5
    stats.token_done()
    assert stats.runs == 1 and stats.ttft_s == pytest.approx(0.5)


def test_split_prefill_counts_in_the_engines_time_to_first_token(tmp_path, monkeypatch):
    """A hybrid model's chat request prefills up to the history checkpoint, then the rest: both parts are
    the request's time to first token, in the engine's statistics as in the Session's own."""
    from chat_helpers import tiny_engine

    from flashmoe.serve.sampling import Sampler
    from flashmoe.serve.session import Session, history_boundary

    engine, tok = tiny_engine(tmp_path / "tiny")
    forward = engine.forward
    slow = 0.3

    def slow_prefill(ids, state, *args, **kwargs):
        if len(ids) > 1:  # each prefill part, not the decode steps
            time.sleep(slow)
        return forward(ids, state, *args, **kwargs)

    monkeypatch.setattr(engine, "forward", slow_prefill)
    messages = [{"role": "user", "content": "hello there"}]
    prompt = tok.encode(tok.apply_chat_template(messages))
    boundary = history_boundary(tok, messages, prompt)
    session = Session(engine, tok)
    steps = list(session.generate(prompt, Sampler(temperature=0), 3, checkpoint_at=boundary))
    assert steps and session.last.ttft_s >= 2 * slow  # two prefill parts
    assert engine.stats.ttft_s == pytest.approx(session.last.ttft_s, abs=0.1)


def test_kernel_compilation_is_its_own_line_not_a_stages_time_or_decode_speed(clock, monkeypatch):
    """A first run's numba compilation (19 s of 'router' on the demo model's first generate) is reported apart,
    as llama.cpp reports load time apart: out of the stage times and tok/s, in the time to first token."""
    compiled = SimpleNamespace(s=0.0)
    monkeypatch.setattr(stats_module, "compile_seconds", lambda: compiled.s)
    stats = Stats(num_layers=1)
    stats.start()
    with stats.stage("router"):  # prefill: 0.01 s routing after 19 s compiling its kernel
        clock.t += 19.0
        compiled.s += 19.0
        clock.t += 0.01
    stats.token_done()
    for compile_s in (2.0, 0.0):  # two decode tokens of 0.1 s; the first compiles a decode kernel for 2 s
        with stats.stage("router"):
            clock.t += compile_s + 0.1
            compiled.s += compile_s
        stats.token_done()
    assert stats.stage_s["router"] == pytest.approx(0.21)
    assert stats.totals.compile_s == pytest.approx(21.0)
    assert stats.ttft_s == pytest.approx(19.01)  # what the user waited
    assert stats.decode_tok_s == pytest.approx(10.0)  # 2 tokens in 0.2 s of decoding
    assert stats.to_dict()["totals"]["compile_s"] == pytest.approx(21.0)
    assert "kernel compilation: 21.000 s (numba: a kernel's first use on this machine, cached for later runs; " \
           "not counted in tok/s or the stage times)" in stats.summary()
    assert "compute: router 0.210 s" in stats.summary()


def test_compile_seconds_counts_numba_compiling_a_new_kernel():
    import numba

    before = stats_module.compile_seconds()

    @numba.njit(cache=False)
    def twice(x):
        return 2 * x

    t0 = time.perf_counter()
    assert twice(21) == 42  # compiles now
    wall = time.perf_counter() - t0
    spent = stats_module.compile_seconds() - before
    assert 0.5 * wall < spent <= wall
    again = stats_module.compile_seconds()
    assert twice(4) == 8 and stats_module.compile_seconds() == again  # compiled once


def test_the_peak_rss_is_never_below_the_current_one(monkeypatch):
    # The two are read one after the other; a process that grew a page in between reported peak < current.
    monkeypatch.setattr(stats_module, "current_rss_bytes", lambda: 1_166_520_320)
    monkeypatch.setattr(stats_module, "peak_rss_bytes", lambda: 1_166_516_224)
    d = Stats().to_dict()
    assert (d["peak_rss_bytes"], d["current_rss_bytes"]) == (1_166_520_320, 1_166_520_320)


def test_summary_says_no_expert_reads_and_keeps_a_rare_reads_mean(clock):
    """Decode tokens whose experts were all in memory read nothing: "no expert reads", not "0 B read in 0.0
    reads"; one read in 30 decode tokens is 0.0333 reads a token, not 0.0."""
    stats = Stats(num_layers=2)
    stats.start()
    for _ in range(31):  # the first token (the prefill) and 30 decode tokens, each expert found in memory
        stats.record_lookups(4, 0)
        stats.token_done()
    assert "per decode token: no expert reads\n" in stats.summary()
    stats.record_read(4096, 4096)
    stats.token_done()
    assert "per decode token: 132 B read (132 B from disk) in 0.0323 reads\n" in stats.summary()
