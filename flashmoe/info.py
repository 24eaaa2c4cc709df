"""`flashmoe info` and `flashmoe logits`: what a model directory costs to run, and its logits for checks.

The decode ceiling is the streaming bound of docs/design.md ("The idea"): with no expert cache hits, every token reads k
experts in every MoE layer from disk, so tokens/s ≤ disk bandwidth / expert bytes per token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.runtime.engine import check_finite
from flashmoe.errors import FlashMoeError
from flashmoe.format.atomic import atomic_path
from flashmoe.arch.tensors import EXPERT_PROJS
from flashmoe.format.modeldir import ModelDir


def _bytes(n: float) -> str:
    """'1,234,567 B (1.23 MB)' with decimal units (disk bandwidth is quoted in decimal GB/s)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{int(n):,} B ({n / size:.2f} {unit})"
    return f"{int(n):,} B"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n:,} ({n / size:.2f}{unit})"
    return f"{n:,}"


def model_stats(md: ModelDir) -> dict[str, float]:
    """Sizes of an opened model directory.

    Returns: resident_params, expert_params (one expert), total_params, active_params (resident + k experts
    in every MoE layer), resident_bytes, expert_bytes (mean `nbytes` over MoE layers), expert_bytes_per_token
    (k · nbytes summed over MoE layers), k, moe_layers. Parameters count logical (float) weights.
    """
    cfg = md.config
    # QuantizedTensor.shape is the logical (float) shape, so packed tensors count their real weights.
    resident_params = sum(int(np.prod(md.raw(name).shape)) for name in md.resident_names())
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    expert_params = len(EXPERT_PROJS) * h * inter
    k, layers = cfg.num_experts_per_tok, md.moe_layers
    nbytes = [md.layer_layout(layer).nbytes for layer in layers]
    return {
        "resident_params": resident_params,
        "expert_params": expert_params,
        "total_params": resident_params + expert_params * sum(md.num_experts(layer) for layer in layers),
        "active_params": resident_params + expert_params * k * len(layers),
        "resident_bytes": md.resident_nbytes,
        "expert_bytes": sum(nbytes) / len(nbytes),
        "expert_bytes_per_token": k * sum(nbytes),
        "k": k,
        "moe_layers": len(layers),
    }


def describe_preset(name: str, disk_gbps: float = 2.0, bits: int = 4, group_size: int = 64) -> str:
    """The `flashmoe info --like NAME` summary: a preset's full-depth sizes at `bits`/`group_size` (synth's
    quantisation; MXFP4 experts for a family that publishes them), bytes read per token and decode ceiling, computed from its config without writing anything.
    Raises ConfigError for an unknown preset, FlashMoeError for a non-positive disk_gbps."""
    from flashmoe.arch.presets import get_preset
    from flashmoe.convert.synth import expert_layout, planned_bytes

    if not disk_gbps > 0:
        raise FlashMoeError(f"--disk-gbps must be positive, got {disk_gbps}")
    cfg = ModelConfig.from_dict(get_preset(name).config_dict(), source=name)
    resident_bytes, _ = planned_bytes(cfg, bits, group_size)
    quant = f"{bits}-bit, group {group_size}"
    if cfg.mxfp4_experts:  # synth keeps a family's published MXFP4 experts whatever `bits`
        quant = f"MXFP4 experts, other tensors {quant}"
    lines = _planned(cfg, resident_bytes, expert_layout(cfg, bits, group_size), disk_gbps)
    return "\n".join([f"preset:           {name} ({quant}, as `flashmoe synth --like {name}` writes it)", *lines])


