"""`flashmoe bench` end to end on a tiny synthetic model (numpy backend, a few tokens)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from flashmoe.bench.streaming import BenchOptions, add_ceiling, recorded_trace_kind, run_bench
from flashmoe.cli import app
from flashmoe.runtime.load import default_model_dir
from flashmoe.format.modeldir import ModelDir
from flashmoe.convert.synth import synth_model

TINY_QWEN35 = dict(
    model_type="qwen3_5_moe_text", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
    linear_num_value_heads=4, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
    shared_expert_intermediate_size=64, vocab_size=1000)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("bench") / "tiny", TINY_QWEN35, seed=1)


def test_bench_measures_every_mode_and_writes_json_markdown_and_figures(tiny_model, tmp_path):
    out = tmp_path / "results"
    result = run_bench(BenchOptions(model_dir=tiny_model, out=out, backend="numpy", modes=("pagecache", "direct"),
                                    ks=(2,), threads=(1,), budgets=("512M",), tokens=3, prompt_tokens=4,
                                    disk_repeats=1, disk_experts=16, log=lambda line: None))
    assert [(r["io"], r["max_memory"], r.get("reference", False)) for r in result["runs"]] == [
        ("pagecache", None, True), ("pagecache", "512M", False), ("direct", "512M", False)]
    for run in result["runs"]:
        assert run["k"] == 2 and run["moe_layers"] == 4 and run["peak_rss_bytes"] > 0
        for p in run["passes"].values():
            assert p["decode_tokens"] == 3 and p["tok_s"] > 0
            assert p["ms_per_layer"] > 0 and p["compute_ms_per_layer"] > 0
            assert p["ceiling"]["bound_ms"] >= p["compute_ms_per_token"]
    direct_cold = result["runs"][2]["passes"]["cold"]
    # O_DIRECT reads whole 4096-byte blocks: nbytes rounded up, which for this model is the stride
    assert direct_cold["reads_per_token"] > 0 and direct_cold["bytes_read_per_token"] == pytest.approx(
        direct_cold["reads_per_token"] * result["model"]["expert_stride"])
    assert result["runs"][2]["passes"]["warm"]["hit_rate"] == 1.0  # 512M holds all 64 tiny experts
    assert {d["mode"] for d in result["disk"]["store"]} == {"pagecache", "direct"}
    (replay,) = result["replays"]
    assert replay["kind"] == "routing of the random-weight model"
    assert replay["tokens"] == 4 + 3 and set(replay["sizes"][0]["hit_rate"]) == {"lru", "lfu", "fifo", "lru-layer",
                                                                                 "lfu-layer", "mru", "opt"}
    assert json.loads((out / "bench.json").read_text())["runs"][0]["reference"] is True
    assert "| direct k=2 t=1 512M | cold |" in (out / "bench.md").read_text()
    assert sorted(p.name for p in out.glob("*.png")) == ["hit_rate_vs_cache.png", "ms_per_layer.png",
                                                         "tok_s_vs_budget.png"]


def test_ceiling_is_disk_time_or_compute_time_whichever_is_larger():
    run = {"io": "direct", "k": 4, "moe_layers": 2,
           "passes": {"cold": {"disk_bytes_per_token": 2e9, "ms_per_token": 2500.0, "tok_s": 0.4,
                               "compute_ms_per_token": 500.0},
                      "warm": {"disk_bytes_per_token": 0.5e9, "ms_per_token": 1500.0, "tok_s": 1 / 1.5,
                               "compute_ms_per_token": 1200.0}}}
    add_ceiling(run, {("direct", 4): 1.0}, reference_ms=1000.0)
    cold, warm = run["passes"]["cold"]["ceiling"], run["passes"]["warm"]["ceiling"]
    assert cold["disk_ms_per_token"] == pytest.approx(2000.0) and cold["disk_ms_per_layer"] == pytest.approx(1000.0)
    assert cold["bound_ms"] == pytest.approx(2000.0) and cold["time_over_bound"] == pytest.approx(1.25)
    assert cold["disk_bound_tok_s"] == pytest.approx(0.5)
    assert warm["bound_ms"] == pytest.approx(1200.0) and warm["time_over_bound"] == pytest.approx(1.25)
    assert warm["reference_bound_ms"] == pytest.approx(1000.0)
    assert warm["time_over_reference_bound"] == pytest.approx(1.5)


def test_bench_command_replays_a_trace_without_a_model(tiny_model, tmp_path):
    from flashmoe.bench.decode_run import run

    trace = tmp_path / "trace.jsonl"
    run(tiny_model, "numpy", "pagecache", None, None, None, 3, 2, 0, "lru", ["cold"], trace)
    result = CliRunner().invoke(app, ["bench", "--replay", str(trace), "--out", str(tmp_path / "r"), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "| cache (% of experts) | entries | lru | lfu | fifo | lru-layer | lfu-layer | mru | opt |" in result.output


def test_bench_command_without_a_model_measures_the_bundled_demo_model(tmp_path, monkeypatch):
    """As generate, chat and serve do; only --replay alone measures no model."""
    import flashmoe.bench.streaming
    from flashmoe.runtime.load import default_model_dir

    given = []
    monkeypatch.setattr(flashmoe.bench.streaming, "run_bench", lambda opts: given.append(opts.model_dir))
    (tmp_path / "bench.md").write_text("the tables\n")
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert given == [default_model_dir()] and default_model_dir().name == "demo-model"
    assert f"bench: no model directory given: the bundled demo model ({default_model_dir()})" in result.stderr
    assert CliRunner().invoke(app, ["bench", "--replay", str(tmp_path / "bench.md"), "--out", str(tmp_path)]).exit_code == 0
    assert given[1] is None


@pytest.mark.parametrize("args, message", [
    (["--tokens", "0"], "--tokens: 0 is not a positive number"),
    (["--tokens", "-4"], "--tokens: -4 is not a positive number"),
    (["--prompt-tokens", "0"], "--prompt-tokens: 0 is not a positive number"),
    (["--modes", "foo"], "--modes: 'foo' is not one of pagecache, direct"),
    (["--threads", "0"], "--threads: 0 is not a positive number"),
    (["--threads", "two"], "--threads: 'two' is not a comma-separated list of whole numbers"),
    (["--threads", f"1,{os.cpu_count() + 1}"], f"--threads: {os.cpu_count() + 1} is more than this machine's "
                                               f"{os.cpu_count()} cores"),
    (["--budgets", "abc"], "--budgets: invalid memory size 'abc'"),
    (["--routing", "nope"], "--routing: 'nope' is not one of model, uniform"),
    (["-k", "0"], "-k/--experts-per-token: 0 is not a positive number"),
    (["-k", "17"], "-k/--experts-per-token: 17 is more than the model's 16 experts"),
    (["--passes", "bogus"], "--passes: 'bogus' is not one of cold, warm"),
    (["--cache-policy", "random"], "--cache-policy: 'random' is not one of lru"),
    (["--speculate", "maybe"], "--speculate: 'maybe' is neither 'on' nor 'off'"),
    (["--backend", "nope"], "--backend: unknown backend 'nope'"),
    (["--peer", "llama.cpp", "--routing", "uniform"], "--peer llama.cpp needs --routing model"),
    (["--replay", "missing.jsonl"], "--replay missing.jsonl: no such file"),
])
def test_bench_command_rejects_a_bad_option_in_one_line_before_any_work(tiny_model, tmp_path, args, message):
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["bench", str(tiny_model), "--out", str(out), *args])
    assert result.exit_code == 2
    assert result.output.startswith("error: " + message) and result.output.count("\n") == 1, result.output
    assert not out.exists()  # nothing ran: not even the results directory was made


def test_bench_command_refuses_an_out_that_is_a_file(tiny_model, tmp_path):
    (tmp_path / "f").touch()
    result = CliRunner().invoke(app, ["bench", str(tiny_model), "--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and result.output == f"error: --out {tmp_path / 'f'}: exists and is not a directory\n"


def test_forced_uniform_routing_is_seeded_and_covers_the_experts(monkeypatch):
    import numpy as np

    import flashmoe.runtime.engine as engine_module
    from flashmoe.bench.decode_run import force_uniform_routing

    monkeypatch.setattr(engine_module, "route", engine_module.route)  # restored after the test
    picks = []
    for _ in range(2):
        force_uniform_routing(seed=3)
        ids, weights = engine_module.route(np.zeros((400, 16), np.float32), None, 4)
        picks.append(ids)
    np.testing.assert_array_equal(picks[0], picks[1])
    assert all(len(set(row)) == 4 for row in picks[0].tolist())
    counts = np.bincount(picks[0].ravel(), minlength=16)
    assert counts.min() > 70 and counts.max() < 130  # 100 expected per expert
    np.testing.assert_allclose(weights, 0.25)


def test_the_replay_table_calls_a_trained_models_trace_by_its_name(tiny_model):
    demo = ModelDir.open(default_model_dir())  # converted from a trained checkpoint
    assert recorded_trace_kind(demo, "model") == "recorded routing of demo-model (random token ids)"
    assert recorded_trace_kind(ModelDir.open(tiny_model), "model") == "routing of the random-weight model"
    assert recorded_trace_kind(demo, "uniform") == "forced uniform routing (worst case for a cache)"


# numba 0.68's name for cuda_kernels.qlinear's kernel (numba.core.itanium_mangler.mangle of its qualified name and
# argument types), and that name through libstdc++'s __cxa_demangle, as torch.profiler (kineto) reports kernels
_QLINEAR_MANGLED = ("_ZN6cudapy8flashmoe8backends12cuda_kernels7qlinear12_3clocals_3e6kernelB2v1B57cw51cXTLSUwv1"
                    "sDUaKthqKNAUWEhLSg3XKgcYZUvLSUXTAWDc9AAAAAAAE5ArrayIjLi1E1C7mutable7alignedE5ArrayIfLi1E1C7"
                    "mutable7alignedEx")
_QLINEAR_DEMANGLED = ("cudapy::flashmoe::backends::cuda_kernels::qlinear::_3clocals_3e::kernel[abi:v1][abi:cw51cXTLSU"
                      "wv1sDUaKthqKNAUWEhLSg3XKgcYZUvLSUXTAWDc9AAAAAAA](Array<unsigned int, 1, C, mutable, aligned>, "
                      "Array<float, 1, C, mutable, aligned>, long long)")


def test_cuda_kernel_table_names_each_kernel_whole():
    """bench_cuda's kernel table names a kernel by module and function whether the profiler gives numba's mangled
    name or its demangled form (which was cut to its first 60 characters, inside the package path); other names
    are kept whole."""
    from flashmoe.bench.bench_cuda import _kernel_name

    assert _kernel_name(_QLINEAR_MANGLED) == _kernel_name(_QLINEAR_DEMANGLED) == "cuda_kernels.qlinear"
    assert _kernel_name("cudapy::flashmoe::backends::cuda_attention::attention[abi:v2](Array<float, 3, C, mutable, "
                        "aligned>)") == "cuda_attention.attention"
    assert _kernel_name("_ZN6cudapy8__main__4spinB2v3E5ArrayIfLi1E1C7mutable7alignedE") == "__main__.spin"
    # as torch.profiler named them on an H100 with numba-cuda 0.30.4 (2026-12-07): no cudapy:: namespace
    assert _kernel_name(_QLINEAR_DEMANGLED.removeprefix("cudapy::")) == "cuda_kernels.qlinear"
    copy = "Memcpy HtoD (Pinned -> Device)"
    cutlass = ("void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_16x6_tn_align4>(cutlass_80_tensorop_"
               "s1688gemm_64x64_16x6_tn_align4::Params)")
    assert _kernel_name(copy) == copy and _kernel_name(cutlass) == cutlass


def test_cuda_bound_counts_the_experts_the_vram_tier_holds():
    """bench_cuda's GPU term counts every expert the GPU computes: with every expert in the VRAM tier
    (--preload) nothing is read or copied, yet a token's k experts per layer are still read from device
    memory; the copy term counts the bytes copied, the CPU term the token's experts the GPU did not compute
    (read or used in place from the page cache); without a tier every expert read is copied and computed on
    the GPU."""
    from flashmoe.bench.bench_cuda import bound_ms

    rates = {"disk_gb_s": 1.0, "host_cache_gb_s": 10.0, "h2d_gb_s": 20.0, "cpu_gb_s": 50.0, "gpu_gb_s": 1000.0}
    resident, expert = 2 * 10**9, 10**7
    held = {"disk_bytes_per_token": 0, "bytes_read_per_token": 0,
            "gpu_tier_per_token": {"gpu_hits": 40.0, "gpu_misses": 0.0, "bytes_copied": 0.0}}
    assert bound_ms(held, resident, expert, 40, rates)["gpu_ms"] == pytest.approx(2.4)  # (2e9 + 40 x 1e7) / 1e12 s
    on_cpu = {"disk_bytes_per_token": 0, "bytes_read_per_token": 3e8,
              "gpu_tier_per_token": {"gpu_hits": 10.0, "gpu_misses": 10.0, "bytes_copied": 1e8}}
    b = bound_ms(on_cpu, resident, expert, 40, rates)
    assert (b["h2d_ms"], b["cpu_ms"], b["gpu_ms"]) == pytest.approx((5.0, 4.0, 2.2))  # 20 experts on the CPU
    assert b["read_ms"] == pytest.approx(30.0) and b["bound_ms"] == pytest.approx(30.0)
    in_place = {**on_cpu, "bytes_read_per_token": 1e8}  # the CPU's 20 experts from the page cache, not read
    b = bound_ms(in_place, resident, expert, 40, rates)
    assert (b["read_ms"], b["cpu_ms"], b["bound_ms"]) == pytest.approx((10.0, 4.0, 10.0))
    no_tier = {"disk_bytes_per_token": 1e8, "bytes_read_per_token": 1e8}
    b = bound_ms(no_tier, resident, expert, 40, rates)
    assert (b["read_ms"], b["h2d_ms"], b["cpu_ms"], b["gpu_ms"]) == pytest.approx((100.0, 5.0, 0.0, 2.1))


def _bench_pass(tok_s: float) -> dict:
    return {"tok_s": tok_s, "ms_per_token": 1e3 / tok_s, "ms_per_layer": 10.0, "compute_ms_per_layer": 6.0,
            "io_wait_ms_per_layer": 3.0, "lm_head_ms_per_token": 1.0, "bytes_read_per_token": 1e8,
            "disk_bytes_per_token": 1e8, "achieved_gb_s": 1.0, "hit_rate": None}


@pytest.mark.parametrize("cold, warm, warned", [(5.0, 4.0, True), (4.0, 5.0, False), (4.0, 4.0, False)])
def test_the_table_warns_when_the_cold_pass_comes_out_faster_than_the_warm_pass(cold, warm, warned):
    from flashmoe.bench.report import markdown

    result = {"machine": {"cpus": 2, "memory_bytes": 8 << 30, "kernel": "6.1"},
              "model": {"dir": "m", "description": "tiny", "expert_file_bytes": 1e9, "moe_layers": 4,
                        "resident_bytes": 1e8},
              "disk": {"filesystem": {"device": "/dev/x", "fstype": "ext4"}, "store": []},
              "runs": [{"io": "pagecache", "k": 2, "compute_threads": 1, "max_memory": None, "peak_rss_bytes": 1 << 30,
                        "loadavg_1min": [3.5, 7.25], "passes": {"cold": _bench_pass(cold), "warm": _bench_pass(warm)}}]}
    text = markdown(result)
    assert ("| pagecache k=2 t=1 no cap | cold | 5.000 ⚠ |" in text) is warned
    warning = ("⚠ warning: pagecache k=2 t=1 no cap: the cold pass (5.000 tok/s) came out faster than the warm pass "
               "(4.000 tok/s), which repeats its tokens with more in memory: the machine was loaded (1-minute load "
               "average 3.5–7.2) or the cold pass was not cold (the expert files stayed in the page cache). Neither "
               "pass measures what its name says; rerun on an idle machine.")
    assert (warning in text) is warned and ("⚠" in text) is warned
