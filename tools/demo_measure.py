"""Measure on the demo model what Flash-MoE measured on Qwen3.5-397B: held-out perplexity against the number of
routed experts per token (k = 1..8) and against the bits of the routed experts (2, 4, 8; resident weights at
4 bits), expert activation frequencies, and token-to-token expert reuse.

    python tools/demo_measure.py [--plot-only]   # docs/demo-model-measurements.json, docs/demo-model.png

Each variant is a real ``flashmoe convert`` of the float checkpoint (tools/demo-checkpoint). Its weights are
read back through flashmoe's ModelDir (so they carry flashmoe's quantisation exactly) into transformers'
``Qwen3_5MoeForCausalLM``, which runs the held-out windows fast on a CPU; ``check_against_reference`` shows
that model gives the flashmoe reference's logits. k is changed by setting every router's ``top_k`` (the
top-k weights are renormalised, as the architecture does for any k).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

import train_demo  # noqa: E402
import verify_demo  # noqa: E402

DOCS = TOOLS.parent / "docs"
WINDOWS, SEQ = 8, 512


def hf_model_from_dir(model_dir: Path):
    """transformers Qwen3_5MoeForCausalLM (float32, eval) holding the (dequantised) weights of a flashmoe
    model directory: resident tensors under their Hugging Face names, experts stacked into the fused
    ``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I] parameters."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    from flashmoe.format.modeldir import ModelDir

    md = ModelDir.open(model_dir)
    model = Qwen3_5MoeForCausalLM(train_demo.build_config()).eval()
    # flashmoe stores the zero-centred Qwen3.5 RMSNorm weights as the effective scale 1 + w (docs/formats.md);
    # transformers' Qwen3_5MoeRMSNorm wants w. The gated norm of the linear attention is a plain scale.
    centred = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Qwen3_5MoeRMSNorm"}
    state = {}
    for name in model.state_dict():
        if ".mlp.experts." in name:
            continue
        canonical = name[len("model."):] if name.startswith("model.") else name
        value = np.array(md.tensor(canonical), np.float32)
        state[name] = torch.from_numpy(value - 1.0 if name in centred else value)
    for layer in md.moe_layers:
        experts = [md.expert(layer, e) for e in range(md.num_experts(layer))]
        gate_up = np.stack([np.concatenate([x["gate_proj"], x["up_proj"]]) for x in experts])
        down = np.stack([x["down_proj"] for x in experts])
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.from_numpy(gate_up.astype(np.float32))
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.from_numpy(down.astype(np.float32))
    model.load_state_dict(state, strict=True)
    return model


def set_top_k(model, k: int) -> None:
    """Route every MoE layer of ``model`` to its top ``k`` experts."""
    for layer in model.model.layers:
        layer.mlp.gate.top_k = k


def heldout_windows() -> np.ndarray:
    """WINDOWS consecutive held-out windows of SEQ + 1 tokens, int64 [WINDOWS, SEQ + 1]."""
    ids = verify_demo.heldout_ids(WINDOWS * SEQ + 1)
    return np.stack([ids[i * SEQ : i * SEQ + SEQ + 1] for i in range(WINDOWS)])


def perplexity(model, windows: np.ndarray, batch: int = 4) -> float:
    """exp(mean next-token cross-entropy) over the windows."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.from_numpy(windows[i : i + batch])
            logits = model(input_ids=x[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    return math.exp(total / count)


def routing(model, windows: np.ndarray, k: int = 4) -> dict:
    """Per MoE layer: activation frequency of each expert (share of the k routed slots, sums to 1) and
    token-to-token reuse (mean share of token t's k experts that token t-1 also used, in the same layer)."""
    import torch

    freq, reuse = [], []
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(windows[:, :-1]), output_router_logits=True)
    num_experts = model.config.num_experts
    for logits in out.router_logits:
        top = logits.topk(k, dim=-1).indices.reshape(len(windows), -1, k).numpy()  # (W, T, k)
        counts = np.bincount(top.reshape(-1), minlength=num_experts)
        freq.append((counts / counts.sum()).tolist())
        prev = np.zeros(top.shape[:2] + (num_experts,), bool)
        np.put_along_axis(prev, top, True, axis=-1)
        shared = np.take_along_axis(prev[:, :-1], top[:, 1:], axis=-1).sum(-1) / k  # (W, T-1)
        reuse.append(float(shared.mean()))
    return {"frequency": freq, "reuse": reuse, "reuse_if_uniform": k / num_experts}


