"""Memory sizes, the --max-memory budget and RSS readings."""

from __future__ import annotations

import pytest

from flashmoe.errors import FlashMoeError, MemoryBudgetError
from flashmoe.runtime.memory import MemoryBudget, current_rss_bytes, format_size, parse_size, peak_rss_bytes
from flashmoe.runtime.expert_files import aligned_buffer


@pytest.mark.parametrize(
    "text,expected",
    [
        ("4G", 4 << 30),
        ("512M", 512 << 20),
        ("1.5GB", 3 << 29),
        ("1.5gib", 3 << 29),
        ("100k", 102400),
        ("2T", 2 << 40),
        ("4096", 4096),
        ("4096B", 4096),
        (" 8 MiB ", 8 << 20),
        (".5K", 512),
        (12345, 12345),
    ],
)
def test_parse_size_reads_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "4X", "-1G", "4 G B", "1e9", "four", True, -5])
def test_parse_size_refuses_non_sizes_naming_the_text(text):
    with pytest.raises(FlashMoeError, match="invalid memory size"):
        parse_size(text)


def test_format_size():
    assert format_size(7077888) == "6.75 MiB"
    assert format_size(100) == "100 B"
    assert format_size(3 << 40) == "3.00 TiB"


def test_budget_leaves_the_rest_for_the_expert_cache():
    b = MemoryBudget(
        max_bytes=parse_size("4G"),
        resident_bytes=parse_size("1G"),
        kv_cache_bytes=parse_size("256M"),
        read_buffer_bytes=parse_size("64M"),
        scratch_bytes=parse_size("64M"),
        runtime_bytes=parse_size("128M"),
    )
    assert b.fixed_bytes == (1024 + 256 + 64 + 64 + 128) << 20
    assert b.check() == (4096 - 1536) << 20


def test_budget_refuses_when_the_resident_part_does_not_fit_with_the_numbers():
    b = MemoryBudget(max_bytes=parse_size("2G"), resident_bytes=parse_size("5.5G"), kv_cache_bytes=1 << 20)
    with pytest.raises(MemoryBudgetError) as err:
        b.check()
    msg = str(err.value)
    assert "--max-memory 2.00 GiB" in msg
    assert "resident weights 5.50 GiB" in msg and "KV cache 1.00 MiB" in msg
    assert "at least 5.50 GiB" in msg


def test_budget_exactly_full_leaves_zero_for_the_cache():
    assert MemoryBudget(max_bytes=1000, resident_bytes=600, scratch_bytes=400).check() == 0


def test_rss_grows_when_pages_are_touched():
    before = current_rss_bytes()
    buf = aligned_buffer(64 << 20)
    buf[::4096] = 1  # commit every page
    after = current_rss_bytes()
    assert after - before >= 60 << 20
    assert peak_rss_bytes() >= after


def test_load_engine_sizes_the_expert_cache_from_the_measured_process():
    """The direct-mode cache gets the budget minus what the loaded process measures (after a throwaway
    forward), the KV cache at full length and the read buffers; the throwaway forward leaves no statistics."""
    from flashmoe.runtime.load import load_engine
    from flashmoe.runtime.store import ExpertStore

    rss = current_rss_bytes()
    budget = rss + (64 << 20)
    engine = load_engine(None, backend="numpy", io="direct", max_memory=budget, context=64)
    store, layout = engine.store, engine.model_dir.layout
    room = budget - current_rss_bytes() - ExpertStore.read_buffer_bytes(engine.k, layout.nbytes, store.threads)
    assert 0 < store.cache_capacity_bytes <= room
    assert engine.stats.totals.reads == 0 and not engine.stats.tokens
    with pytest.raises(MemoryBudgetError, match="process \\(measured\\)"):
        load_engine(None, backend="numpy", io="direct", max_memory=rss // 2, context=64)


def test_the_first_refusal_names_a_budget_that_then_works():
    """A budget below the estimate is not refused before loading when this machine can load the model: the
    refusal comes from the loaded process's measurement, so a user who follows it (a new process, as from the
    shell) is accepted."""
    import math
    import re
    import subprocess
    import sys

    def generate(budget: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flashmoe", "generate", "--backend", "numpy", "--io", "direct",
                               "--max-memory", budget, "-n", "2", "--prompt", "Hi"], capture_output=True, text=True,
                              timeout=300)

    refused = generate("20M")
    assert refused.returncode != 0 and "process (measured)" in refused.stderr, refused.stderr
    needed = float(re.search(r"at least ([\d.]+) MiB", refused.stderr).group(1))
    accepted = generate(f"{math.ceil(needed) + 1}M")
    assert accepted.returncode == 0, accepted.stderr


