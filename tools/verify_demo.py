"""Verify the bundled demo model and record the values its tests pin.

    python tools/verify_demo.py check     # float conversion vs transformers; 4-bit greedy samples; values for
                                          # tests/test_demo_model.py (printed as JSON)

Needs the float checkpoint from tools/train_demo.py (tools/demo-checkpoint/, not in git) and transformers.
The float conversion is written to tools/demo-work/float (``flashmoe convert --bits none``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "tools" / "demo-checkpoint"
WORK = REPO / "tools" / "demo-work"
SHIPPED = REPO / "flashmoe" / "data" / "demo-model"

#: Prompts for the greedy samples in docs/demo-model.md.
PROMPTS = ["To be, or not to be,", "And God said,", "KING HENRY.\n", "O Romeo, Romeo!", "Blessed are the"]
#: The prompt whose logits and greedy continuation tests/test_demo_model.py pins (its top-1 margins over
#: the pinned tokens are large, so the pin survives float32 rounding differences between machines).
PIN_PROMPT, PIN_TOKENS = "O Romeo, Romeo!", 24


def convert(dst: Path, bits: str, expert_bits: str | None = None) -> Path:
    """``flashmoe convert`` the float checkpoint into ``dst`` (replaced); returns ``dst``."""
    from flashmoe.convert.checkpoint import convert_checkpoint

    return convert_checkpoint(CHECKPOINT, dst, bits=bits, expert_bits=expert_bits, force=True, progress=False)


def heldout_ids(n: int, offset: int = 0) -> np.ndarray:
    """``n`` held-out token ids (int64) starting at ``offset`` (tools/demo-work/tokens/heldout.npy)."""
    return np.load(WORK / "tokens" / "heldout.npy")[offset : offset + n].astype(np.int64)


def transformers_logits(ids: np.ndarray) -> np.ndarray:
    """float32 (T, vocab) logits of transformers' Qwen3_5MoeForCausalLM on the float checkpoint, in float32."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    model = Qwen3_5MoeForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()


def greedy(model, tokenizer, prompt: str, n: int) -> tuple[list[int], float]:
    """Greedy continuation of ``prompt`` by a ReferenceModel: (n new token ids, smallest top-1 minus top-2
    logit margin over the n steps, which says how safely the ids can be pinned)."""
    cache = model.new_cache()
    logits = model.forward(np.asarray(tokenizer.encode(prompt).ids), cache)
    out, margin = [], np.inf
    for _ in range(n):
        top2 = np.sort(logits[-1])[-2:]
        margin = min(margin, float(top2[1] - top2[0]))
        out.append(int(np.argmax(logits[-1])))
        logits = model.forward(np.asarray(out[-1:]), cache)
    return out, margin


def check() -> dict:
    """Float conversion vs transformers, greedy samples of the shipped model and the values the tests pin."""
    from tokenizers import Tokenizer

    from flashmoe.reference import ReferenceModel

    ids = heldout_ids(128, offset=1000)
    float_dir = convert(WORK / "float", "none")
    ref = ReferenceModel.from_dir(float_dir).forward(ids)
    ref64 = ReferenceModel.from_dir(float_dir, dtype=np.float64).forward(ids)
    hf = transformers_logits(ids)
    report = {
        "tokens": len(ids),
        "float32_rel_err": float(np.linalg.norm(ref - hf) / np.linalg.norm(hf)),
        "float64_rel_err": float(np.linalg.norm(ref64 - hf) / np.linalg.norm(hf)),
        "max_abs_err": float(np.abs(ref - hf).max()),
        "argmax_agree": float((ref.argmax(-1) == hf.argmax(-1)).mean()),
    }
    tok = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    shipped = ReferenceModel.from_dir(SHIPPED)
    samples = {}
    for prompt in PROMPTS:
        start = time.time()
        out, margin = greedy(shipped, tok, prompt, 40)
        samples[prompt] = {"text": tok.decode(out), "ids": out, "margin": margin,
                           "seconds": round(time.time() - start, 1)}
    report["samples_4bit"] = samples
    pin_ids = np.asarray(tok.encode(PIN_PROMPT).ids)
    last = shipped.forward(pin_ids)[-1]
    top = np.argsort(last)[::-1][:5]
    report["pinned"] = {"prompt_ids": pin_ids.tolist(), "top5_ids": top.tolist(),
                        "top5_logits": [round(float(last[i]), 5) for i in top],
                        "greedy_text": tok.decode(samples[PIN_PROMPT]["ids"][:PIN_TOKENS]),
                        "greedy_margin": greedy(shipped, tok, PIN_PROMPT, PIN_TOKENS)[1]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["check"])
    args = parser.parse_args()
    if args.what == "check":
        print(json.dumps(check(), indent=1))


if __name__ == "__main__":
    main()