def check_against_reference(model_dir: Path, model) -> float:
    """Relative L2 difference between ``model``'s logits and the flashmoe reference's on 64 held-out tokens."""
    import torch

    from flashmoe.reference import ReferenceModel

    ids = verify_demo.heldout_ids(64, offset=5000)
    ref = ReferenceModel.from_dir(model_dir).forward(ids)
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    return float(np.linalg.norm(hf - ref) / np.linalg.norm(ref))


def measure() -> dict:
    """All measurements; see the module docstring."""
    work = verify_demo.WORK / "variants"
    windows = heldout_windows()
    results: dict = {"windows": WINDOWS, "seq": SEQ, "tokens": int(WINDOWS * SEQ)}
    variants = {"float": ("none", None), "e2": ("4", "2"), "e4": ("4", "4"), "e8": ("4", "8")}
    models = {}
    for name, (bits, expert_bits) in variants.items():
        path = verify_demo.convert(work / name, bits, expert_bits)
        models[name] = hf_model_from_dir(path)
        results.setdefault("size_bytes", {})[name] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    results["hf_vs_reference_rel_err"] = check_against_reference(work / "e4", models["e4"])
    start = time.time()
    results["ppl_vs_k"] = {}
    for k in range(1, 9):
        set_top_k(models["e4"], k)
        results["ppl_vs_k"][k] = perplexity(models["e4"], windows)
        print("k", k, results["ppl_vs_k"][k], flush=True)
    set_top_k(models["e4"], 4)
    results["ppl_vs_expert_bits"] = {name: perplexity(models[name], windows) for name in ("e2", "e8", "float")}
    results["ppl_vs_expert_bits"]["e4"] = results["ppl_vs_k"][4]
    results["routing"] = routing(models["float"], windows)
    results["seconds"] = time.time() - start
    return results


def plot(results: dict, path: Path) -> None:
    """Three panels: perplexity vs k, perplexity vs expert bits, per-layer expert frequency heat map.
    ``results`` as read back from the JSON file (string keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ks = list(range(1, 9))
    axes[0].plot(ks, [results["ppl_vs_k"][str(k)] for k in ks], marker="o")
    axes[0].axvline(4, color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="experts per token (k); trained with 4", ylabel="held-out perplexity",
                title="Perplexity vs k (4-bit model)")
    bits = ["e2", "e4", "e8", "float"]
    axes[1].bar(["2", "4", "8", "float"], [results["ppl_vs_expert_bits"][b] for b in bits], color="tab:orange")
    axes[1].set(xlabel="routed-expert bits (resident 4-bit; float = all float)", ylabel="held-out perplexity",
                title="Perplexity vs expert bits (k = 4)")
    freq = np.asarray(results["routing"]["frequency"])
    im = axes[2].imshow(freq, aspect="auto", cmap="viridis")
    axes[2].set(xlabel="expert", ylabel="layer", title="Share of routed slots (uniform = 1/32)")
    fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    out = DOCS / "demo-model-measurements.json"
    if "--plot-only" not in sys.argv[1:]:
        out.write_text(json.dumps(measure(), indent=1) + "\n")
    results = json.loads(out.read_text())
    plot(results, DOCS / "demo-model.png")
    print(json.dumps({k: v for k, v in results.items() if k != "routing"}, indent=1))


if __name__ == "__main__":
    main()
