"""`flashmoe convert MODEL.gguf DST`: a llama.cpp GGUF (one file, or the first of its splits) -> a flashmoe
model directory (docs/formats.md), through the format's one writer (flashmoe.format.writer).

- Architecture: `general.architecture` names the Family whose `gguf_arch` it is (flashmoe/arch/families.py);
  the metadata keys `{arch}.embedding_length`, `.block_count`, ... become config.json (CONFIG_KEYS), under the
  names transformers gives them in that family, so that its AutoConfig reads the file.
- Tensors: llama.cpp's names map back to canonical ones (flashmoe/arch/gguf_names.py). Float tensors (F32, F16,
  BF16) are kept as they are; the affine block types become group-wise affine tensors exactly, with float32
  scales and biases (flashmoe/convert/gguf_quants.py): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K in groups of
  32, Q2_K, Q3_K and Q6_K in groups of 16. Codebook types (IQ*) and others are refused by name: their values
  are not affine, and requantising them silently would change the model without the user choosing it
  (convert the original checkpoint, or a Q*_K GGUF, instead).
- Fused tensors are split by whole rows: attention's `attn_qkv` of llama.cpp's `--fuse-qkv` conversions, and
  the others flashmoe/convert/gguf_layouts.py lists.
- Stacked experts `blk.N.ffn_{gate,up,down}_exps.weight` [E, out, in] (or gate and up fused as
  `ffn_gate_up_exps` [E, 2I, H]) are written expert by expert from the memory map, so peak memory is about one
  expert.
- The tokenizer (`tokenizer.ggml.*`: byte-level BPE or SentencePiece) becomes tokenizer.json
  (flashmoe/convert/gguf_tokenizer.py) and
  `tokenizer.chat_template` goes into tokenizer_config.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import FAMILIES, MODEL_TYPES, Family
from flashmoe.arch.gguf_names import EXPERT_BIAS_NAMES, EXPERT_NAMES, FUSED_BEFORE, NORM_TOPK, gguf_tensor_name
from flashmoe.arch.tensors import EXPERT_PROJS, LM_HEAD, resident_shapes
from flashmoe.convert.checkpoint import check_finite
from flashmoe.convert.gguf import GGUFModel, GGUFTensor
from flashmoe.convert.gguf_layouts import gguf_layout, source_name
from flashmoe.convert.gguf_quants import AFFINE, FLOATS, MXFP4_TYPE, affine_tensor, float_tensor, mxfp4_tensor
from flashmoe.convert.gguf_tokenizer import tokenizer_files
from flashmoe.errors import CheckpointError
from flashmoe.format.atomic import check_output_dir
from flashmoe.format.manifest import ExpertLayout, ExpertPart
from flashmoe.format.policy import KEEP
from flashmoe.format.writer import ModelDirWriter, write_model_dir

#: config.json key <- GGUF metadata key after `{arch}.` (llama.cpp's LLM_KV names, gguf-py's Keys.LLM).
CONFIG_KEYS = {
    "hidden_size": "embedding_length", "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base", "max_position_embeddings": "context_length",
    "num_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length", "intermediate_size": "feed_forward_length",
    "sliding_window": "attention.sliding_window",
}
#: rope_scaling key <- GGUF metadata key after `{arch}.rope.scaling.`, when `{arch}.rope.scaling.type` is yarn
#: (llama.cpp's TextModel.set_gguf_parameters writes them from the checkpoint's rope_scaling).
YARN_KEYS = {"factor": "factor", "original_max_position_embeddings": "original_context_length",
             "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow"}
#: The stacked experts' gate and up projections fused in one tensor (llama.cpp's `--fuse_gate_up_exps` conversions,
#: which src/llama-model.cpp's create_tensor_gate_up_exps reads first), weights [E, 2I, H] and (gpt-oss) biases
#: [E, 2I]: each projection's half of its rows, gate's first. Formatted with the layer and "weight" or "bias".
FUSED_GATE_UP = "blk.{}.ffn_gate_up_exps.{}"
FUSED_GATE_UP_HALF = {"gate_proj": 0, "up_proj": 1}
#: The sigmoid-routed families' keys (llama.cpp's LLM_KV_EXPERT_* and LEADING_DENSE_BLOCK_COUNT), with the values
#: llama.cpp assumes when a file lacks them (no groups, no scaling, no dense or shared blocks).
ROUTING_KEYS = {"first_k_dense_replace": ("leading_dense_block_count", 0), "n_shared_experts": ("expert_shared_count", 0),
                "routed_scaling_factor": ("expert_weights_scale", 1.0), "n_group": ("expert_group_count", 1),
                "topk_group": ("expert_group_used_count", 1)}
#: `{arch}.expert_gating_func` of sigmoid scores (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID), the one
#: the sigmoid-routed families take (1, softmax, is DeepSeek-V2's).
SIGMOID_GATING = 2
#: The same for GatedDeltaNet models (llama.cpp's qwen35moe/qwen3next hparams); linear_value_head_dim and
#: partial_rotary_factor are derived (config_dict).
LINEAR_ATTENTION_KEYS = {
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
    "full_attention_interval": "full_attention_interval", "linear_conv_kernel_dim": "ssm.conv_kernel",
    "linear_key_head_dim": "ssm.state_size", "linear_num_key_heads": "ssm.group_count",
    "linear_num_value_heads": "ssm.time_step_rank",
}


def family_of_gguf(model: GGUFModel) -> Family:
    """The Family whose gguf_arch is the file's architecture. Raises CheckpointError naming the supported ones."""
    arch = model.architecture
    for fam in FAMILIES.values():
        if fam.gguf_arch == arch and arch in NORM_TOPK:
            return fam
    known = sorted(f.gguf_arch for f in FAMILIES.values() if f.gguf_arch in NORM_TOPK)
    raise CheckpointError(f"{model.path}: GGUF architecture {arch!r} is not supported (supported: "
                          f"{', '.join(known)})")


