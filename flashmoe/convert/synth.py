"""Synthetic model directories: a real model's exact shapes with valid random quantised weights.

`flashmoe synth --like qwen3.5-397b-a17b --out DIR --layers 4` writes, at disk speed and without any
Hugging Face detour, a flashmoe model directory (docs/formats.md) that loads and runs like a converted
one: config.json (the preset's, truncated to `--layers`), generation_config.json, the real tokenizer
(flashmoe/convert/synth_tokenizer.py), resident.safetensors and experts/layer_NNN.bin, plus flashmoe.json with
sizes and SHA-256 checksums. Files are written through the format's one writer (flashmoe.format.writer:
ExpertLayout plans and packs experts, the writer streams them and builds the manifest) into a temporary
directory beside DIR that is renamed to DIR only when complete.

Weights: a quantised tensor is random uint32 words (every 4-bit code equally likely) with per-group
scales around `std / sd(q)` (±12.5% jitter) and biases `-scale * (2**bits - 1) / 2`, so each weight
has mean ≈ 0 and standard deviation ≈ `std` (0.02, transformers' initializer_range). Which tensors are
quantised and at which width is flashmoe.format.policy's, as for the converter (router and shared-expert
gate at 8 bits, norms/conv/A_log/dt_bias float). Float tensors: RMSNorm weights 1 (the
canonical x·w form), `A_log = log(U(1, 16))` and `dt_bias = 1` (transformers' Qwen3-Next init), conv1d
`U(±1/sqrt(kernel))` (PyTorch's Conv1d default), attention biases 0.

Routing: the output projections of attention and GatedDeltaNet (`self_attn.o_proj`, `linear_attn.out_proj`)
get `RESIDUAL_BRANCH_STD`, 100× below the others. At std 0.02 random attention, which averages its
prefix, adds to every token's residual stream the same vector, ~30× the 0.02 of the token embedding;
from the second layer on the routers of the 48-layer Qwen3-30B shapes then sent 91–100% of the tokens to
the same top expert. With the smaller projections each token's embedding and its own routed experts'
outputs dominate the residual stream, and routing stays near uniform over the experts at every depth
(docs/benchmarks.md, "llama.cpp side by side", has the per-layer figures): the worst case for any expert
cache, and one that any engine running these weights (llama.cpp on their GGUF export) follows too.

Randomness: numpy's SFC64 (about 3 GB/s per core), one stream per tensor group keyed by (seed, layer), so
a layer's bytes do not depend on which other layers are written.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

from flashmoe.format.atomic import check_output_dir
from flashmoe.arch.config import ModelConfig, read_config_json, text_config
from flashmoe.errors import ConfigError, FlashMoeError
from flashmoe.runtime.memory import format_size
from flashmoe.format.manifest import ExpertLayout, ExpertPart, QuantSpec
from flashmoe.format.mxfp4 import BLOCK as MXFP4_BLOCK
from flashmoe.format.mxfp4 import SCALE_BIAS, Mxfp4Tensor
from flashmoe.format.policy import QuantPolicy
from flashmoe.arch.tensors import resident_shapes
from flashmoe.arch.presets import get_preset, tokenizer_for_vocab, truncate
from flashmoe.format.quant import GROUP_SIZES, QuantizedTensor
from flashmoe.format.writer import ExpertFileWriter, write_model_dir

INIT_STD = 0.02
# Weight std of the projections that write attention/GatedDeltaNet outputs into the residual stream
# (module docstring: keeps random-weight routing near uniform at depth).
RESIDUAL_BRANCH_STD = INIT_STD / 100
_RESIDUAL_BRANCH_TENSORS = ("self_attn.o_proj.weight", "linear_attn.out_proj.weight")
SCALE_DTYPE = ml_dtypes.bfloat16
FLOAT_DTYPE = ml_dtypes.bfloat16
_CHUNK_BYTES = 64 << 20  # experts are generated and written this many bytes at a time
_RESIDENT_STREAM = 1 << 20  # stream id of the non-layer resident tensors (embedding, lm_head, final norm)

Progress = Callable[[int], None]


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, *key])))


def random_words(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` uniformly random uint32 words (SFC64 raw output, the fastest numpy source)."""
    raw = rng.bit_generator.random_raw((count + 1) // 2)
    return raw.view(np.uint32)[:count]


def random_quantized(rng: np.random.Generator, shape: tuple[int, ...], bits: int, group_size: int,
                     std: float = INIT_STD) -> QuantizedTensor:
    """A valid MLX-layout quantised tensor of float shape `shape` ([..., out, in]) whose weights have mean ≈ 0
    and standard deviation ≈ std: uniform random codes, per-group scale `std / sd(q) * U(0.875, 1.125)`
    (sd(q) = sqrt((4**bits - 1) / 12), the deviation of a uniform code) and bias `-scale * (2**bits - 1) / 2`.

    weight uint32 [..., out, in*bits/32]; scales, biases bfloat16 [..., out, in/group_size].
    Raises ConfigError when `in` is not a multiple of group_size (or in*bits of 32).
    """
    *lead, out_dim, in_dim = shape
    if in_dim % group_size or (in_dim * bits) % 32:
        raise ConfigError(f"cannot quantise a tensor of shape {list(shape)} with group_size {group_size}, "
                          f"bits {bits}: the input width must be a multiple of both")
    words = random_words(rng, math.prod(shape) * bits // 32).reshape(*lead, out_dim, in_dim * bits // 32)
    groups = (*lead, out_dim, in_dim // group_size)
    base = std / math.sqrt((4 ** bits - 1) / 12)
    scales = (base * (0.875 + 0.25 * rng.random(groups, dtype=np.float32))).astype(SCALE_DTYPE)
    biases = (-scales.astype(np.float32) * ((2 ** bits - 1) / 2)).astype(SCALE_DTYPE)
    return QuantizedTensor(words, scales, biases, bits, group_size)


def init_std(name: str) -> float:
    """Weight standard deviation of the linear (or embedding) weight `name`: RESIDUAL_BRANCH_STD for the
    attention and GatedDeltaNet output projections, INIT_STD for every other one."""
    return RESIDUAL_BRANCH_STD if name.endswith(_RESIDUAL_BRANCH_TENSORS) else INIT_STD


def _random_float(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Initial value of a float (unquantised) resident tensor, chosen by its role (module docstring)."""
    if name.endswith("A_log"):
        return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    if name.endswith("conv1d.weight"):
        bound = 1.0 / math.sqrt(shape[-1])
        return rng.uniform(-bound, bound, shape).astype(FLOAT_DTYPE)
    if name.endswith(".bias"):
        return np.zeros(shape, FLOAT_DTYPE)
    if name.endswith(("norm.weight", "dt_bias")):
        return np.ones(shape, FLOAT_DTYPE)
    return (rng.standard_normal(shape, dtype=np.float32) * init_std(name)).astype(FLOAT_DTYPE)


def _policy(bits: int | None, group_size: int) -> QuantPolicy:
    """synth's quantisation: `bits` for resident weights and experts alike (None: bfloat16 floats)."""
    return QuantPolicy(bits, group_size, bits)


def _layer_of(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("layers.") else _RESIDENT_STREAM


def resident_tensors(cfg: ModelConfig, bits: int | None, group_size: int,
                     seed: int) -> Iterator[tuple[str, QuantizedTensor | np.ndarray]]:
    """Every resident tensor of a `cfg` model (arch.tensors.resident_shapes), generated lazily one at a time:
    (canonical name, QuantizedTensor or float array)."""
    streams: dict[int, np.random.Generator] = {}
    policy = _policy(bits, group_size)
    for name, shape in resident_shapes(cfg).items():
        layer = _layer_of(name)
        rng = streams.setdefault(layer, _rng(seed, 0, layer))
        q = policy.resident(name, shape)
        yield name, (_random_float(name, shape, rng) if q is None else
                     random_quantized(rng, shape, q.bits, q.group_size, init_std(name)))


def _expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def random_expert(cfg: ModelConfig, rng: np.random.Generator, bits: int | None,
                  group_size: int) -> dict[str, ExpertPart]:
    """One routed expert: {'gate_proj' [I, H], 'up_proj' [I, H], 'down_proj' [H, I]} (quantised unless bits
    is None, then bfloat16 floats). Unlike the policy, which would leave a projection whose input width does not
    divide by group_size float, this raises ConfigError (random_quantized): a synthetic model exists for its
    quantised expert bytes. A family that publishes MXFP4 experts gets them in MXFP4 whatever `bits` (random
    codes, scale 2^-7: std ≈ 0.02), and one with expert biases '{proj}.bias' (bfloat16 [out]) too."""
    def part(shape: tuple[int, int]) -> ExpertPart:
        if cfg.mxfp4_experts:
            return Mxfp4Tensor(rng.integers(0, 256, (shape[0], shape[1] // 2), dtype=np.uint8),
                               np.full((shape[0], shape[1] // MXFP4_BLOCK), SCALE_BIAS - 7, np.uint8))
        if bits is not None:
            return random_quantized(rng, shape, bits, group_size)
        return (rng.standard_normal(shape, dtype=np.float32) * INIT_STD).astype(FLOAT_DTYPE)

    parts = {proj: part(shape) for proj, shape in _expert_shapes(cfg).items()}
    if cfg.has_expert_biases:
        parts.update({f"{proj}.bias": (rng.standard_normal(shape[0], dtype=np.float32) * INIT_STD).astype(FLOAT_DTYPE)
                      for proj, shape in _expert_shapes(cfg).items()})
    return parts


def expert_layout(cfg: ModelConfig, bits: int | None, group_size: int) -> ExpertLayout:
    """The expert layout synth writes for `cfg` (ExpertLayout.plan of one expert's parts)."""
    return ExpertLayout.plan(random_expert(cfg, _rng(0), bits, group_size))


def _stored_bytes(shape: tuple[int, ...], q: QuantSpec | None, float_dtype: np.dtype = FLOAT_DTYPE) -> int:
    """Bytes of a tensor stored float (float_dtype) or quantised by q (scales and biases in float_dtype)."""
    itemsize = np.dtype(float_dtype).itemsize
    if q is None:
        return math.prod(shape) * itemsize
    return math.prod(shape) * q.bits // 8 + 2 * (math.prod(shape) // q.group_size) * itemsize


def planned_bytes(cfg: ModelConfig, bits: int | None, group_size: int) -> tuple[int, int]:
    """(resident bytes, expert-file bytes) that synth_model writes for `cfg`, without writing anything."""
    policy = _policy(bits, group_size)
    resident = sum(_stored_bytes(shape, policy.resident(name, shape)) for name, shape in resident_shapes(cfg).items())
    experts = len(cfg.moe_layers) * cfg.num_experts * expert_layout(cfg, bits, group_size).stride
    return resident, experts


def planned_conversion(cfg: ModelConfig, bits: int | None, group_size: int, float_dtype: np.dtype,
                       mxfp4: bool) -> tuple[int, ExpertLayout]:
    """(resident bytes, expert layout) of `cfg` as `flashmoe convert` writes it from a checkpoint of float_dtype
    weights, from the shapes alone: each weight quantised where the policy quantises it, else kept float (an
    input width that is not a multiple of group_size), scales and biases in the weights' dtype (as
    format.quant.quantize keeps them); `mxfp4`: the checkpoint's experts are MXFP4 (gpt-oss as published),
    kept so; expert biases float."""
    policy, dtype = _policy(bits, group_size), np.dtype(float_dtype)
    resident = sum(_stored_bytes(shape, policy.resident(name, shape), dtype)
                   for name, shape in resident_shapes(cfg).items())

    def part(shape: tuple[int, int]) -> ExpertPart:
        out_dim, in_dim = shape
        if mxfp4:
            return Mxfp4Tensor(np.empty((out_dim, in_dim // 2), np.uint8),
                               np.empty((out_dim, in_dim // MXFP4_BLOCK), np.uint8))
        if (q := policy.expert(shape)) is None:
            return np.empty(shape, dtype)
        groups = (out_dim, in_dim // q.group_size)
        return QuantizedTensor(np.empty((out_dim, in_dim * q.bits // 32), np.uint32), np.empty(groups, dtype),
                               np.empty(groups, dtype), q.bits, q.group_size)

    parts = {proj: part(shape) for proj, shape in _expert_shapes(cfg).items()}
    if cfg.has_expert_biases:
        parts.update({f"{proj}.bias": np.empty(shape[0], dtype) for proj, shape in _expert_shapes(cfg).items()})
    return resident, ExpertLayout.plan(parts)


def write_random_experts(writer: ExpertFileWriter, cfg: ModelConfig, layer: int, bits: int | None,
                         group_size: int, seed: int, progress: Progress | None = None) -> None:
    """Fill experts/layer_NNN.bin of MoE layer `layer` (`writer`) with num_experts random experts, packed by the
    writer's layout in chunks of about 64 MiB: one chunk is generated while the previous one is written."""
    rng = _rng(seed, 1, layer)
    stride = writer.layout.stride
    per_chunk = max(1, _CHUNK_BYTES // stride)
    buffers = [np.empty(per_chunk * stride, np.uint8) for _ in range(2)]  # one filling, one writing
    for n_chunk, first in enumerate(range(0, cfg.num_experts, per_chunk)):
        count = min(per_chunk, cfg.num_experts - first)
        buf = buffers[n_chunk % 2]  # free: write_experts waited for the write of chunk n_chunk - 2
        for j in range(count):
            writer.layout.pack(random_expert(cfg, rng, bits, group_size), buf[j * stride:(j + 1) * stride])
        writer.write_experts(first, buf[: count * stride])
        if progress:
            progress(count * stride)
    writer.close()


def choose_tokenizer(config: dict[str, Any]) -> str | None:
    """The real tokenizer that fits a config's vocabulary, for `--config` models without a preset
    (presets.tokenizer_for_vocab); None when nothing fits (the directory then has no tokenizer)."""
    return tokenizer_for_vocab(int(config.get("text_config", config).get("vocab_size", 0)))


def synth_model(out: str | Path, config: dict[str, Any], *, tokenizer: str | None = None,
                generation_config: dict[str, Any] | None = None, bits: int | None = 4, group_size: int = 64,
                seed: int = 0, source: dict[str, Any] | None = None, force: bool = False,
                progress: Progress | None = None) -> Path:
    """Write a synthetic flashmoe model directory for `config` (a Hugging Face config.json dict) at `out`.

    bits: width of quantised tensors (2, 3, 4, 5, 6, 8) or None for bfloat16 floats; group_size 32/64/128.
    tokenizer: 'qwen3.5', 'qwen3', 'mixtral-standin' or None (no tokenizer files).
    progress: called with the number of bytes written after each piece (for a progress bar).
    Raises FlashMoeError when `out` may not be written (exists without force; see atomic.check_output_dir) or
    the disk lacks the space, ConfigError for a bad config. On failure `out` is as it was and the temporary
    directory beside it is removed.
    """
    from flashmoe.convert.synth_tokenizer import write_tokenizer

    out = Path(out)
    cfg = check_synth(out, config, bits, group_size, force)
    record = {"synthetic": True, "seed": seed, "bits": bits, "group_size": group_size,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(source or {})}
    with write_model_dir(out, cfg.model_type, record, _policy(bits, group_size), {"synthetic": "true"}) as writer:
        writer.add_file("config.json", json.dumps(config, indent=2) + "\n")
        if generation_config is not None:
            writer.add_file("generation_config.json", json.dumps(generation_config, indent=2) + "\n")
        if tokenizer is not None:
            write_tokenizer(tokenizer, writer.root)
        for name, t in resident_tensors(cfg, bits, group_size, seed):
            writer.add_resident(name, t)
            if progress:
                progress(t.nbytes)
        layout = expert_layout(cfg, bits, group_size)
        for layer in cfg.moe_layers:
            write_random_experts(writer.open_experts(layer, layout, cfg.num_experts), cfg, layer, bits, group_size,
                                 seed, progress)
    return out


def check_synth(out: Path, config: dict[str, Any], bits: int | None, group_size: int, force: bool,
                config_name: str = "synth config") -> ModelConfig:
    """Everything synth_model checks before it writes a byte; returns the parsed config (errors name it
    `config_name`).

    Raises ConfigError (group_size, config) or FlashMoeError: `out` may not be written
    (atomic.check_output_dir) or its disk lacks the space for the planned bytes.
    """
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    cfg = ModelConfig.from_dict(config, source=config_name)
    check_output_dir(out, force)
    needed = sum(planned_bytes(cfg, bits, group_size))
    folder = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FlashMoeError(f"{folder}: {format_size(needed)} needed, {format_size(free)} free (use --layers to "
                            "write fewer layers)")
    return cfg


def synth_like(out: str | Path, like: str | None = None, config_path: str | Path | None = None,
               layers: int | None = None, bits: int | None = 4, group_size: int = 64, seed: int = 0,
               force: bool = False, show_progress: bool = True) -> Path:
    """`flashmoe synth`: a preset (`like`) or a config.json file (`config_path`), truncated to `layers`.

    Exactly one of like/config_path. Shows a tqdm progress bar over the bytes to write when show_progress.
    Raises ConfigError for an unknown preset, an unreadable config or a bad --layers.
    """
    if (like is None) == (config_path is None):
        raise ConfigError("give exactly one of --like NAME or --config config.json")
    if like is not None:
        preset = get_preset(like)
        config, gen, tok = preset.config_dict(layers), preset.generation_config, preset.tokenizer
        source = {"like": preset.name}
    else:
        # a multimodal config: synth writes its text model, read as loading reads it
        config = text_config(read_config_json(Path(config_path)), str(config_path))
        if layers is not None:
            truncate(config, layers)
        gen, tok, source = None, choose_tokenizer(config), {"config": str(config_path)}
    if layers is not None:
        source["truncated_to_layers"] = layers

    # Checked before the progress bar is drawn, so a run that cannot start prints only its error.
    cfg = check_synth(Path(out), config, bits, group_size, force, config_name=str(config_path or like))
    if tok is not None:
        from flashmoe.convert import synth_tokenizer

        synth_tokenizer.build_tokenizer_json(tok)  # cached for write_tokenizer; fails early without its packages
    total = sum(planned_bytes(cfg, bits, group_size))
    if not show_progress:
        return synth_model(out, config, tokenizer=tok, generation_config=gen, bits=bits, group_size=group_size,
                           seed=seed, source=source, force=force)
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {Path(out).name}") as bar:
        return synth_model(out, config, tokenizer=tok, generation_config=gen, bits=bits, group_size=group_size,
                           seed=seed, source=source, force=force, progress=bar.update)