def describe_checkpoint(path: str | Path, disk_gbps: float = 2.0, bits: int = 4, group_size: int = 64) -> str:
    """`flashmoe info CHECKPOINT`: a Hugging Face or MLX checkpoint directory (config.json + safetensors) before
    converting it: its architecture and parameters (config.json), its tensors and bytes by dtype (the
    safetensors headers), and what `flashmoe convert` writes from it at bits/group_size (convert's defaults;
    an MLX-quantised checkpoint is kept at its own): resident bytes, bytes per expert, read per token, decode
    ceiling (synth.planned_conversion). Raises ConfigError (config.json), CheckpointError (no safetensors, a
    damaged shard), FlashMoeError for a non-positive disk_gbps."""
    from flashmoe.convert.checkpoint import source_tensors
    from flashmoe.convert.synth import planned_conversion

    if not disk_gbps > 0:
        raise FlashMoeError(f"--disk-gbps must be positive, got {disk_gbps}")
    path = Path(path)
    cfg = ModelConfig.from_file(path / "config.json")
    tensors = source_tensors(path)
    by_dtype: dict[np.dtype, list[int]] = {}
    for _, dtype, shape in tensors.values():
        counts = by_dtype.setdefault(dtype, [0, 0])
        counts[0] += 1
        counts[1] += int(np.prod(shape)) * dtype.itemsize
    mxfp4 = any(name.endswith("_blocks") for name in tensors)  # gpt-oss's experts as published
    mlx = json.loads((path / "config.json").read_text()).get("quantization")  # valid JSON: ModelConfig read it
    if isinstance(mlx, dict) and {"bits", "group_size"} <= mlx.keys():
        bits, group_size = mlx["bits"], mlx["group_size"]
        how = f"kept as mlx-lm quantised it, {bits}-bit, group {group_size}"
    else:
        how = f"{bits}-bit, group {group_size}: `flashmoe convert`'s defaults, which --bits and --group-size change"
        if mxfp4:
            how = f"MXFP4 experts kept, other tensors {how}"
    floats = {d: n for d, (_, n) in by_dtype.items() if d.kind == "f" or d.name == "bfloat16"}
    # FP8 weights are dequantised to float32 before quantising; float weights keep their dtype.
    fp8 = any(d.name.startswith("float8") for d in by_dtype)
    float_dtype = np.dtype(np.float32) if fp8 or not floats else max(floats, key=floats.get)
    resident_bytes, layout = planned_conversion(cfg, bits, group_size, float_dtype, mxfp4)
    files = len({f for f, _, _ in tensors.values()})
    lines = _planned(cfg, resident_bytes, layout, disk_gbps)
    return "\n".join([
        f"checkpoint:       {path} ({files} safetensors file{'s' if files > 1 else ''}; not a flashmoe model "
        f"directory: `flashmoe convert {path} OUT` makes one)",
        *lines[:3],
        *(f"  {d.name:<14} {n:>6} tensors {_bytes(nbytes):>28}"
          for d, (n, nbytes) in sorted(by_dtype.items(), key=lambda kv: -kv[1][1])),
        f"once converted:   {how}",
        *lines[3:],
    ])


def _planned(cfg: ModelConfig, resident_bytes: int, layout, disk_gbps: float) -> list[str]:
    """The lines of a model not written yet: architecture, experts, parameters (from cfg), then resident bytes,
    bytes per expert (layout: an ExpertLayout), experts on disk, read per token and decode ceiling."""
    from flashmoe.arch.tensors import resident_shapes

    resident_params = sum(int(np.prod(shape)) for shape in resident_shapes(cfg).values())
    expert_params = len(EXPERT_PROJS) * cfg.hidden_size * cfg.moe_intermediate_size
    n, k = len(cfg.moe_layers), cfg.num_experts_per_tok
    return [
        _architecture(cfg),
        _experts(cfg, n, k),
        f"parameters:       {_count(resident_params + expert_params * cfg.num_experts * n)} total, "
        f"{_count(resident_params + expert_params * k * n)} active per token",
        f"resident:         {_bytes(resident_bytes)}",
        f"per expert:       {_bytes(layout.nbytes)}",
        f"experts on disk:  {_bytes(n * cfg.num_experts * layout.stride)}",
        _read_per_token(k * n * layout.nbytes, k, n),
        _ceiling(k * n * layout.nbytes, disk_gbps),
    ]


def _architecture(cfg: ModelConfig) -> str:
    attn = {t: cfg.layer_types.count(t) for t in dict.fromkeys(cfg.layer_types)}
    dense = cfg.num_hidden_layers - len(cfg.moe_layers)
    return (f"architecture:     {cfg.model_type} ({cfg.num_hidden_layers} layers: "
            + ", ".join(f"{n} {t.replace('_', ' ')}" for t, n in attn.items())
            + (", multi-head latent attention" if cfg.is_mla else "") + (f"; {dense} dense" if dense else "")
            + f"; hidden {cfg.hidden_size}; vocab {cfg.vocab_size})")