def config_dict(model: GGUFModel, fam: Family) -> dict[str, Any]:
    """config.json from the GGUF metadata (module docstring). Raises CheckpointError when token_embd.weight is
    missing (its rows are the vocabulary size)."""
    arch, meta = fam.gguf_arch, model.metadata
    # a text model's config, flat: the text model_type where the family's checkpoints are multimodal (Qwen3.5:
    # transformers' qwen3_5_moe is the wrapper, whose text keys nest in text_config)
    text = f"{fam.name}_text" if MODEL_TYPES.get(f"{fam.name}_text") == fam.name else fam.name
    cfg: dict[str, Any] = {"model_type": text, "architectures": [f"GGUF:{arch}"]}
    keys = {**CONFIG_KEYS, **LINEAR_ATTENTION_KEYS}
    # the expert count under the family's transformers name (DeepseekV3Config, Glm4MoeConfig: n_routed_experts)
    named = {"num_experts": fam.num_experts_keys[0]}
    cfg.update({named.get(key, key): meta[f"{arch}.{g}"] for key, g in keys.items() if f"{arch}.{g}" in meta})
    if f"{arch}.ssm.inner_size" in meta:
        cfg["linear_value_head_dim"] = meta[f"{arch}.ssm.inner_size"] // meta[f"{arch}.ssm.time_step_rank"]
    if f"{arch}.rope.dimension_count" in meta and "head_dim" in cfg:
        cfg["partial_rotary_factor"] = meta[f"{arch}.rope.dimension_count"] / cfg["head_dim"]
    if "token_embd.weight" not in model.tensors:
        raise CheckpointError(f"{model.path}: no token_embd.weight")
    cfg["vocab_size"] = model.tensors["token_embd.weight"].shape[0]
    cfg["tie_word_embeddings"] = "output.weight" not in model.tensors
    cfg["attention_bias"] = source_name(model.tensors, "blk.0.attn_q.bias") in model.tensors  # or --fuse-qkv's
    if fam.qk_norm_switch:  # GLM's use_qk_norm: the file has the norms or not
        cfg[fam.qk_norm_switch] = "blk.0.attn_q_norm.weight" in model.tensors
    # llama.cpp's converter counts the multi-token-prediction layers in block_count (GLM-4.5); flashmoe drops them
    cfg["num_hidden_layers"] = cfg.get("num_hidden_layers", 0) - meta.get(f"{arch}.nextn_predict_layers", 0)
    cfg["norm_topk_prob"] = bool(meta.get(f"{arch}.expert_weights_norm", NORM_TOPK[arch]))
    if meta.get(f"{arch}.rope.scaling.type") == "yarn":
        cfg["rope_scaling"] = _yarn(meta, arch, fam)
    if fam.group_routing_keys:
        cfg.update({key: meta.get(f"{arch}.{g}", default) for key, (g, default) in ROUTING_KEYS.items()})
        if (gating := meta.get(f"{arch}.expert_gating_func", SIGMOID_GATING)) != SIGMOID_GATING:
            raise CheckpointError(f"{model.path}: {arch}.expert_gating_func is {gating}, not sigmoid scores "
                                  f"({SIGMOID_GATING}), which flashmoe's {fam.name} routing takes")
    if fam.mla:
        cfg.update(_mla_config(model, arch))
        for key in ("head_dim", "partial_rotary_factor"):  # llama.cpp's are the latent's; MLA has its own
            cfg.pop(key, None)
        # llama.cpp's head_count_kv is 1 (MLA as MQA over the latent); transformers' MLA has a key and a value
        # per head, as the checkpoint's config says
        if "num_attention_heads" in cfg:
            cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[key] = meta[f"tokenizer.ggml.{key}"]
    return cfg


