"""Train the demo model's byte-level BPE tokenizer and write the Hugging Face tokenizer files.

Byte-level BPE as in GPT-2 / Qwen (every byte is a base symbol, so any text encodes), trained with the
``tokenizers`` library on the training split only. Special tokens take ids 0, 1, 2 in this order:
``<|endoftext|>`` (document separator, pad), ``<|im_start|>``, ``<|im_end|>`` (ChatML turns; eos for chat).

Writes ``tokenizer.json``, ``tokenizer_config.json`` (ChatML chat template, eos/pad tokens) and
``generation_config.json`` into the output folder.

Usage: ``python tools/demo_tokenizer.py TRAIN_TXT OUT_DIR [--vocab-size 4096]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOT_ID, IM_START_ID, IM_END_ID = 0, 1, 2

# ChatML, as Qwen's templates write it (without tools or thinking blocks).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(train_txt: Path, vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (special tokens included) on one UTF-8 file."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The corpus marks document boundaries with the literal separator; keep it out of the merges.
    text = train_txt.read_text(encoding="utf-8")
    tok.train_from_iterator((doc for doc in text.split(SPECIAL_TOKENS[0])), trainer=trainer)
    for token, expected in zip(SPECIAL_TOKENS, (EOT_ID, IM_START_ID, IM_END_ID)):
        if tok.token_to_id(token) != expected:
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}, expected {expected}")
    return tok


def write_tokenizer_files(tok: Tokenizer, out_dir: Path, max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": None,
        "eos_token_id": [IM_END_ID, EOT_ID],
        "pad_token_id": EOT_ID,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_txt", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()
    tok = train_tokenizer(args.train_txt, args.vocab_size)
    write_tokenizer_files(tok, args.out_dir, args.max_length)
    print(f"vocabulary {tok.get_vocab_size()} -> {args.out_dir}")


if __name__ == "__main__":
    main()
