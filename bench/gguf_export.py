"""Export a flashmoe model directory to one GGUF file, for llama.cpp to run the same weights.

`python -m flashmoe.bench.gguf_export MODEL_DIR OUT.gguf [--type q4_0|f32]` (or export_gguf): every tensor
of the model directory (docs/formats.md, read through flashmoe.format.modeldir.ModelDir) under llama.cpp's name
and layout for the architecture, the same shapes, the same tokenizer (the directory's tokenizer.json: BPE
tokens, merges, special tokens) and the same k (`expert_used_count` = the config's num_experts_per_tok).

Weights: flashmoe's group-wise affine tensors are dequantised with flashmoe.format.quant (float32) and requantised
with the `gguf` package's own quantiser (gguf.quants): 4-bit (and narrower) tensors to Q4_0 (block 32,
one float16 scale: 4.5 bits per weight, the same bytes per weight as flashmoe's 4-bit group 64 with bf16
scale and bias, so both engines read the same number of expert bytes), wider ones (the 8-bit router) to
Q8_0; float tensors (norms) stay F32. `--type f32` writes every tensor as F32 (no requantisation error:
for checking llama.cpp's forward against flashmoe's).

Architectures: `qwen3moe` (flashmoe `qwen3_moe`: Qwen3-30B-A3B, Qwen3-235B-A22B), `qwen35moe`
(`qwen3_5_moe_text`: Qwen3.5-35B-A3B, -397B-A17B) and `olmoe` (flashmoe/arch/gguf_names.py's EXPORTABLE); a
model whose norm_topk_prob differs from what llama.cpp's build of the architecture does (qwen3moe always
renormalises the top-k weights, olmoe never) is refused, since llama.cpp reads no key for it. Names and metadata keys follow gguf's constants.py
(MODEL_TENSORS, Keys) and llama.cpp's src/models/qwen3moe.cpp and qwen35moe.cpp; tensor values follow
its converter (conversion/qwen.py): no permutation for Qwen3 (llama.cpp's NEOX rope is the checkpoint's
rotate-half rope, its RMSNorms plain `x·w` as flashmoe's canonical ones); for Qwen3.5 the GatedDeltaNet
tensors as _linear_attention_transform says. Verified by running the export in llama.cpp: its logits equal
flashmoe's reference forward on an F32 export (tests/test_gguf_export.py).

Streaming: the tensor table (names, shapes, types, offsets) is written first; then each tensor is
dequantised, requantised and written at its offset with os.pwrite: the stacked expert tensors an expert at a
time (each expert read once), large resident ones in blocks of rows, one whose rows a transform permutes
whole, so memory stays at a few experts whatever the model's size. Written bytes are synced and dropped
from the page cache every 512 MB, and each expert file after its layer, so an export of 17 GB does not
evict other processes' pages. The file is written under a temporary name and
renamed when complete (flashmoe.format.atomic).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import FAMILIES, MODEL_TYPES, family_of
from flashmoe.arch.gguf_names import EXPERT_NAMES, EXPORTABLE, NORM_TOPK, gguf_tensor_name
from flashmoe.format.atomic import atomic_path, check_writable
from flashmoe.errors import FlashMoeError
from flashmoe.format.modeldir import ModelDir
from flashmoe.format.quant import QuantizedTensor

QUANT_TYPES = ("q4_0", "f32")
_FLUSH_BYTES = 512 << 20
_CHUNK_ELEMENTS = 1 << 22  # resident tensors are converted this many weights at a time
# an export must fit with the smaller of this and a tenth of the file to spare (a disk filled to the last
# byte breaks everyone's runs on a shared machine; a tiny export needs little more than room for itself)
FREE_MARGIN_BYTES = 1 << 30
# llama.cpp's tokenizer.ggml.token_type values (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: its GGUF name, logical shape (numpy order, [..., out, in]), GGML type and where its
    data comes from (`source`: a resident canonical name, or (layer, projection) for stacked experts)."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    source: str | tuple[int, str]
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # on the float32 tensor, before quantising

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.qtype)]
        return int(np.prod(self.shape)) // block * size


def _linear_attention_transform(cfg: ModelConfig, name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """What llama.cpp's converter does to a Qwen3.5 GatedDeltaNet tensor (conversion/qwen.py,
    Qwen3NextModel and _LinearAttentionVReorderBase): A_log -> -exp(A_log); conv1d [C, 1, K] -> [C, K];
    the shared-expert gate [1, H] -> [H]; and every value-head axis from grouped by key head
    (v0..v{r-1} of key head 0, then of key head 1, ...) to tiled order (value head j of every key head, then
    j + 1), which ggml's broadcast expects. Norm weights need nothing: flashmoe's canonical norms already
    hold 1 + w, as llama.cpp's converter writes them."""
    kh, vh, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)

    def tiled(w: np.ndarray, head_dim: int, start: int = 0, axis: int = 0) -> np.ndarray:
        w = np.moveaxis(w, axis, 0)
        v = w[start:]
        v = v.reshape(kh, vh // kh, head_dim, *v.shape[1:]).swapaxes(0, 1).reshape(v.shape)
        return np.moveaxis(np.concatenate([w[:start], v]), 0, axis)

    qk = 2 * kh * dk
    return {
        "linear_attn.in_proj_qkv.weight": lambda w: tiled(w, dv, start=qk),
        "linear_attn.in_proj_z.weight": lambda w: tiled(w, dv),
        "linear_attn.in_proj_b.weight": lambda w: tiled(w, 1),
        "linear_attn.in_proj_a.weight": lambda w: tiled(w, 1),
        "linear_attn.dt_bias": lambda w: tiled(w, 1),
        "linear_attn.A_log": lambda w: -np.exp(tiled(w, 1)),
        "linear_attn.conv1d.weight": lambda w: tiled(w.reshape(w.shape[0], w.shape[-1]), dv, start=qk),
        "linear_attn.out_proj.weight": lambda w: tiled(w, dv, axis=1),
        "mlp.shared_expert_gate.weight": lambda w: w.reshape(-1),
    }.get(name.split(".", 2)[2] if name.startswith("layers.") else name)


def _linear_attention_metadata(cfg: ModelConfig, arch: str) -> dict[str, object]:
    """The keys of a model with GatedDeltaNet layers beyond the common ones (llama.cpp's load_arch_hparams for
    qwen35moe). Raises FlashMoeError for a layer pattern other than every 4th layer full attention, or unequal
    key and value head widths (llama.cpp sizes both by ssm.state_size)."""
    from flashmoe.arch.presets import hybrid_layer_types

    if tuple(cfg.layer_types) != tuple(hybrid_layer_types(cfg.num_hidden_layers)):
        raise FlashMoeError(f"{arch} export: layer_types must be every 4th layer full attention")
    if cfg.linear_key_head_dim != cfg.linear_value_head_dim:
        raise FlashMoeError(f"{arch} export: linear_key_head_dim != linear_value_head_dim")
    rot_pairs = int(cfg.head_dim * cfg.partial_rotary_factor) // 2
    side = round(rot_pairs * 11 / 32)  # Qwen3.5's mrope_section [11, 11, 10] of 32 pairs, scaled
    return {f"{arch}.expert_shared_feed_forward_length": cfg.shared_expert_intermediate_size,
            f"{arch}.rope.dimension_count": 2 * rot_pairs,
            # text positions are equal in every section, so the split only has to add up
            f"{arch}.rope.dimension_sections": [side, side, rot_pairs - 2 * side, 0],
            f"{arch}.full_attention_interval": 4,
            f"{arch}.ssm.conv_kernel": cfg.linear_conv_kernel_dim,
            f"{arch}.ssm.state_size": cfg.linear_key_head_dim,
            f"{arch}.ssm.group_count": cfg.linear_num_key_heads,
            f"{arch}.ssm.time_step_rank": cfg.linear_num_value_heads,
            f"{arch}.ssm.inner_size": cfg.linear_value_head_dim * cfg.linear_num_value_heads}


def llama_arch(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for a model (its Family's gguf_arch, e.g. 'qwen3moe'); FlashMoeError when
    the exporter does not map it."""
    arch = family_of(cfg).gguf_arch
    if arch not in EXPORTABLE:
        supported = sorted(t for t, f in MODEL_TYPES.items() if FAMILIES[f].gguf_arch in EXPORTABLE)
        raise FlashMoeError(f"model_type {cfg.model_type!r} has no GGUF export (supported: {', '.join(supported)})")
    return arch


def _qtype(stored: QuantizedTensor | np.ndarray, shape: tuple[int, ...], quant: str) -> int:
    """GGML type a tensor is written as (module docstring): Q4_0 for <= 4 bits, Q8_0 wider, F32 floats and
    vectors."""
    import gguf

    T = gguf.GGMLQuantizationType
    if quant == "f32" or not isinstance(stored, QuantizedTensor) or len(shape) == 1 or shape[-1] % 32:
        return T.F32
    return T.Q4_0 if stored.bits <= 4 else T.Q8_0


def plan(md: ModelDir, quant: str = "q4_0") -> tuple[str, list[Planned]]:
    """(llama.cpp architecture name, the tensors in file order: per layer its resident tensors then its
    stacked experts, so a layer's bytes are contiguous as in llama.cpp's own conversions).
    Raises FlashMoeError for an architecture the exporter does not map or an unexpected tensor."""
    cfg = md.config
    if quant not in QUANT_TYPES:
        raise FlashMoeError(f"--type {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    arch = llama_arch(cfg)
    if cfg.norm_topk_prob != NORM_TOPK[arch]:  # src/models/<arch>.cpp's build_moe_ffn ignores expert_weights_norm
        raise FlashMoeError(f"{md.path}: norm_topk_prob is {str(cfg.norm_topk_prob).lower()}; llama.cpp's {arch} "
                            f"{'always' if NORM_TOPK[arch] else 'never'} renormalises the top-k weights")
    by_layer: dict[int, list[Planned]] = {}
    for ours in md.resident_names():
        gguf_name = gguf_tensor_name(ours, arch)
        if gguf_name is None:
            raise FlashMoeError(f"{md.path}: tensor {ours!r} has no {arch} GGUF name")
        stored = md.raw(ours)
        transform = _linear_attention_transform(cfg, ours)
        shape = stored.shape if transform is None else transform(np.zeros(stored.shape, np.float32)).shape
        layer = int(ours.split(".")[1]) if ours.startswith("layers.") else -1
        by_layer.setdefault(layer, []).append(
            Planned(gguf_name, shape, _qtype(stored, shape, quant), ours, transform))
    for layer in md.moe_layers:
        parts = md.layer_layout(layer).view(np.zeros(md.layer_layout(layer).nbytes, np.uint8))
        for proj, gguf_name in EXPERT_NAMES.items():
            part = parts[proj]
            shape = (md.num_experts(layer), *part.shape)
            by_layer.setdefault(layer, []).append(
                Planned(f"blk.{layer}.{gguf_name}", shape, _qtype(part, shape, quant), (layer, proj)))
    head = by_layer.pop(-1, [])
    first = [p for p in head if p.name == "token_embd.weight"]
    return arch, first + [p for layer in sorted(by_layer) for p in by_layer[layer]] + \
        [p for p in head if p.name != "token_embd.weight"]


def _to_gguf(stored: QuantizedTensor | np.ndarray, qtype: int,
             transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Dequantise with flashmoe.format.quant (float32), apply `transform`, quantise with gguf.quants; uint8 bytes
    (or float32)."""
    import gguf

    w = stored.dequantize(np.float32) if isinstance(stored, QuantizedTensor) else np.asarray(stored, np.float32)
    if transform is not None:
        w = transform(w)
    return gguf.quants.quantize(np.ascontiguousarray(w), gguf.GGMLQuantizationType(qtype))


def tokenizer_metadata(md: ModelDir) -> dict[str, object]:
    """tokenizer.ggml.* keys from the directory's tokenizer.json (a byte-level BPE: model `gpt2`), with the
    token list padded to vocab_size by `[PADn]` tokens of type unused, as llama.cpp's converter does.
    Raises FlashMoeError when the directory has no tokenizer.json or it is not BPE."""
    pre_tokenizer = family_of(md.config).gguf_pre_tokenizer or "default"
    path = md.path / "tokenizer.json"
    if not path.exists():
        raise FlashMoeError(f"{path}: missing; a GGUF needs the model's tokenizer")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise FlashMoeError(f"{path}: tokenizer model {model.get('type')!r} is not BPE (only byte-level BPE exports)")
    vocab_size = md.config.vocab_size
    tokens: list[str | None] = [None] * vocab_size
    types = [_NORMAL] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = text
    for added in tok.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", _UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, object] = {"tokenizer.ggml.model": "gpt2",
                               "tokenizer.ggml.pre": pre_tokenizer,
                               "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                               "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_bos_token": False}
    cfg = md.config
    if cfg.bos_token_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id:
        meta["tokenizer.ggml.eos_token_id"] = cfg.eos_token_id[0]
    tc = md.path / "tokenizer_config.json"
    if tc.exists():
        template = json.loads(tc.read_text()).get("chat_template")
        if isinstance(template, str):
            meta["tokenizer.chat_template"] = template
    return meta


def _model_metadata(md: ModelDir, arch: str, quant: str) -> dict[str, object]:
    cfg = md.config
    meta: dict[str, object] = {
        "general.name": md.path.name,
        "general.file_type": 2 if quant == "q4_0" else 0,  # llama_ftype MOSTLY_Q4_0 / ALL_F32
        "general.quantization_version": 2,
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size or cfg.moe_intermediate_size,
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.attention.key_length": cfg.head_dim,
        f"{arch}.attention.value_length": cfg.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        f"{arch}.rope.freq_base": cfg.rope_theta,
        f"{arch}.expert_count": cfg.num_experts,
        f"{arch}.expert_used_count": cfg.num_experts_per_tok,
        f"{arch}.expert_weights_norm": cfg.norm_topk_prob,
        f"{arch}.expert_feed_forward_length": cfg.moe_intermediate_size,
    }
    return {**meta, **(_linear_attention_metadata(cfg, arch) if family_of(cfg).linear_attention else {})}


class _Output:
    """pwrite at planned offsets; syncs and drops written pages from the page cache every _FLUSH_BYTES."""

    def __init__(self, fd: int):
        self.fd, self.pending = fd, 0

    def write(self, data: np.ndarray, offset: int) -> None:
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        self.pending += data.nbytes
        if self.pending >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.pending = 0


def export_gguf(model_dir: str | Path, out: str | Path, quant: str = "q4_0",
                progress: Callable[[int], None] | None = None) -> Path:
    """Write the GGUF file `out` for the flashmoe model directory `model_dir` (module docstring).

    quant: 'q4_0' (quantised tensors to Q4_0/Q8_0, floats F32) or 'f32' (everything F32).
    progress: called with the bytes written after each tensor (or expert).
    Raises FlashMoeError for an unsupported architecture or tokenizer, an unwritable `out`, or a disk without
    room for the file plus min(FREE_MARGIN_BYTES, a tenth of it); FormatError for an invalid
    directory. Nothing is left at `out` on failure.
    """
    import gguf

    out = Path(out)
    check_writable(out)
    md = ModelDir.open(model_dir)
    arch, tensors = plan(md, quant)
    meta = {**_model_metadata(md, arch, quant), **tokenizer_metadata(md)}
    total = sum(t.nbytes for t in tensors)
    free = shutil.disk_usage(out.parent).free
    margin = min(FREE_MARGIN_BYTES, total // 10)
    if total + margin > free:
        raise FlashMoeError(f"{out}: the export needs {(total + margin) / 1e9:.2f} GB ({total / 1e9:.2f} GB "
                            f"and a {margin / 1e9:.2f} GB margin) but its disk has {free / 1e9:.2f} GB free")
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, value in meta.items():
            _add(writer, key, value)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(t.qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        start = writer.ggml_pad(fout.tell(), writer.data_alignment)
        fout.flush()
        offsets, at = [], start
        for t in tensors:
            offsets.append(at)
            at += writer.ggml_pad(t.nbytes, writer.data_alignment)
        os.ftruncate(fout.fileno(), at)
        output = _Output(fout.fileno())
        for t, offset in zip(tensors, offsets):
            for data, where in _tensor_pieces(md, t, offset):
                output.write(data, where)
                if progress:
                    progress(data.nbytes)
            if isinstance(t.source, tuple) and t.source[1] == "down_proj":
                fd = os.open(md.expert_path(t.source[0]), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        output.flush()
        writer.close()
    md.close()
    return out


def _tensor_pieces(md: ModelDir, t: Planned, offset: int) -> Iterator[tuple[np.ndarray, int]]:
    """(bytes, file offset) pieces of tensor t: a resident one in blocks of rows (the float32 copy of a
    151,936-row embedding alone would be 1.2 GB), a stacked expert tensor one expert at a time."""
    if isinstance(t.source, str):
        stored = md.raw(t.source)
        if len(t.shape) == 1 or t.transform is not None:  # transforms permute rows: the whole tensor at once
            yield _to_gguf(stored, t.qtype, t.transform), offset
            return
        rows = t.shape[0]
        step = max(1, _CHUNK_ELEMENTS // t.shape[-1])
        for r in range(0, rows, step):
            if isinstance(stored, QuantizedTensor):
                part = QuantizedTensor(stored.weight[r:r + step], stored.scales[r:r + step],
                                       stored.biases[r:r + step], stored.bits, stored.group_size)
            else:
                part = stored[r:r + step]
            yield _to_gguf(part, t.qtype), offset + r * (t.nbytes // rows)
        return
    layer, proj = t.source
    layout = md.layer_layout(layer)
    per_expert = t.nbytes // t.shape[0]
    for e in range(t.shape[0]):
        part = layout.view(md.read_expert(layer, e))[proj]
        yield _to_gguf(part, t.qtype), offset + e * per_expert


def _add(writer, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", default="q4_0", choices=QUANT_TYPES)
    a = ap.parse_args(argv)
    from tqdm import tqdm

    md = ModelDir.open(a.model_dir)
    total = sum(t.nbytes for t in plan(md, a.type)[1])
    md.close()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {a.out.name}") as bar:
        export_gguf(a.model_dir, a.out, a.type, progress=bar.update)


if __name__ == "__main__":
    main()