def _yarn(meta: dict[str, Any], arch: str, fam: Family) -> dict[str, Any]:
    """rope_scaling for a YaRN file, over the family's defaults (gpt-oss: truncate false). DeepSeek's converter
    writes yarn_log_multiplier = 0.1 · mscale_all_dim (conversion/deepseek.py) and llama.cpp applies it to both
    the attention scale and the rotary factor, which is mscale = mscale_all_dim (divided in float32, where
    it was multiplied, so 1.0 comes back as 1.0)."""
    rope = {**fam.defaults.get("rope_scaling", {}), "rope_type": "yarn", **{
        key: meta[f"{arch}.rope.scaling.{g}"] for key, g in YARN_KEYS.items() if f"{arch}.rope.scaling.{g}" in meta}}
    if (log_mul := meta.get(f"{arch}.rope.scaling.yarn_log_multiplier")) is not None:
        rope["mscale"] = rope["mscale_all_dim"] = float(np.float32(log_mul) / np.float32(0.1))
    return rope


def _mla_config(model: GGUFModel, arch: str) -> dict[str, Any]:
    """MLA's widths from llama.cpp's keys (conversion/deepseek.py: key_length_mla = qk_nope + qk_rope,
    value_length_mla = v_head_dim, rope.dimension_count = qk_rope; older files have the first two as key_length
    and value_length); no q_lora_rank: q_proj straight from the hidden state. Raises CheckpointError naming a
    missing key."""
    meta = model.metadata

    def need(key: str) -> int:
        if f"{arch}.{key}" not in meta:
            raise CheckpointError(f"{model.path}: metadata key {arch}.{key} is missing (an MLA model needs it)")
        return meta[f"{arch}.{key}"]

    rope = need("rope.dimension_count")
    qk = meta.get(f"{arch}.attention.key_length_mla") or need("attention.key_length")
    return {"q_lora_rank": meta.get(f"{arch}.attention.q_lora_rank"), "kv_lora_rank": need("attention.kv_lora_rank"),
            "qk_rope_head_dim": rope, "qk_nope_head_dim": qk - rope,
            "v_head_dim": meta.get(f"{arch}.attention.value_length_mla") or need("attention.value_length")}


def _fused_hint(model: GGUFModel, gname: str | None) -> str:
    """For a missing `blk.N.X` that older llama.cpp conversions wrote fused (FUSED_BEFORE), a hint to convert the
    checkpoint again; else ''."""
    parts = (gname or "").split(".", 2)  # blk, N, X
    fused = f"blk.{parts[1]}.{FUSED_BEFORE[parts[2]]}" if len(parts) == 3 and parts[2] in FUSED_BEFORE else None
    if fused not in model.tensors:
        return ""
    return (f"; the file has {fused}, which llama.cpp's converter no longer writes: convert the checkpoint again "
            "with a current llama.cpp (flashmoe imports the split tensors exactly)")