def test_a_model_this_machine_cannot_hold_is_refused_before_loading(monkeypatch):
    import flashmoe.runtime.load as load

    monkeypatch.setattr(load, "available_memory_bytes", lambda: 1 << 20)
    with pytest.raises(MemoryBudgetError, match="an estimate before loading: the loaded process needs more"):
        load.load_engine(None, backend="numpy", io="direct", max_memory="20M", context=64)


def test_options_are_refused_before_the_conformance_gate(monkeypatch):
    """A budget below the model's own bytes, a size that is not one, an unknown activation mode: each refused
    at once, without waiting for the conformance gate (minutes on a machine's first use of a backend)."""
    import flashmoe.runtime.load as load

    gate: list[str] = []
    monkeypatch.setattr(load, "ensure_conformant", lambda name, formats: gate.append(name))
    with pytest.raises(MemoryBudgetError, match=r"--max-memory 1.00 MiB .*resident weights .* KV cache .*an "
                                                r"estimate before loading"):
        load.load_engine(None, backend="numpy", max_memory="1M")
    for options, message in (({"max_memory": "lots"}, "invalid memory size 'lots'"),
                             ({"gpu_memory": "-1G"}, "invalid memory size '-1G'"),
                             ({"activations": "int4"}, "--activations int4")):
        with pytest.raises(FlashMoeError, match=message):
            load.load_engine(None, backend="numpy", **options)
    assert gate == []


def test_a_context_beyond_the_models_is_budgeted_at_the_models(monkeypatch):
    """generate plans for prompt + --max-tokens, chat and serve for --context: the KV cache stops growing at the
    model's max_position_embeddings (2,048 for the demo model), and so does its share of the budget (a KV cache
    of 10^8 positions was 256 GiB, refused)."""
    import flashmoe.runtime.load as load

    class Gate(Exception):
        pass

    def gate(backend, formats):
        raise Gate

    monkeypatch.setattr(load, "ensure_conformant", gate)
    with pytest.raises(Gate):  # past the refusal before loading, which comes first
        load.load_engine(None, backend="numpy", max_memory="64M", context=10**8)


def test_the_mla_cache_holds_one_latent_row_per_position_and_the_budget_counts_that(hf_checkpoint, tmp_path):
    """DeepSeek-V3's absorbed attention caches kv_lora_rank + qk_rope_head_dim floats per position and layer,
    once (they are its keys and its values); state_bytes plans for exactly that."""
    import numpy as np

    from flashmoe.convert.checkpoint import convert_checkpoint
    from flashmoe.runtime.load import load_engine, state_bytes

    path = convert_checkpoint(hf_checkpoint("deepseek_v3", "groups_yarn_q_lora"), tmp_path / "m", bits="none",
                              progress=False, log=lambda _: None)
    engine = load_engine(path, backend="numpy", context=64)
    cfg, state = engine.cfg, engine.new_state()
    engine.forward(np.arange(5), state)
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 32 + 16 in this checkpoint
    for cache in state.layers:
        assert cache.v is None and cache.k.shape == (256, 1, row) and cache.length == 5
        keys, values = cache.append(np.ones((1, 1, row), np.float32))
        assert values is keys or np.shares_memory(keys, values)
    assert state_bytes(cfg, 1000) == cfg.num_hidden_layers * 1024 * row * 4