def _experts(cfg: ModelConfig, moe_layers: int, k: int) -> str:
    return (f"experts:          {cfg.num_experts} per MoE layer in {moe_layers} layers, k = {k}, "
            f"moe_intermediate_size {cfg.moe_intermediate_size}"
            + (f", shared expert {cfg.shared_expert_intermediate_size}" if cfg.has_shared_expert else ""))


def _read_per_token(nbytes: float, k: int, moe_layers: int, note: str = "") -> str:
    return f"read per token:   {_bytes(nbytes)} (k = {k} experts x {moe_layers} MoE layers, no cache hits{note})"


def _ceiling(nbytes: float, disk_gbps: float) -> str:
    return (f"decode ceiling:   {disk_gbps * 1e9 / nbytes:.3g} tok/s at {disk_gbps:g} GB/s "
            "(disk bandwidth / expert bytes per token)")


def describe(model_dir: str | Path, disk_gbps: float = 2.0) -> str:
    """A human-readable summary of a model directory (the output of `flashmoe info`).

    Lists architecture, total and active parameters, resident bytes, bytes per expert, expert bytes read per
    token at the configured k, and the decode ceiling in tok/s = disk_gbps·1e9 / expert bytes per token.
    Raises FormatError/ConfigError for an invalid directory, FlashMoeError for a non-positive disk_gbps.
    """
    if not disk_gbps > 0:
        raise FlashMoeError(f"--disk-gbps must be positive, got {disk_gbps}")
    with ModelDir.open(model_dir) as md:
        cfg, s = md.config, model_stats(md)
        quant = md.layer_layout(md.moe_layers[0]).quantization
        expert_q = ", ".join(f"{p} {quant[p].describe()}" if p in quant else f"{p} float"
                             for p in EXPERT_PROJS)
        lines = [
            f"model:            {Path(model_dir)}",
            _architecture(cfg),
            _experts(cfg, s["moe_layers"], s["k"]),
            f"parameters:       {_count(s['total_params'])} total, {_count(s['active_params'])} active per token",
            f"resident:         {_bytes(s['resident_bytes'])} "
            f"({len(md.manifest.quantization)} of {len(md.resident_names())} tensors quantised)",
            f"per expert:       {_bytes(s['expert_bytes'])} ({expert_q}; stride {md.layer_layout(md.moe_layers[0]).stride:,} B)",
            f"experts on disk:  {_bytes(sum(os.path.getsize(md.expert_path(i)) for i in md.moe_layers))}",
            _read_per_token(s["expert_bytes_per_token"], s["k"], s["moe_layers"]),
            _ceiling(s["expert_bytes_per_token"], disk_gbps),
        ]
    return "\n".join(lines)


