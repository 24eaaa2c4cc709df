"""`flashmoe convert`: a Hugging Face or MLX checkpoint -> a flashmoe model directory (docs/formats.md).

The source is read through memory maps, one decoder layer at a time, one tensor at a time: non-expert
tensors are quantised (or kept float) and appended to resident.safetensors; a per-expert tensor is quantised
and written at its place in experts/layer_NNN.bin at once; stacked experts ([E, ...], fused HF or MLX
`switch_mlp`) are written expert by expert from their memory map when the layer is complete. Peak memory is
therefore about the largest single source tensor (its float32 working copy while quantising, in chunks of
16M elements), independent of the model's size.
Everything goes through the format's one writer (flashmoe.format.writer), into `.DST.tmp-XXXX` beside DST
renamed at the end; on any error the temporary directory is removed, so DST is either complete or absent (or,
with --force, the model directory it replaces).

Which tensors are quantised is flashmoe.format.policy's (mlx-lm's choices; float tensors keep the source
dtype). MLX-quantised sources are copied as they are: their quantised tensors byte for byte, never
re-quantised, their float tensors float.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from tqdm import tqdm

from flashmoe.format.atomic import check_output_dir
from flashmoe.arch.config import ModelConfig
from flashmoe.errors import CheckpointError, FlashMoeError
from flashmoe.arch.families import (
    FAMILIES,
    HF,
    MLX,
    detect_layout,
    drop_reason,
    is_expert_tensor,
    to_canonical,
)
from flashmoe.arch.tensors import EXPERT_PROJS, resident_shapes
from flashmoe.convert import fp8, tiktoken_vocab
from flashmoe.format.manifest import MANIFEST, RESIDENT, ExpertLayout, ExpertPart, Manifest, QuantSpec
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.policy import KEEP, QUANT_8BIT, QUANT_FLOAT, ROUTER_QUANT, QuantPolicy, quant_class
from flashmoe.format.quant import BITS, GROUP_SIZES, QuantizedTensor, first_non_finite
from flashmoe.format.safetensors_io import SafetensorsFile
from flashmoe.serve.tokenizer import eos_token_ids, read_tokenizer_json
from flashmoe.format.writer import ExpertFileWriter, ModelDirWriter, write_model_dir

#: Files copied from the source when present (tokenizer and generation settings), and the named chat
#: templates in additional_chat_templates/.
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
    "chat_template.jinja", "chat_template.json",
)
_FLOAT_DTYPES = (np.dtype("<f4"), np.dtype("<f2"), np.dtype(ml_dtypes.bfloat16))
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases|blocks|bias)$")
_QUANT_PART = re.compile(r"^(.*)\.(scales|biases)$")


def parse_bits(bits: str | int | None, option: str = "--bits") -> int | None:
    """'4' -> 4, 'none' -> None (keep float). Raises FlashMoeError naming the option for anything else."""
    if bits is None or str(bits).lower() == "none":
        return None
    try:
        b = int(bits)
    except ValueError:
        b = -1
    if b not in BITS:
        raise FlashMoeError(f"{option} {bits!r} is not one of {', '.join(map(str, BITS))} or 'none'")
    return b


def convert_checkpoint(src: str | Path, dst: str | Path, bits: str | int | None = "4", group_size: int = 64,
                       expert_bits: str | int | None = None, force: bool = False,
                       progress: bool | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Convert checkpoint `src` into the flashmoe model directory `dst`; returns dst.

    src: a local Hugging Face checkpoint directory (float32/float16/bfloat16 safetensors, one file or shards
    with model.safetensors.index.json), an mlx-lm quantised checkpoint directory, or a Hub id (downloaded
    with huggingface_hub.snapshot_download). bits: resident linear weights, 2/3/4/6/8 or 'none' (keep every
    weight float, in the source dtype). expert_bits: routed experts (default: bits, except that MXFP4 experts
    as gpt-oss publishes them are kept, byte for byte, unless expert_bits is given). group_size: 32/64/128.
    bits/expert_bits/group_size do not apply to a quantised (MLX) source, which is kept as it is.
    progress: show a tqdm bar (None: only on a terminal). log: where notes go (default: stderr). A weight
    whose input width is not a multiple of its group size stays float (as in mlx-lm); the converter then logs
    one warning naming how many, which, and a --group-size that fits them.

    Raises ConfigError (config.json), CheckpointError (missing/truncated/mis-shaped tensor) or FlashMoeError
    (bad option, DST exists without force, DST that force may not replace: see atomic.check_output_dir, a
    tokenizer.json that tokenizers cannot load, an eos_token_id at or above config.json's vocab_size, a write
    failure such as a full disk); DST is then left untouched and no temporary directory remains.
    """
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    res_bits = parse_bits(bits, "--bits")
    exp_bits = res_bits if expert_bits is None else parse_bits(expert_bits, "--expert-bits")
    if group_size not in GROUP_SIZES:
        raise FlashMoeError(f"--group-size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    dst = Path(dst)
    check_output_dir(dst, force, source=src)
    src_dir = _resolve_source(src)
    cfg = ModelConfig.from_file(src_dir / "config.json")
    config_json = src_dir / "config.json"  # valid JSON: ModelConfig read it
    ckpt = _Checkpoint(src_dir, fp8.block_size(json.loads(config_json.read_text()), str(config_json)))
    job = _Conversion(cfg, ckpt, res_bits, exp_bits, group_size, log, progress, keep_mxfp4=expert_bits is None)
    job.built_tokenizer = tiktoken_vocab.tokenizer_json_for(src_dir, cfg.model_type)  # before any writing
    if (src_dir / "tokenizer.json").is_file():  # copied as is: every later generate would fail on a broken one
        read_tokenizer_json(src_dir / "tokenizer.json")
    eos_token_ids(src_dir)  # config.json and generation_config.json are copied as they are too: loading checks these
    with write_model_dir(dst, cfg.model_type, job.source_record(str(src)), job.policy) as out:
        job.run(out)
    manifest = Manifest.from_json((dst / MANIFEST).read_text())
    experts = sum(f.size for rel, f in manifest.files.items() if rel.startswith("experts/"))
    log(f"wrote {dst}: {manifest.files[RESIDENT].size:,} B resident, {experts:,} B of experts in "
        f"{len(manifest.experts)} layer files")
    if warning := job.unquantised_warning():
        log(warning)
    if not (dst / "tokenizer.json").is_file():
        log(f"note: {src_dir} has no tokenizer.json, so none was copied; `flashmoe generate/chat/serve` need "
            f"a tokenizer.json in {dst} (copy the model's tokenizer.json there)")
    return dst


def _resolve_source(src: str | Path) -> Path:
    """A local directory as is; otherwise a Hub id `org/name` downloaded with huggingface_hub."""
    p = Path(src)
    if (p / MANIFEST).is_file():  # its tensors are flashmoe's, which no checkpoint layout names
        raise CheckpointError(f"{p}: is a flashmoe model directory already ({MANIFEST}); convert reads a Hugging "
                              "Face or MLX checkpoint or a llama.cpp GGUF (use this directory as it is)")
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: not a directory (give the checkpoint directory)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        raise CheckpointError(f"{src}: no such directory, and not a Hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                 "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - any download failure is reported as one line
        raise CheckpointError(f"{src}: cannot download from the Hugging Face Hub: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def source_tensors(src_dir: str | Path) -> dict[str, tuple[str, np.dtype, tuple[int, ...]]]:
    """Every tensor of the checkpoint directory `src_dir` (safetensors: one file, shards, or shards listed in
    model.safetensors.index.json) by name: (file name, dtype, shape), from the headers alone, each file checked
    as convert checks it. Raises CheckpointError naming the file (no safetensors, a damaged or missing shard)."""
    ckpt = _Checkpoint(Path(src_dir))
    return {name: (f.path.name, f.dtype(name), f.shape(name)) for name, f in ckpt.where.items()}


class _Checkpoint:
    """All tensors of a safetensors checkpoint by name, every shard validated before conversion starts.

    FP8 block-scaled weights (flashmoe.convert.fp8) are read as their float32 dequantisation; their
    `<name>_scale_inv` companions are not listed as tensors of their own.
    """

    def __init__(self, root: Path, block: tuple[int, int] = fp8.DEFAULT_BLOCK):
        self.root = root
        self.block = block
        index = root / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
            for name, shard in weight_map.items():
                if shard not in self.files:
                    if not (root / shard).exists():
                        raise CheckpointError(f"{root / shard}: shard listed in {index.name} is missing")
                    self.files[shard] = SafetensorsFile(root / shard)
                if name not in self.files[shard]:
                    raise CheckpointError(f"{root / shard}: missing tensor {name!r} (listed in {index.name})")
                self.where[name] = self.files[shard]
        else:
            shards = sorted(root.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{root}: no *.safetensors files")
            for path in shards:
                f = self.files[path.name] = SafetensorsFile(path)
                for name in f.names():
                    self.where[name] = f

    def names(self) -> list[str]:
        return [n for n in self.where if not (n.endswith(fp8.SCALE_SUFFIX) and n[: -len(fp8.SCALE_SUFFIX)]
                                               in self.where)]

    def get(self, name: str) -> np.ndarray:
        array = self.where[name].get(name)
        if not fp8.is_fp8(array):
            return array
        scale = name + fp8.SCALE_SUFFIX
        if scale not in self.where:
            raise CheckpointError(f"{self.describe(name)}: FP8 weight without its {scale!r} block scales")
        return fp8.dequantize_fp8_blocks(array, self.where[scale].get(scale), self.block, name)

    def describe(self, name: str) -> str:
        return f"{self.where[name].path}: tensor {name!r}"


@dataclass
class _LayerExperts:
    """One MoE layer's routed experts: per-expert tensors go straight to `writer`; stacked ones ([E, ...],
    memory-mapped) wait in `stacked` until the layer is complete."""

    writer: ExpertFileWriter | None = None
    stacked: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # proj -> {weight, scales, biases}
    sources: dict[str, str] = field(default_factory=dict)  # proj -> a source tensor, for messages


class _Conversion:
    """One conversion run: the checkpoint's tensors, layer by layer, into a ModelDirWriter."""

    def __init__(self, cfg: ModelConfig, ckpt: _Checkpoint, res_bits: int | None, exp_bits: int | None,
                 group_size: int, log: Callable[[str], None], progress: bool | None, keep_mxfp4: bool = True):
        self.cfg, self.ckpt = cfg, ckpt
        self.keep_mxfp4 = keep_mxfp4  # MXFP4 experts (gpt-oss) stay as published unless --expert-bits is given
        self.res_bits, self.exp_bits, self.group_size = res_bits, exp_bits, group_size
        self.log, self.progress = log, progress
        self.layout = detect_layout(ckpt.names())
        # A quantised source keeps every tensor as stored (float ones were left float on purpose by mlx-lm).
        self.keep_source = any(n.endswith(".scales") for n in ckpt.names())
        self.policy = KEEP if self.keep_source else QuantPolicy(res_bits, group_size, exp_bits)
        self.expected = resident_shapes(cfg)
        self.written: set[str] = set()
        self.expert_layers: list[int] = []
        self.pending: dict[str, dict[str, tuple[str, np.ndarray]]] = {}  # MLX quantised triples being gathered
        self.out: ModelDirWriter | None = None
        self.built_tokenizer: str | None = None  # tokenizer.json text built for a source without one

    def source_record(self, source: str) -> dict[str, object]:
        """The manifest's `source`: what was converted, its layout and its safetensors files."""
        return {"checkpoint": source, "layout": self.layout,
                "files": sorted(p.name for p in {f.path for f in self.ckpt.files.values()})}

    # -- driver --

    def run(self, out: ModelDirWriter) -> None:
        self.out = out
        groups: dict[int, list[str]] = {}
        dropped: dict[str, int] = {}
        for name in self.ckpt.names():
            reason = drop_reason(name, self.cfg)
            if reason is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            m = _LAYER.search(name)
            groups.setdefault(int(m[1]) if m else -1, []).append(name)
        for reason, n in dropped.items():
            self.log(f"note: skipping {n} tensor(s): {reason}")
        if self.keep_source and (self.res_bits, self.exp_bits, self.group_size) != (4, 4, 64):
            self.log("note: quantised (MLX) source: its quantisation is kept; --bits/--expert-bits/--group-size "
                     "do not apply")
        bad_layers = [i for i in groups if i >= self.cfg.num_hidden_layers]
        if bad_layers:
            name = groups[bad_layers[0]][0]
            raise CheckpointError(f"{self.ckpt.describe(name)}: layer {bad_layers[0]} is beyond "
                                  f"num_hidden_layers ({self.cfg.num_hidden_layers})")
        self._convert_all(groups)
        templates = sorted((self.ckpt.root / "additional_chat_templates").glob("*.jinja"))  # transformers' named ones
        for name in [*COPIED_FILES, *(f"additional_chat_templates/{t.name}" for t in templates)]:
            if (self.ckpt.root / name).is_file():
                out.add_file(name, self.ckpt.root / name)
        if self.built_tokenizer is not None:
            out.add_file("tokenizer.json", self.built_tokenizer)
            self.log(f"note: tokenizer.json built from the tiktoken ranks in {self.ckpt.root} "
                     "(flashmoe/convert/tiktoken_vocab.py)")

    def unquantised_warning(self) -> str | None:
        """A warning naming the weights that --bits/--expert-bits ask to quantise but that stay float because
        their input width is not a multiple of the group size (None when there are none). Routed experts count
        once per projection."""
        if self.keep_source:
            return None
        skipped: dict[str, tuple[int, bool]] = {}  # name -> (input width, quantised at --group-size)
        if self.res_bits is not None:
            for name, shape in self.expected.items():
                cls = quant_class(name, shape)
                if cls != QUANT_FLOAT and self.policy.resident(name, shape) is None:
                    skipped[name] = (shape[-1], cls != QUANT_8BIT)
        if self.exp_bits is not None:
            for proj in EXPERT_PROJS:
                if (width := self._expert_shape(proj)[-1]) % self.group_size:
                    skipped[f"layers.*.mlp.experts.*.{proj}.weight"] = (width, True)
        if not skipped:
            return None
        names = [f"{name} (width {width})" for name, (width, _) in skipped.items()]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        widths = [width for width, own_group in skipped.values() if own_group]
        fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
        routers = len(widths) < len(skipped)
        hint = (f"; --group-size {max(fits)} fits {'all but the routers' if routers else 'all'}"
                if widths and fits else "")
        n = len(skipped)
        return (f"warning: {n} weight{'s stay' if n > 1 else ' stays'} float, not quantised, because the input "
                f"width is not a multiple of the group size (--group-size {self.group_size}"
                f"{f', {ROUTER_QUANT.group_size} for the 8-bit routers' if routers else ''}): {shown}{hint}")

    def _convert_all(self, groups: dict[int, list[str]]) -> None:
        """Every tensor, layer by layer (non-layer tensors first), then the completeness checks."""
        total = sum(len(v) for v in groups.values())
        with tqdm(total=total, unit="tensor", desc="convert", disable=None if self.progress is None
                  else not self.progress, file=sys.stderr) as bar:
            for layer in sorted(groups):
                experts = _LayerExperts()
                for name in sorted(groups[layer]):
                    self._convert_tensor(name, layer, experts)
                    bar.update(1)
                self._flush_pending()
                if experts.sources:
                    self._finish_experts(layer, experts)
                if experts.writer is not None:
                    experts.writer.close()  # hashed now, while the file is likely still in the page cache
                    self.expert_layers.append(layer)
        missing_layers = sorted(set(self.cfg.moe_layers) - set(self.expert_layers))
        if missing_layers:
            raise CheckpointError(f"{self.ckpt.root}: missing routed-expert tensors of layer {missing_layers[0]}")
        missing = sorted(set(self.expected) - self.written)
        if missing:
            raise CheckpointError(f"{self.ckpt.root}: missing tensor for "
                                  f"{missing[0]!r} (canonical name; {len(missing)} missing in all)")

    # -- one source tensor --

    def _convert_tensor(self, name: str, layer: int, experts: _LayerExperts) -> None:
        array = self.ckpt.get(name)
        where = self.ckpt.describe(name)
        is_quant_part = array.dtype == np.uint32 or _QUANT_PART.match(name) is not None
        is_mxfp4_part = array.dtype == np.uint8 and name.endswith(("_blocks", "_scales"))  # gpt-oss experts
        if not (is_quant_part or is_mxfp4_part) and array.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where}: dtype {array.dtype} is not float32, float16 or bfloat16")
        if array.dtype in _FLOAT_DTYPES:
            check_finite(array, where)
        if self.layout == HF and is_quant_part:
            raise CheckpointError(f"{where}: quantised tensor in a float checkpoint (only MLX quantisation is read)")
        for cname, a in to_canonical(name, array, self.cfg, self.layout):
            if is_expert_tensor(cname):
                if layer < 0 or not self.cfg.is_moe_layer(layer):
                    raise CheckpointError(f"{self.ckpt.describe(name)}: routed experts in layer {layer}, which "
                                          "config.json makes a dense layer")
                self._add_expert(cname, a, name, layer, experts)
            elif self.layout == MLX and (kind := _mlx_quant_part(cname, a)):
                base = cname.rsplit(".", 1)[0]
                self.pending.setdefault(base, {})[kind] = (name, a)
                if len(self.pending[base]) == 3:
                    self._write_mlx_quantized(base, self.pending.pop(base))
            else:
                self._write_resident(cname, a, name)

    def _check_shape(self, cname: str, shape: tuple[int, ...], source: str) -> None:
        if cname == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return
        if cname in self.written:
            raise CheckpointError(f"{self.ckpt.describe(source)}: a second tensor maps to {cname!r}")
        expected = self.expected.get(cname)
        if expected is None:
            raise CheckpointError(f"{self.ckpt.describe(source)}: unexpected tensor (canonical {cname!r} is not "
                                  f"part of a {self.cfg.model_type} model with this config)")
        if tuple(shape) != expected:
            raise CheckpointError(f"{self.ckpt.describe(source)}: shape {list(shape)}, expected {list(expected)} "
                                  f"from config.json")

    def _write_resident(self, cname: str, a: np.ndarray, source: str) -> None:
        self._check_shape(cname, a.shape, source)
        if cname == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return  # tied: the embedding is the head
        self.out.add_resident(cname, a)
        self.written.add(cname)

    def _write_mlx_quantized(self, base: str, parts: dict[str, tuple[str, np.ndarray]]) -> None:
        """Copy an MLX quantised triple as it is, after checking it against the config's logical shape."""
        cname = base + ".weight"
        source = parts["weight"][0]
        w, s, b = (parts[k][1] for k in ("weight", "scales", "biases"))
        spec = self._mlx_spec(cname, w, s, b, source)
        self._check_shape(cname, s.shape[:-1] + (s.shape[-1] * spec.group_size,), source)
        if cname == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return
        self.out.add_resident(cname, QuantizedTensor(w, s, b, spec.bits, spec.group_size))
        self.written.add(cname)

    def _mlx_spec(self, cname: str, w: np.ndarray, s: np.ndarray, b: np.ndarray, source: str) -> QuantSpec:
        """bits and group_size of an MLX quantised tensor, inferred like mlx-lm's infer_quant_config from the
        logical input width the config gives."""
        where = self.ckpt.describe(source)
        if w.dtype != np.uint32:
            raise CheckpointError(f"{where}: quantised weight dtype {w.dtype}, expected uint32")
        if s.dtype not in _FLOAT_DTYPES or b.dtype != s.dtype or s.shape != b.shape:
            raise CheckpointError(f"{where}: scales/biases {s.dtype} {list(s.shape)} / {b.dtype} {list(b.shape)} "
                                  "are not one float dtype and shape (only MLX 'affine' quantisation is read)")
        logical = self.expected.get(cname)
        if logical is None and (m := _STACKED.match(cname)):
            h, i = self.cfg.hidden_size, self.cfg.moe_intermediate_size
            logical = (i, h) if m[2] != "down_proj" else (h, i)
        if logical is None:
            raise CheckpointError(f"{where}: unexpected tensor (canonical {cname!r})")
        in_dim = logical[-1]
        gs, rem = divmod(in_dim, s.shape[-1])
        bits = w.shape[-1] * 32 // in_dim
        if rem or gs not in GROUP_SIZES or bits not in BITS or w.shape[-1] * 32 != bits * in_dim \
                or w.shape[:-1] != s.shape[:-1]:
            raise CheckpointError(f"{where}: weight {list(w.shape)} and scales {list(s.shape)} do not fit an "
                                  f"input width of {in_dim} at any supported bits/group_size")
        return QuantSpec(bits, gs)

    def _flush_pending(self) -> None:
        if self.pending:
            base, parts = next(iter(self.pending.items()))
            missing = sorted({"weight", "scales", "biases"} - set(parts))
            source = next(iter(parts.values()))[0]
            raise CheckpointError(f"{self.ckpt.describe(source)}: quantised tensor {base!r} lacks its "
                                  f"'{missing[0]}' (canonical name)")

    # -- experts --

    def _add_expert(self, cname: str, a: np.ndarray, source: str, layer: int, experts: _LayerExperts) -> None:
        n_exp = self.cfg.num_experts
        where = self.ckpt.describe(source)
        if m := _PER_EXPERT.match(cname):
            e, proj = int(m[2]), m[3]
            if e >= n_exp:
                keys = " or ".join(FAMILIES[self.cfg.family].num_experts_keys)
                raise CheckpointError(f"{where}: expert {e}, but config.json declares {n_exp} experts ({keys})")
            if tuple(a.shape) != self._expert_shape(proj):
                raise CheckpointError(f"{where}: shape {list(a.shape)}, expected {list(self._expert_shape(proj))} "
                                      "from config.json")
            if experts.writer is None:
                # Every expert is stored like one of zeros of this dtype; the writer rejects any that differ.
                template = {p: self.out.expert_part(np.zeros(self._expert_shape(p), a.dtype)) for p in EXPERT_PROJS}
                experts.writer = self._open_expert_file(layer, ExpertLayout.plan(template))
            experts.writer.write(e, proj, self.out.expert_part(a), where)
        elif m := _STACKED.match(cname):
            proj, kind = m[2], m[3]
            if a.shape[0] != n_exp:
                raise CheckpointError(f"{where}: {a.shape[0]} stacked experts, config.json num_experts is {n_exp}")
            experts.stacked.setdefault(proj, {})[kind] = a
        else:
            raise CheckpointError(f"{where}: unrecognised expert tensor {cname!r}")
        experts.sources.setdefault(proj, source)

    def _expert_shape(self, proj: str) -> tuple[int, int]:
        h, inter = self.cfg.hidden_size, self.cfg.moe_intermediate_size
        return (h, inter) if proj == "down_proj" else (inter, h)

    def _open_expert_file(self, layer: int, layout: ExpertLayout) -> ExpertFileWriter:
        return self.out.open_experts(layer, layout, self.cfg.num_experts)

    def _stacked_getters(self, layer: int, experts: _LayerExperts) -> dict[str, Callable[[int], object]]:
        """key -> function giving expert e's stored form, from the stacked tensors of the layer: each
        projection (`gate_proj`, ...) and, where the checkpoint has expert biases, `{proj}.bias`."""
        getters: dict[str, Callable[[int], object]] = {}
        for proj, parts in experts.stacked.items():
            where = self.ckpt.describe(experts.sources[proj])
            logical = self._expert_shape(proj)
            kinds = set(parts) - {"bias"}
            if "bias" in parts:
                getters[f"{proj}.bias"] = self._bias_getter(parts["bias"], logical[0], where)
            if kinds == {"weight"}:
                w = parts["weight"]
                if w.dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{where}: dtype {w.dtype} is not float32, float16 or bfloat16")
                if tuple(w.shape[1:]) != logical:
                    raise CheckpointError(f"{where}: expert shape {list(w.shape[1:])}, expected {list(logical)} "
                                          "from config.json")
                getters[proj] = lambda e, w=w: self.out.expert_part(w[e])
            elif kinds == {"blocks", "scales"}:
                getters[proj] = self._mxfp4_getter(parts["blocks"], parts["scales"], logical, where)
            elif kinds == {"weight", "scales", "biases"}:
                cname = f"layers.{layer}.mlp.experts.{proj}.weight"
                spec = self._mlx_spec(cname, parts["weight"], parts["scales"], parts["biases"],
                                      experts.sources[proj])
                if parts["scales"].shape[1:] != (logical[0], logical[1] // spec.group_size):
                    raise CheckpointError(f"{where}: scales {list(parts['scales'].shape)} do not fit {list(logical)}")
                getters[proj] = lambda e, p=parts, q=spec: QuantizedTensor(
                    p["weight"][e], p["scales"][e], p["biases"][e], q.bits, q.group_size)
            else:
                missing = sorted({"weight", "scales", "biases"} - kinds)
                raise CheckpointError(f"{where}: stacked expert tensor lacks its '{missing[0]}' part")
        return getters

    def _mxfp4_getter(self, blocks: np.ndarray, scales: np.ndarray, logical: tuple[int, int],
                      where: str) -> Callable[[int], ExpertPart]:
        """Expert e of MXFP4 checkpoint tensors: kept as published (the bytes unchanged), or, when
        --expert-bits was given, decoded and stored as that asks (affine bits or float)."""
        if Mxfp4Tensor.from_checkpoint(blocks[0], scales[0], where).shape != logical:
            raise CheckpointError(f"{where}: MXFP4 expert is {[scales.shape[1], scales.shape[2] * 32]}, "
                                  f"expected {list(logical)} from config.json")

        def get(e: int) -> ExpertPart:
            part = Mxfp4Tensor.from_checkpoint(blocks[e], scales[e], where)
            return part if self.keep_mxfp4 else self.out.expert_part(part.dequantize())
        return get

    def _bias_getter(self, bias: np.ndarray, out: int, where: str) -> Callable[[int], np.ndarray]:
        if bias.dtype not in _FLOAT_DTYPES or tuple(bias.shape) != (self.cfg.num_experts, out):
            raise CheckpointError(f"{where}: expert bias is {bias.dtype} {list(bias.shape)}, expected a float "
                                  f"{[self.cfg.num_experts, out]}")
        return lambda e: np.ascontiguousarray(bias[e])

    def _finish_experts(self, layer: int, experts: _LayerExperts) -> None:
        """Write the stacked experts of the layer, then check that every expert's three projections (and their
        biases, for a family with expert biases) are there."""
        if experts.stacked:
            getters = self._stacked_getters(layer, experts)
            keys = [*EXPERT_PROJS, *(f"{p}.bias" for p in EXPERT_PROJS if self.cfg.has_expert_biases)]
            if experts.writer is None:
                # Projections given per expert in the same layer would already have opened the writer.
                missing = sorted(set(keys) - set(getters))
                if missing:
                    raise CheckpointError(f"{self.ckpt.root}: missing tensor for layers.{layer}.mlp.experts."
                                          f"{missing[0]} (canonical name, stacked)")
                experts.writer = self._open_expert_file(layer, ExpertLayout.plan({k: getters[k](0) for k in keys}))
            for key, get in getters.items():
                for e in range(self.cfg.num_experts):
                    experts.writer.write(e, key, get(e), self.ckpt.describe(experts.sources[key.split(".")[0]]))
        if (missing := experts.writer.first_missing()) is not None:
            raise CheckpointError(f"{self.ckpt.root}: missing tensor for "
                                  f"layers.{layer}.mlp.experts.{missing[0]}.{missing[1]} (canonical name)")


def check_finite(array: np.ndarray, where: str) -> None:
    """Raise CheckpointError naming `where` (file and tensor) and the first NaN/infinity's index: such a weight
    cannot be quantised (its group's scale would be NaN) and, kept in float, makes every logit NaN."""
    index = first_non_finite(array)
    if index is not None:
        value = np.asarray(array[index]).astype(np.float32)
        raise CheckpointError(f"{where}: {value} at index {list(index)} (the weights must be finite; the "
                              "checkpoint is damaged or was saved after training diverged)")


def _mlx_quant_part(cname: str, a: np.ndarray) -> str | None:
    """'weight'/'scales'/'biases' when canonical tensor `cname` is part of an MLX quantised triple, else None."""
    if m := _QUANT_PART.match(cname):
        return m[2]
    return "weight" if cname.endswith(".weight") and a.dtype == np.uint32 else None