def test_a_budget_above_the_machines_memory_is_refused_before_loading(monkeypatch):
    """--max-memory 1T on a 16 GiB machine cannot be kept: a clear refusal, not a silent acceptance."""
    import flashmoe.runtime.memory as memory
    from flashmoe.runtime.load import load_engine

    monkeypatch.setattr(memory, "physical_memory_bytes", lambda: 16 << 30)
    monkeypatch.setattr(memory, "cgroup_memory_limit_bytes", lambda: None)
    with pytest.raises(MemoryBudgetError) as e:
        load_engine(None, backend="numpy", max_memory="1T")
    assert str(e.value) == ("--max-memory 1.00 TiB is more than this machine's memory (16.00 GiB): the budget could "
                            "not be kept (the expert cache it sizes would be swapped out, or the process killed); "
                            "give less than 16.00 GiB, or leave --max-memory out for no budget")
    memory.check_budget_fits_machine(16 << 30)  # all of it: a budget, if a tight one
    with pytest.raises(MemoryBudgetError, match="more than this machine's memory"):
        memory.check_budget_fits_machine((16 << 30) + 1)


def _cgroups(root, proc_lines: list[str], files: dict[str, str]):
    """A fake /sys/fs/cgroup under `root` holding `files` (path -> content) and a /proc/self/cgroup."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    proc = root / "proc-self-cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    return root, proc


@pytest.mark.parametrize("proc_lines, files, limit", [
    # cgroup v2: the process's own cgroup, the smaller limit of a parent, 'max' for none
    (["0::/user.slice/job"], {"user.slice/job/memory.max": "4294967296", "user.slice/memory.max": "max"}, 4 << 30),
    (["0::/user.slice/job"], {"user.slice/job/memory.max": "max", "user.slice/memory.max": "2147483648"}, 2 << 30),
    (["0::/"], {"memory.max": "max"}, None),
    # a container: /proc/self/cgroup names a path of the host that is not under the container's mount
    (["0::/docker/abc"], {"memory.max": "1073741824"}, 1 << 30),
    # cgroup v1 (hybrid: the v2 line has no memory controller)
    (["4:memory:/process_api/x", "1:cpu,cpuacct:/", "0::/"],
     {"memory/process_api/x/memory.limit_in_bytes": "3221225472", "memory/memory.limit_in_bytes": "9223372036854771712",
      "cpu/memory.limit_in_bytes": "1"}, 3 << 30),
    ([], {}, None),
])
def test_the_cgroup_memory_limit_is_read_for_v1_and_v2(tmp_path, proc_lines, files, limit):
    from flashmoe.runtime.memory import cgroup_memory_limit_bytes

    assert cgroup_memory_limit_bytes(*_cgroups(tmp_path, proc_lines, files)) == limit
    assert cgroup_memory_limit_bytes(tmp_path, tmp_path / "missing") is None  # no cgroups (macOS)


def test_a_budget_above_the_containers_cgroup_limit_is_refused_as_above_the_machines_memory(monkeypatch):
    """In a 4 GiB container on a 16 GiB host, --max-memory 8G cannot be kept either: refused the same way."""
    import flashmoe.runtime.memory as memory
    from flashmoe.runtime.load import load_engine

    monkeypatch.setattr(memory, "physical_memory_bytes", lambda: 16 << 30)
    monkeypatch.setattr(memory, "cgroup_memory_limit_bytes", lambda: 4 << 30)
    with pytest.raises(MemoryBudgetError) as e:
        load_engine(None, backend="numpy", max_memory="8G")
    assert str(e.value) == ("--max-memory 8.00 GiB is more than this container's memory limit (cgroup) (4.00 GiB): the "
                            "budget could not be kept (the expert cache it sizes would be swapped out, or the process "
                            "killed); give less than 4.00 GiB, or leave --max-memory out for no budget")
    memory.check_budget_fits_machine(4 << 30)
    assert memory.memory_limit() == (4 << 30, "this container's memory limit (cgroup)")
    assert memory.available_memory_bytes() <= 4 << 30
    monkeypatch.setattr(memory, "cgroup_memory_limit_bytes", lambda: 32 << 30)  # a limit above the machine's
    assert memory.memory_limit() == (16 << 30, "this machine's memory")
