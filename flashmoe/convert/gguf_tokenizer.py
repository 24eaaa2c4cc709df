"""A GGUF's tokenizer (`tokenizer.ggml.*`) as the tokenizer.json and tokenizer_config.json of a model directory.

llama.cpp's `gpt2` tokenizer model is a byte-level BPE: `tokens` (id order), `merges` ("a b", rank order),
`token_type` (1 normal, 3 control, 4 user-defined, 5 unused) and `pre`, the name of its pre-tokenizer regexes
(llama-vocab.cpp). The `tokenizers` library builds the same BPE: control tokens become special added
tokens, user-defined ones plain added tokens, and `pre` picks the split regexes, applied in turn, and NFC
normalisation (PRE_TOKENIZERS in flashmoe/arch/gguf_names.py, as the vocabulary's Hugging Face tokenizer does).

llama.cpp's `llama` tokenizer model is a SentencePiece BPE: `tokens`, `scores`, `token_type` (6: the byte
tokens `<0xXX>`) and `add_space_prefix`. llama.cpp's llm_tokenizer_spm splits the text into characters and
repeatedly merges the adjacent pair whose concatenation is the vocabulary's highest-scoring piece (leftmost
first), then spells a symbol outside the vocabulary as its byte tokens; the text gets a "▁" before it (and
after every special token) and "▁" for each space. That is a `tokenizers` BPE with byte fallback whose merges
are every piece's splits into two pieces, ranked by the piece's score (transformers' SentencePieceExtractor
orders them so), under a normaliser that prepends and replaces "▁". Other tokenizer models are not
converted: a note says so and no tokenizer.json is written.
"""

from __future__ import annotations

import json
from typing import Callable

from flashmoe.arch.gguf_names import PRE_TOKENIZERS
from flashmoe.convert.gguf import GGUFModel

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def tokenizer_files(model: GGUFModel, log: Callable[[str], None]) -> dict[str, str]:
    """{file name: text}: tokenizer.json (for a `gpt2` tokenizer) and tokenizer_config.json (special tokens,
    `tokenizer.chat_template`)."""
    meta = model.metadata
    tokens = meta.get("tokenizer.ggml.tokens") or []
    files: dict[str, str] = {}
    kind = meta.get("tokenizer.ggml.model")
    if kind in _BUILDERS and tokens:
        files["tokenizer.json"] = _BUILDERS[kind](meta)
    else:
        log(f"note: {model.path}: tokenizer model {kind!r} is not converted (only {', '.join(_BUILDERS)}: "
            "byte-level BPE and SentencePiece BPE); add the model's tokenizer.json to the output to generate text")
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
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    patterns, nfc = PRE_TOKENIZERS.get(meta.get("tokenizer.ggml.pre", ""), ((), False))
    if not patterns:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return _with_added_tokens(tok, tokens, types)


def _spm_json(meta: dict) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=_spm_merges(tokens, scores, types),
                               unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
                               byte_fallback=True, fuse_unk=True))
    spaces = [normalizers.Replace(" ", "▁")]
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default for SentencePiece
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + spaces)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    return _with_added_tokens(tok, tokens, types)


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every normal piece's splits into two pieces of the vocabulary, highest-scoring piece first (ties: lower
    id), a piece's splits by the ids of their left then right parts (module docstring)."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i in sorted(range(len(tokens)), key=lambda i: -scores[i]):
        piece = tokens[i]
        if types[i] == _NORMAL and len(piece) > 1:
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
            merges += sorted(splits, key=lambda lr: (ids[lr[0]], ids[lr[1]]))
    return merges


def _with_added_tokens(tok, tokens: list[str], types: list[int]) -> str:
    """tokenizer.json of `tok` with the control tokens as special added tokens, the user-defined as plain ones."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return tok.to_str()


#: tokenizer.ggml.model -> the tokenizer.json builder
_BUILDERS = {"gpt2": _bpe_json, "llama": _spm_json}
