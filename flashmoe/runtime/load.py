"""Loading a model for generation: open and validate the directory, choose a conformant backend, check the
memory budget, and start the expert store."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np

from flashmoe.backends.base import get_backend
from flashmoe.conformance.op_cases import DENSE
from flashmoe.conformance.runner import ensure_conformant, model_formats
from flashmoe.arch.config import ModelConfig
from flashmoe.runtime.engine import Engine
from flashmoe.errors import FlashMoeError
from flashmoe.runtime.eviction import DEFAULT_POLICY, POLICIES
from flashmoe.runtime.placement import ExpertPlacement
from flashmoe.runtime.memory import (MemoryBudget, available_memory_bytes, check_budget_fits_machine,
                                     current_rss_bytes, parse_size, reset_peak_rss, window_peak_rss_bytes)
from flashmoe.format.modeldir import ModelDir
from flashmoe.runtime.stats import Stats
from flashmoe.runtime.store import MODES, ExpertStore

#: What generation allocates after loading (sampler, detokenizer, statistics): 2-3 MiB measured on the demo
#: model, whose peak RSS otherwise ended that much above a tight --max-memory.
GENERATION_SCRATCH = 8 << 20

#: The model flashmoe ships and runs when no model directory is given (see docs/demo-model.md).
DEFAULT_MODEL = "demo-model"


def default_model_dir() -> Path:
    """Path of the bundled demo model inside the installed package."""
    return Path(str(resources.files("flashmoe") / "data" / DEFAULT_MODEL))


def state_bytes(cfg: ModelConfig, context: int) -> int:
    """Bytes of KV cache plus GatedDeltaNet state for a sequence of `context` tokens (float32).

    The KV cache grows by doubling from 256 positions, so the bound uses the next power of two. Multi-head
    Latent Attention caches kv_lora_rank + qk_rope_head_dim floats per position and layer (runtime/mla.py).
    """
    capacity = max(256, 1 << max(0, context - 1).bit_length())
    total = 0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_mla:
            total += capacity * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
        elif cfg.is_attention_layer(i):
            total += 2 * capacity * cfg.num_key_value_heads * cfg.head_dim * 4
        else:
            total += 4 * ((cfg.linear_conv_kernel_dim - 1) * cfg.linear_conv_dim + cfg.linear_num_value_heads
                          * cfg.linear_key_head_dim * cfg.linear_value_head_dim)
    return total


def _checked_options(io: str, cache_policy: str, max_memory: str | int | None,
                     gpu_memory: str | int | None) -> tuple[int | None, int | None]:
    """load_engine's max_memory and gpu_memory in bytes (None where not given), once io, cache_policy and the
    budget are checked. Raises FlashMoeError naming the option, MemoryBudgetError for a budget above the
    machine's physical memory."""
    if io not in MODES:
        raise FlashMoeError(f"--io {io!r} is not one of {', '.join(MODES)}")
    if cache_policy.lower() not in POLICIES:
        raise FlashMoeError(f"--cache-policy {cache_policy!r} is not one of {', '.join(POLICIES)}")
    max_bytes = None if max_memory is None else parse_size(max_memory)
    if max_bytes is not None:
        check_budget_fits_machine(max_bytes)
    return max_bytes, None if gpu_memory is None else parse_size(gpu_memory)


