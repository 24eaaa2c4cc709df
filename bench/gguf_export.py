"""Export a flashmoe model directory to one GGUF file, for llama.cpp to run the same weights.

`python -m flashmoe.bench.gguf_export MODEL_DIR OUT.gguf [--type q4_0|f32]` (or export_gguf): every tensor
of the model directory (docs/formats.md, read through flashmoe.modeldir.ModelDir) under llama.cpp's name
and layout for the architecture, the same shapes, the same tokenizer (the directory's tokenizer.json: BPE
tokens, merges, special tokens) and the same k (`expert_used_count` = the config's num_experts_per_tok).

Weights: flashmoe's group-wise affine tensors are dequantised with flashmoe.quant (float32) and requantised
with the `gguf` package's own quantiser (gguf.quants): 4-bit (and narrower) tensors to Q4_0 (block 32,
one float16 scale: 4.5 bits per weight, the same bytes per weight as flashmoe's 4-bit group 64 with bf16
scale and bias, so both engines read the same number of expert bytes), wider ones (the 8-bit router) to
Q8_0; float tensors (norms) stay F32. `--type f32` writes every tensor as F32 (no requantisation error:
for checking llama.cpp's forward against flashmoe's).

Architectures: `qwen3moe` (flashmoe `qwen3_moe`: Qwen3-30B-A3B, Qwen3-235B-A22B). Names and metadata keys
follow gguf's constants.py (MODEL_TENSORS, Keys) and llama.cpp's src/models/qwen3moe.cpp, which reads
separate attn_q/k/v, q/k RMSNorm weights, the router `ffn_gate_inp` and stacked experts
`ffn_{gate,up,down}_exps` [E, out, in]. Qwen3's RMSNorms are plain `x·w` in both, and llama.cpp's NEOX
rope is the rotate-half rope of the Hugging Face checkpoint, so no tensor is permuted.

Streaming: the tensor table (names, shapes, types, offsets) is written first; then each tensor is
dequantised, requantised and written at its offset with os.pwrite, an expert at a time for the stacked
expert tensors (each expert read once), so memory stays at a few experts whatever the model's size. Written
bytes are synced and dropped from the page cache every 512 MB, and each expert file after its layer, so an
export of 17 GB does not evict other processes' pages. The file is written under a temporary name and
renamed when complete (flashmoe.atomic).
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

from flashmoe.atomic import atomic_path, check_writable
from flashmoe.errors import FlashMoeError
from flashmoe.modeldir import ModelDir
from flashmoe.quant import QuantizedTensor

QUANT_TYPES = ("q4_0", "f32")
_FLUSH_BYTES = 512 << 20
_CHUNK_ELEMENTS = 1 << 22  # resident tensors are converted this many weights at a time
# keep this much disk free beyond the file itself (a full disk breaks everyone's runs on a shared machine)
FREE_MARGIN_BYTES = 5 << 30
# llama.cpp's tokenizer.ggml.token_type values (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5
# pre-tokenizer names llama.cpp knows (src/llama-vocab.cpp) for the Qwen vocabularies' split regex
_QWEN_PRE = {"qwen3_moe": "qwen2"}


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: its GGUF name, logical shape (numpy order, [..., out, in]), GGML type and where its
    data comes from (`source`: a resident canonical name, or (layer, projection) for stacked experts)."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    source: str | tuple[int, str]

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.qtype)]
        return int(np.prod(self.shape)) // block * size


def _qwen3moe_names(cfg) -> dict[str, str]:
    """Canonical resident name -> llama.cpp tensor name for qwen3moe."""
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                 "mlp.gate.weight": "ffn_gate_inp.weight"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in per_layer.items()})
    return names


_ARCHES = {"qwen3_moe": ("qwen3moe", _qwen3moe_names)}
_EXPERT_NAMES = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight",
                 "down_proj": "ffn_down_exps.weight"}


def llama_arch(model_type: str) -> str:
    """llama.cpp's architecture name for a flashmoe model_type ('qwen3_moe' -> 'qwen3moe'); FlashMoeError when
    the exporter does not map it."""
    if model_type not in _ARCHES:
        raise FlashMoeError(f"model_type {model_type!r} has no GGUF export (supported: {', '.join(_ARCHES)})")
    return _ARCHES[model_type][0]


def _qtype(stored: QuantizedTensor | np.ndarray, shape: tuple[int, ...], quant: str) -> int:
    """GGML type a tensor is written as (module docstring): Q4_0 for <= 4 bits, Q8_0 wider, F32 floats."""
    import gguf

    T = gguf.GGMLQuantizationType
    if quant == "f32" or not isinstance(stored, QuantizedTensor) or shape[-1] % 32:
        return T.F32
    return T.Q4_0 if stored.bits <= 4 else T.Q8_0


def plan(md: ModelDir, quant: str = "q4_0") -> tuple[str, list[Planned]]:
    """(llama.cpp architecture name, the tensors in file order: per layer its resident tensors then its
    stacked experts, so a layer's bytes are contiguous as in llama.cpp's own conversions).
    Raises FlashMoeError for an architecture the exporter does not map or an unexpected tensor."""
    cfg = md.config
    if quant not in QUANT_TYPES:
        raise FlashMoeError(f"--type {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    arch = llama_arch(cfg.model_type)
    if not cfg.norm_topk_prob:
        raise FlashMoeError(f"{md.path}: norm_topk_prob is false; llama.cpp's {cfg.model_type} always "
                            f"renormalises the top-k weights")
    names = _ARCHES[cfg.model_type][1](cfg)
    by_layer: dict[int, list[Planned]] = {}
    for ours in md.resident_names():
        if ours not in names:
            raise FlashMoeError(f"{md.path}: tensor {ours!r} has no {arch} GGUF name")
        stored = md.raw(ours)
        shape = stored.shape
        layer = int(ours.split(".")[1]) if ours.startswith("layers.") else -1
        by_layer.setdefault(layer, []).append(Planned(names[ours], shape, _qtype(stored, shape, quant), ours))
    for layer in md.moe_layers:
        parts = md.layer_layout(layer).view(np.zeros(md.layer_layout(layer).nbytes, np.uint8))
        for proj, gguf_name in _EXPERT_NAMES.items():
            part = parts[proj]
            shape = (md.num_experts(layer), *part.shape)
            by_layer.setdefault(layer, []).append(
                Planned(f"blk.{layer}.{gguf_name}", shape, _qtype(part, shape, quant), (layer, proj)))
    head = by_layer.pop(-1, [])
    first = [p for p in head if p.name == "token_embd.weight"]
    return arch, first + [p for layer in sorted(by_layer) for p in by_layer[layer]] + \
        [p for p in head if p.name != "token_embd.weight"]


def _to_gguf(stored: QuantizedTensor | np.ndarray, qtype: int) -> np.ndarray:
    """Dequantise with flashmoe.quant (float32) and quantise with gguf.quants; uint8 bytes (or float32)."""
    import gguf

    w = stored.dequantize(np.float32) if isinstance(stored, QuantizedTensor) else np.asarray(stored, np.float32)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType(qtype))


def tokenizer_metadata(md: ModelDir) -> dict[str, object]:
    """tokenizer.ggml.* keys from the directory's tokenizer.json (a byte-level BPE: model `gpt2`), with the
    token list padded to vocab_size by `[PADn]` tokens of type unused, as llama.cpp's converter does.
    Raises FlashMoeError when the directory has no tokenizer.json or it is not BPE."""
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
                               "tokenizer.ggml.pre": _QWEN_PRE.get(md.config.model_type, "default"),
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
        f"{arch}.expert_feed_forward_length": cfg.moe_intermediate_size,
    }
    return meta


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
    Raises FlashMoeError for an unsupported architecture or tokenizer, an unwritable `out`, or a disk that
    would keep less than FREE_MARGIN_BYTES free; FormatError for an invalid directory. Nothing is left at
    `out` on failure.
    """
    import gguf

    out = Path(out)
    check_writable(out)
    md = ModelDir.open(model_dir)
    arch, tensors = plan(md, quant)
    meta = {**_model_metadata(md, arch, quant), **tokenizer_metadata(md)}
    total = sum(t.nbytes for t in tensors)
    free = shutil.disk_usage(out.parent).free
    if total + FREE_MARGIN_BYTES > free:
        raise FlashMoeError(f"{out}: {total / 1e9:.1f} GB to write would leave less than "
                            f"{FREE_MARGIN_BYTES / 2**30:.0f} GiB of the {free / 1e9:.1f} GB free on its disk")
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
        if len(t.shape) == 1:
            yield _to_gguf(stored, t.qtype), offset
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