def convert_gguf(src: str | Path, dst: str | Path, force: bool = False, progress: bool | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """Convert the GGUF `src` into the flashmoe model directory `dst` (module docstring); returns dst.

    progress: a tqdm bar (None: only on a terminal). log: where notes go.
    Raises CheckpointError (bad or unsupported GGUF, a tensor missing or of the wrong shape or type),
    ConfigError (metadata that make no valid config) or FlashMoeError (dst exists without force, a write
    failure); dst is then left as it was and nothing is left behind.
    """
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    dst = Path(dst)
    check_output_dir(dst, force, source=src)
    with GGUFModel(src) as model:
        fam = family_of_gguf(model)
        cfg_json = config_dict(model, fam)
        cfg = ModelConfig.from_dict(cfg_json, source=f"{src} (metadata)")
        job = _Import(model, cfg, fam.gguf_arch, progress)
        source = {"gguf": str(src), "files": [f.path.name for f in model.files]}
        with write_model_dir(dst, cfg.model_type, source, KEEP) as out:
            job.run(out)
            out.add_file("config.json", json.dumps(cfg_json, indent=2) + "\n")
            for name, text in tokenizer_files(model, log).items():
                out.add_file(name, text)
    log(f"wrote {dst} from {src} ({len(job.done)} tensors)")
    return dst


def imported_expert_layouts(model: GGUFModel) -> dict[int, ExpertLayout]:
    """The expert layout of each MoE layer of the directory `convert_gguf` would write from the open GGUF
    `model`, planned from one expert's tensors (nothing is written): what flashmoe reads per expert.
    Raises as convert_gguf does for a GGUF it would refuse."""
    cfg = gguf_config(model)
    job = _Import(model, cfg, family_of_gguf(model).gguf_arch, progress=False)
    return {layer: job.expert_sources(layer)[3] for layer in cfg.moe_layers}


def gguf_config(model: GGUFModel) -> ModelConfig:
    """The ModelConfig of the open GGUF `model`'s metadata. Raises CheckpointError for an architecture the
    import does not know, ConfigError naming the field for metadata that make no valid config."""
    return ModelConfig.from_dict(config_dict(model, family_of_gguf(model)), source=f"{model.path} (metadata)")


def import_kind(type_name: str) -> str:
    """How the import stores a tensor of GGML type `type_name`: 'float', 'exact (N-bit, group G, ...)' or
    'refused (...)'."""
    if type_name in FLOATS:
        return "float"
    if type_name == MXFP4_TYPE:
        return "exact (MXFP4 routed experts, as published)"
    if type_name not in AFFINE:
        return "refused (not affine)"
    bits, group = AFFINE[type_name][:2]
    return f"exact ({bits}-bit, group {group}, float32 scales/biases)"


class _Import:
    """One import run: the GGUF's tensors, resident then expert layer by expert layer, into a ModelDirWriter."""

    def __init__(self, model: GGUFModel, cfg: ModelConfig, arch: str, progress: bool | None):
        self.model, self.cfg, self.arch, self.progress = model, cfg, arch, progress
        self.done: set[str] = set()

    def run(self, out: ModelDirWriter) -> None:
        shapes = {n: s for n, s in resident_shapes(self.cfg).items()
                  if not (n == LM_HEAD and self.cfg.tie_word_embeddings)}
        with tqdm(total=len(shapes) + len(self.cfg.moe_layers), unit="tensor", desc="convert",
                  disable=None if self.progress is None else not self.progress, file=sys.stderr) as bar:
            for name, shape in shapes.items():
                t = self._tensor(source_name(self.model.tensors, gguf_tensor_name(name, self.arch)), None, name)
                stored = self._stored(t, self.model.raw(t.name))
                if (undo := gguf_layout(self.cfg, self.arch, name, t.name)) is not None:
                    stored = undo(stored, f"{t.path}: tensor {t.name!r}")
                if tuple(stored.shape) != tuple(shape):
                    raise CheckpointError(f"{t.path}: tensor {t.name!r} has shape {list(t.shape)}, the metadata "
                                          f"make {name} {list(shape)}")
                out.add_resident(name, stored)
                bar.update(1)
            for layer in self.cfg.moe_layers:
                self._experts(out, layer)
                bar.update(1)

    def _tensor(self, gname: str | None, shape: tuple[int, ...] | None, canonical: str) -> GGUFTensor:
        """GGUF tensor `gname` of `shape` (None: checked by the caller) for canonical tensor `canonical`."""
        if gname is None or gname not in self.model.tensors:
            raise CheckpointError(f"{self.model.path}: missing tensor {gname or '?'} (flashmoe's {canonical})"
                                  f"{_fused_hint(self.model, gname)}")
        t = self.model.tensors[gname]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{t.path}: tensor {gname!r} has shape {list(t.shape)}, the metadata make it "
                                  f"{list(shape)}")
        self.done.add(gname)
        return t

    def _experts(self, out: ModelDirWriter, layer: int) -> None:
        """The layer's stacked experts (and their biases, where the family has them) expert by expert."""
        tensors, raws, first, layout = self.expert_sources(layer)
        writer = out.open_experts(layer, layout, self.cfg.num_experts)
        for e in range(self.cfg.num_experts):
            for key, t in tensors.items():
                part = first[key] if e == 0 else self._stored(t, raws[key][e], expert=True)
                writer.write(e, key, part, f"{t.path}: tensor {t.name!r}")
        writer.close()

    def expert_sources(self, layer: int) -> tuple[dict, dict, dict, ExpertLayout]:
        """MoE layer `layer`'s GGUF tensors and raw stacked arrays by expert key (`gate_proj`, ...,
        `gate_proj.bias`), expert 0's stored parts and the layout they give every expert of the layer."""
        h, inter, n = self.cfg.hidden_size, self.cfg.moe_intermediate_size, self.cfg.num_experts
        names = {**EXPERT_NAMES, **(EXPERT_BIAS_NAMES if self.cfg.has_expert_biases else {})}
        tensors, raws = {}, {}
        for key, gname in names.items():
            shape = (n, h, inter) if key.startswith("down_proj") else (n, inter, h)
            gname, half = f"blk.{layer}.{gname}", None
            proj, _, part = key.partition(".")
            fused = FUSED_GATE_UP.format(layer, part or "weight")
            if gname not in self.model.tensors and proj in FUSED_GATE_UP_HALF and fused in self.model.tensors:
                gname, half, shape = fused, FUSED_GATE_UP_HALF[proj], (n, 2 * inter, h)
            tensors[key] = self._tensor(gname, shape[:2] if key.endswith(".bias") else shape,
                                        f"layers.{layer}.mlp.experts.{key}")
            raw = self.model.raw(gname)
            width = raw.shape[1] // 2  # a fused tensor's gate half, then its up half: rows of weights, bytes of biases
            raws[key] = raw if half is None else raw[:, half * width:(half + 1) * width]
        first = {key: self._stored(tensors[key], raws[key][0], expert=True) for key in names}
        return tensors, raws, first, ExpertLayout.plan(first)

    def _stored(self, t: GGUFTensor, raw: np.ndarray, expert: bool = False) -> ExpertPart:
        """The stored form of `raw` (all of tensor t, or one routed expert of it): module docstring."""
        kind, where = t.type.name, f"{t.path}: tensor {t.name!r}"
        if kind in FLOATS:
            values = float_tensor(raw, kind)
            check_finite(values, where)
            return values
        if kind == MXFP4_TYPE:
            if not expert:
                raise CheckpointError(f"{where}: GGML type MXFP4 outside the routed experts; flashmoe stores "
                                      "MXFP4 for routed experts only")
            return mxfp4_tensor(raw)
        if kind not in AFFINE:
            raise CheckpointError(f"{where}: GGML type {kind} is not affine per block (codebook or other "
                                  f"format); flashmoe imports only {', '.join(AFFINE)}, F32, F16 and BF16 "
                                  "exactly: convert the original checkpoint or a Q*_K GGUF instead")
        return affine_tensor(raw, kind, where)