def describe_gguf(path: str | Path, disk_gbps: float = 2.0) -> str:
    """`flashmoe info MODEL.gguf`: a GGUF before converting it: its architecture (and whether flashmoe imports
    it), the tensors and bytes of each GGML type with how the import stores them (exact, requantised, refused:
    flashmoe/convert/gguf_model.py), the routed experts' bytes per token and the decode ceiling once converted
    (the GGUF's own bytes beside them). Raises CheckpointError for an unreadable GGUF, ConfigError for the
    metadata of an imported architecture that convert would refuse, FlashMoeError for a non-positive disk_gbps."""
    from flashmoe.arch.gguf_names import NORM_TOPK
    from flashmoe.convert.gguf import GGUFModel
    from flashmoe.convert.gguf_model import gguf_config, import_kind

    if not disk_gbps > 0:
        raise FlashMoeError(f"--disk-gbps must be positive, got {disk_gbps}")
    with GGUFModel(path) as g:
        arch, meta = g.architecture, g.metadata
        if arch in NORM_TOPK:
            gguf_config(g)  # metadata convert would refuse (no expert count, k): the same ConfigError
        types: dict[str, list[int]] = {}
        for t in g.tensors.values():
            types.setdefault(t.type.name, [0, 0])
            types[t.type.name][0] += 1
            types[t.type.name][1] += t.nbytes
        experts = [t for t in g.tensors.values() if t.name.endswith("_exps.weight")]
        k = meta.get(f"{arch}.expert_used_count", 0)
        per_token = k * sum(t.nbytes // t.shape[0] for t in experts)
        lines = [f"model:            {Path(path)} ({len(g.files)} file{'s' if len(g.files) > 1 else ''})",
                 f"architecture:     {arch} ({'imported by flashmoe convert' if arch in NORM_TOPK else 'not supported'}"
                 f"; {meta.get(f'{arch}.block_count', '?')} layers, {meta.get(f'{arch}.expert_count', '?')} experts, "
                 f"k = {k})"]
        lines += [f"  {name:<8} {n:>5} tensors {_bytes(nbytes):>28}  {import_kind(name)}"
                  for name, (n, nbytes) in sorted(types.items(), key=lambda kv: -kv[1][1])]
        if per_token:
            lines += _gguf_reads(g, per_token, k, len(experts) // 3, disk_gbps)
    return "\n".join(lines)


def _gguf_reads(g, gguf_per_token: int, k: int, moe_layers: int, disk_gbps: float) -> list[str]:
    """The read-per-token and ceiling lines of a GGUF: the bytes flashmoe reads once it is converted (the
    K-quants' super-blocks become groups with float32 scales and biases: exact, and larger), the same figure
    `flashmoe info` gives the converted directory; the GGUF's own bytes (what llama.cpp reads) beside them.
    A GGUF the import refuses gets its own bytes only."""
    from flashmoe.arch.gguf_names import NORM_TOPK
    from flashmoe.convert.gguf_model import imported_expert_layouts

    try:
        layouts = imported_expert_layouts(g) if g.architecture in NORM_TOPK else None
    except FlashMoeError:  # the table above says which tensors the import refuses
        layouts = None
    if not layouts:
        return [_read_per_token(gguf_per_token, k, moe_layers, ", as the GGUF stores them"),
                _ceiling(gguf_per_token, disk_gbps)]
    ours = k * sum(layout.nbytes for layout in layouts.values())
    return [_read_per_token(ours, k, len(layouts), ", once converted"),
            f"in the GGUF:      {_bytes(gguf_per_token)} per token (what llama.cpp reads)",
            _ceiling(ours, disk_gbps)]


def parse_tokens(tokens: str, vocab_size: int) -> np.ndarray:
    """'1,2,3' -> int64 [3]; FlashMoeError naming --tokens for an empty list, a non-integer or an id outside
    [0, vocab_size)."""
    parts = [t.strip() for t in tokens.split(",") if t.strip()]
    if not parts:
        raise FlashMoeError("--tokens: no token ids given (expected e.g. 1,2,3)")
    try:
        ids = np.array([int(t) for t in parts], dtype=np.int64)
    except ValueError:
        bad = next(t for t in parts if not t.lstrip("-").isdigit())
        raise FlashMoeError(f"--tokens: {bad!r} is not an integer token id") from None
    out_of_range = ids[(ids < 0) | (ids >= vocab_size)]
    if out_of_range.size:
        raise FlashMoeError(f"--tokens: id {out_of_range[0]} is outside 0..{vocab_size - 1} (vocab_size)")
    return ids


def compute_logits(model_dir: str | Path, ids: np.ndarray, backend: str = "reference") -> np.ndarray:
    """float32 [len(ids), vocab_size] logits of the model for the sequence `ids`, every position.

    backend 'reference' runs flashmoe.reference (NumPy); any other name runs the engine with that backend
    (flashmoe.runtime.load.load_engine; raises BackendError, a FlashMoeError, for an unknown or unavailable one).
    """
    if backend == "reference":
        from flashmoe.reference import ReferenceModel

        return np.asarray(ReferenceModel.from_dir(model_dir).forward(ids), dtype=np.float32)
    from flashmoe.runtime.load import load_engine

    engine = load_engine(model_dir, backend=backend, context=len(ids))
    return np.asarray(engine.forward(ids, engine.new_state(), all_logits=True), dtype=np.float32)


def write_logits(model_dir: str | Path, tokens: str, out: str | Path, backend: str = "reference") -> Path:
    """Write the logits for comma-separated `tokens` to `out` (.npy, float32 [n_tokens, vocab_size]).

    The file is written under a temporary name beside `out` and renamed, so a failed run leaves no file.
    Raises FlashMoeError for bad tokens or backend, FormatError/ConfigError for a bad model directory.
    """
    out = Path(out)
    with ModelDir.open(model_dir) as md:
        ids = parse_tokens(tokens, md.config.vocab_size)
    with np.errstate(all="ignore"):  # non-finite values are reported by check_finite, once
        logits = check_finite(compute_logits(model_dir, ids, backend), model_dir, 0)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, logits)
    return out