def load_engine(model_dir: ModelDir | str | Path | None = None, backend: str = "numba", io: str = "pagecache",
                max_memory: str | int | None = None, experts_per_token: int | None = None,
                context: int = 4096, cache_policy: str = DEFAULT_POLICY, threads: int | None = None,
                gpu_memory: str | int | None = None, speculate: bool = False,
                activations: str | None = None, expert_device: str = "gpu") -> Engine:
    """Open a model directory and return an Engine ready to generate.

    Args:
        model_dir: flashmoe model directory (path, or already opened); None for the bundled demo model.
        backend: registered backend name (`flashmoe backends` lists them). It must pass the quick
            conformance suite on this machine first (run once, then stamped).
        io: 'pagecache' (the OS caches hot experts; with no max_memory, those it holds are used in place
            through a read-only mapping where the backend computes on host memory, the others read with
            pread) or 'direct'
            (O_DIRECT plus flashmoe's own expert cache, sized by what --max-memory leaves).
        max_memory: budget for resident weights + KV cache + read buffers + expert cache ('4G', bytes);
            None means no budget (and no own cache in direct mode beyond the read buffers).
        experts_per_token: override the model's num_experts_per_tok (k).
        context: longest sequence to plan the KV cache for, in tokens (capped by the model's
            max_position_embeddings: generation stops there).
        cache_policy: eviction policy of the direct-mode cache ('lru', 'lfu', ...).
        threads: read threads (default max(4, k), so a token's k reads run in one round).
        gpu_memory: size of the backend's own expert cache ('16G'; cuda only), filled as experts stream, or
            read whole at load time when it holds every expert (Engine.preload_experts).
        speculate: during each MoE layer, guess the next one's k experts with its router and read them
            behind this layer's reads (flashmoe.runtime.engine; k more read buffers count against max_memory).
        activations: 'float' or 'q8' (int8 activations in the quantised mat-vecs, flashmoe.reference.q8);
            None: the backend's default (q8 for numba where the CPU has the int8 instructions, else float).
            With expert_device cpu or auto, those of the CPU way's numba (None: float, as the GPU computes).
        expert_device: where a decode token's experts not in the GPU's memory are computed: 'gpu' (copied
            there), 'cpu' (numba, on the page cache's mapping or read buffers, while the GPU computes the rest) or 'auto' (the
            cheaper way by the rates measured as it runs; flashmoe.runtime.placement).

    Raises FormatError for an invalid directory, ConformanceError for a failing backend,
    MemoryBudgetError when max_memory is above the machine's physical memory or cannot hold the model (checked before loading with the manifest's
    resident size, and after a throwaway forward with the process's measured RSS), FlashMoeError for bad
    options.
    """
    max_bytes, gpu_bytes = _checked_options(io, cache_policy, max_memory, gpu_memory)
    model = model_dir if isinstance(model_dir, ModelDir) else \
        ModelDir.open(default_model_dir() if model_dir is None else model_dir)
    cfg = model.config
    k = cfg.num_experts_per_tok if experts_per_token is None else experts_per_token
    if not 1 <= k <= cfg.num_experts:
        raise FlashMoeError(f"--experts-per-token {k} is outside 1..{cfg.num_experts} (num_experts)")
    # an unknown backend, --expert-device or activation mode, or cpu/auto on a CPU backend; with cpu/auto the
    # activations are the CPU way's (the GPU computes float)
    be = get_backend(backend, None if expert_device != "gpu" else activations)
    placement = ExpertPlacement.of(expert_device, be, activations)
    layouts = {layer: model.layer_layout(layer) for layer in model.moe_layers}  # a GGUF's may differ
    largest = max(layout.nbytes for layout in layouts.values())
    threads = threads or max(4, k)  # all k reads of a decode token in flight at once
    guess_slots = k if speculate else 0
    read_buffers = ExpertStore.read_buffer_bytes(k, largest, threads, guess_slots)
    kv_bytes = state_bytes(cfg, min(context, cfg.max_position_embeddings))
    if max_bytes is not None:
        _refuse_before_loading(MemoryBudget(max_bytes, model.resident_nbytes, kv_bytes, read_buffers))
    # After every cheap check: a machine's first use of a backend for a format takes minutes.
    ensure_conformant(backend, model_formats(model, be.activations))
    if placement is not None:  # numba computes the experts the GPU does not hold, with the CPU way's activations
        ensure_conformant("numba", [f for f in model_formats(model, placement.cpu.activations) if f.role != DENSE])
    stats = Stats(num_layers=len(model.moe_layers))
    files = {layer: model.expert_path(layer) for layer in model.moe_layers}
    if gpu_bytes is not None:
        be.configure_expert_cache(gpu_bytes, cache_policy)
    # Read buffers from the backend (pinned host memory for cuda: one DMA per expert).
    store = ExpertStore(files, num_experts=cfg.num_experts, stride={i: lay.stride for i, lay in layouts.items()},
                        nbytes={i: lay.nbytes for i, lay in layouts.items()},
                        mode=io, policy=cache_policy, threads=threads, stats=stats,
                        allocate=be.allocate_buffer, guess_slots=guess_slots,
                        # Mapped experts count in the resident set: under a budget, stay inside it as measured.
                        # The CPU way of --expert-device computes on them too (its fetches ask for them).
                        in_place=(be.experts_in_place or placement is not None) and max_bytes is None)
    engine = Engine(model, be, store, stats, experts_per_token=k, placement=placement)
    if gpu_bytes is not None:
        engine.preload_experts(gpu_bytes)
    if max_bytes is not None:
        store.set_cache_bytes(_measured_room(engine, max_bytes, kv_bytes, read_buffers))
    return engine


def _refuse_before_loading(model_bytes: MemoryBudget) -> None:
    """Refuse, before the conformance gate and loading, only a budget that cannot work: below the model's own
    bytes (`model_bytes`: its resident weights, KV cache and read buffers), or one this machine could not load
    with the process as it is. Any other budget is loaded and measured (_measured_room), so that a refusal names
    the figure that works, not an estimate that is refused again. Raises MemoryBudgetError."""
    if model_bytes.max_bytes < model_bytes.fixed_bytes:
        model_bytes.check(lower_bound=True)
    estimate = replace(model_bytes, runtime_bytes=current_rss_bytes())
    if estimate.fixed_bytes > available_memory_bytes():
        estimate.check(lower_bound=True)


def _measured_room(engine: Engine, max_bytes: int, kv_bytes: int, read_buffers: int) -> int:
    """Bytes the budget leaves for the expert cache, from the process's peak RSS during a throwaway 2-token
    prefill and decode step.

    They touch every resident weight the backend reads and load (or compile) its prefill and decode
    kernels, so what a backend keeps besides the model's file (MLX's or the GPU's own copies, numba's code)
    is counted as it is, not estimated. The KV cache at full length and the read buffers come on top. The step's statistics
    are dropped. Raises MemoryBudgetError when nothing is left.

    The step copies every expert into read buffers (the store's `in_place` off): experts used in place are
    page cache, which pagecache mode leaves to the kernel, and would otherwise count as the process's own
    memory for as many of the step's experts as the page cache happened to hold."""
    reset_peak_rss()  # the conformance gate may have run in this process: its peak is not this model's
    state = engine.new_state()
    in_place, engine.store.in_place = engine.store.in_place, False
    try:
        engine.forward(np.zeros(2, np.int64), state)
        engine.forward(np.zeros(1, np.int64), state)
    finally:
        engine.store.in_place = in_place
        engine.store.release_all()
    del state
    engine.stats = engine.store.stats = Stats(num_layers=engine.stats.num_layers)
    # The peak, not the RSS after the step: a backend's transient arrays (the NumPy backend dequantises each
    # weight to float32 per call, the lm_head included) come back at every token.
    budget = MemoryBudget(max_bytes, 0, kv_bytes, read_buffers, scratch_bytes=GENERATION_SCRATCH,
                          runtime_bytes=window_peak_rss_bytes())
    return budget.check()
