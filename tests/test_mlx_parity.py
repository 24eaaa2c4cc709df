"""flashmoe against mlx-lm, an independent implementation of the same quantised format.

Tiny MLX 4-bit checkpoints are built with mlx-lm's own model classes, `sanitize` and `quantize_model` (not
`mlx_lm.convert`, which rejects transformers-5 configs: `rope_parameters`, per-expert qwen3_5_moe tensors).
Then: (1) `flashmoe convert` of the same HF weights at 4 bits writes the very expert bytes mlx-lm's
quantiser produced; (2) converting the MLX checkpoint repacks it byte for byte; (3) the reference's logits on
the converted MLX checkpoint match mlx-lm's logits on it within 1e-3 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from checkpoints import prompt_tokens
from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.format.modeldir import ModelDir

mx = pytest.importorskip("mlx.core", reason="mlx[cpu] and mlx-lm are the oracle here")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils", reason="mlx-lm builds the MLX checkpoints")

GROUP_SIZE = 32  # so the tiny down_proj (input moe_intermediate_size 32) is quantised too
CASES = [("qwen3_moe", "no_norm_topk_k2"), ("qwen3_5_moe", "shared_k2")]
TOL = 1e-3


def _mlx_config(hf_config: dict) -> dict:
    """The HF (transformers 5) config as mlx-lm's ModelArgs read it."""
    cfg = dict(hf_config)
    rope = dict(cfg.get("rope_parameters") or {})
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if "num_local_experts" in cfg:  # transformers 5 writes qwen3_moe's num_experts under this name
        cfg.setdefault("num_experts", cfg["num_local_experts"])
    if cfg["model_type"] == "qwen3_5_moe_text":
        cfg["model_type"] = "qwen3_5_moe"
        full = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
        interval = full[0] + 1
        assert full == list(range(interval - 1, cfg["num_hidden_layers"], interval)), "mlx-lm needs a fixed interval"
        cfg["full_attention_interval"] = interval
    return cfg


def _fuse_experts(weights: dict, num_experts: int) -> dict:
    """Per-expert `mlp.experts.{e}.{proj}.weight` -> fused `experts.gate_up_proj` [E, 2I, H] and
    `experts.down_proj` [E, H, I], the form mlx-lm's qwen3_5_moe sanitize expects."""
    out = {k: v for k, v in weights.items() if ".mlp.experts." not in k}
    prefixes = sorted({k.split(".experts.")[0] for k in weights if ".mlp.experts." in k})
    for p in prefixes:
        stack = {proj: mx.stack([weights[f"{p}.experts.{e}.{proj}.weight"] for e in range(num_experts)])
                 for proj in ("gate_proj", "up_proj", "down_proj")}
        out[f"{p}.experts.gate_up_proj"] = mx.concatenate([stack["gate_proj"], stack["up_proj"]], axis=1)
        out[f"{p}.experts.down_proj"] = stack["down_proj"]
    return out


def build_mlx_checkpoint(hf_dir: Path, out: Path, bits: int = 4, group_size: int = GROUP_SIZE) -> Path:
    """An mlx-lm quantised checkpoint of the HF checkpoint `hf_dir`, written to `out` as mlx-lm saves one."""
    cfg = _mlx_config(json.loads((hf_dir / "config.json").read_text()))
    model_cls, args_cls = mlx_lm_utils._get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    weights = mx.load(str(hf_dir / "model.safetensors"))
    if cfg["model_type"] == "qwen3_5_moe":
        weights = _fuse_experts(weights, cfg["num_experts"])  # mlx-lm's sanitize reads only the fused form
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    model, qcfg = mlx_lm_utils.quantize_model(model, cfg, group_size=group_size, bits=bits)
    mlx_lm_utils.save_model(out, model)
    mlx_lm_utils.save_config(qcfg, out / "config.json")
    return out


def mlx_logits(mlx_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """mlx-lm's float32 logits (T, vocab) for the checkpoint at mlx_dir, loaded by mlx-lm itself."""
    model, _ = mlx_lm_utils.load_model(mlx_dir)
    out = model(mx.array(tokens[None].astype(np.int32)))
    return np.array(out[0].astype(mx.float32))


@pytest.fixture(scope="module")
def mlx_checkpoint(hf_checkpoint, tmp_path_factory):
    built = {}

    def get(arch: str, variant: str) -> Path:
        if (arch, variant) not in built:
            out = tmp_path_factory.mktemp("mlx") / f"{arch}-{variant}"
            built[(arch, variant)] = build_mlx_checkpoint(hf_checkpoint(arch, variant), out)
        return built[(arch, variant)]

    return get


@pytest.mark.parametrize("arch,variant", CASES, ids=[a for a, _ in CASES])
def test_flashmoe_quantiser_writes_mlx_lm_expert_bytes(hf_checkpoint, mlx_checkpoint, tmp_path, arch, variant):
    ours = convert_checkpoint(hf_checkpoint(arch, variant), tmp_path / "hf4", bits="4", group_size=GROUP_SIZE,
                              progress=False)
    theirs = convert_checkpoint(mlx_checkpoint(arch, variant), tmp_path / "mlx4", progress=False)
    with ModelDir.open(ours) as a, ModelDir.open(theirs) as b:
        assert a.moe_layers == b.moe_layers and a.layout == b.layout
        assert all(q.bits == 4 and q.group_size == GROUP_SIZE for q in a.layout.quantization.values())
        assert len(a.layout.quantization) == 3
        for layer in a.moe_layers:
            assert a.expert_path(layer).read_bytes() == b.expert_path(layer).read_bytes()
        # The router: 8 bits, group 64 on both sides (mlx-lm's quant_predicate), same bytes.
        gate = f"layers.{a.moe_layers[0]}.mlp.gate.weight"
        ra, rb = a.raw(gate), b.raw(gate)
        assert (ra.bits, ra.group_size) == (rb.bits, rb.group_size) == (8, 64)
        np.testing.assert_array_equal(ra.weight, rb.weight)


@pytest.mark.parametrize("arch,variant", CASES, ids=[a for a, _ in CASES])
def test_mlx_experts_are_repacked_byte_for_byte(mlx_checkpoint, tmp_path, arch, variant):
    src = mlx_checkpoint(arch, variant)
    stacked = {}
    for shard in src.glob("*.safetensors"):
        stacked.update({k: np.array(v) for k, v in mx.load(str(shard)).items() if ".switch_mlp." in k})
    with ModelDir.open(convert_checkpoint(src, tmp_path / "out", progress=False)) as md:
        layer = md.moe_layers[-1]
        prefix = next(k for k in stacked if f"layers.{layer}.mlp.switch_mlp.up_proj.weight" in k)[: -len("up_proj.weight")]
        for e in (0, 7, md.config.num_experts - 1):
            views = md.layout.view(md.read_expert(layer, e))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for kind in ("weight", "scales", "biases"):
                    np.testing.assert_array_equal(getattr(views[proj], kind), stacked[f"{prefix}{proj}.{kind}"][e])


@pytest.mark.parametrize("arch,variant", CASES, ids=[a for a, _ in CASES])
def test_reference_logits_match_mlx_lm_on_the_mlx_checkpoint(mlx_checkpoint, tmp_path, arch, variant):
    from flashmoe.reference import ReferenceModel

    src = mlx_checkpoint(arch, variant)
    tokens = prompt_tokens(24, seed=3)
    want = mlx_logits(src, tokens)
    got = ReferenceModel.from_dir(convert_checkpoint(src, tmp_path / "out", progress=False)).forward(tokens)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= TOL, err
