"""A GGUF's tokenizer (`tokenizer.ggml.*`) as the tokenizer.json and tokenizer_config.json of a model directory.

llama.cpp's `gpt2` tokenizer model is a byte-level BPE: `tokens` (id order), `merges` ("a b", rank order),
`token_type` (1 normal, 3 control, 4 user-defined, 5 unused) and `pre`, the name of its pre-tokenizer regex
(llama-vocab.cpp). The `tokenizers` library builds the same BPE: control tokens become special added
tokens, user-defined ones plain added tokens, and `pre` picks the split regex and NFC normalisation
(PRE_TOKENIZERS in flashmoe/arch/gguf_names.py, as the vocabulary's Hugging Face tokenizer does). Other
tokenizer models (SentencePiece `llama`) are not converted: a note says so and no tokenizer.json is written.
"""

from __future__ import annotations

import json
from typing import Callable

from flashmoe.arch.gguf_names import PRE_TOKENIZERS
from flashmoe.convert.gguf import GGUFModel

_CONTROL, _USER_DEFINED = 3, 4


def tokenizer_files(model: GGUFModel, log: Callable[[str], None]) -> dict[str, str]:
    """{file name: text}: tokenizer.json (for a `gpt2` tokenizer) and tokenizer_config.json (special tokens,
    `tokenizer.chat_template`)."""
    meta = model.metadata
    tokens = meta.get("tokenizer.ggml.tokens") or []
    files: dict[str, str] = {}
    if meta.get("tokenizer.ggml.model") == "gpt2" and tokens:
        files["tokenizer.json"] = _bpe_json(meta)
    else:
        log(f"note: {model.path}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not converted (only "
            "gpt2, byte-level BPE); add the model's tokenizer.json to the output to generate text")
    config: dict[str, object] = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False))}
    for key in ("bos", "eos", "padding", "unknown"):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            config[{"padding": "pad", "unknown": "unk"}.get(key, key) + "_token"] = tokens[tid]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return files


def _bpe_json(meta: dict) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pattern, nfc = PRE_TOKENIZERS.get(meta.get("tokenizer.ggml.pre", ""), (None, False))
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return tok.to_str()
