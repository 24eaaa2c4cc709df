"""Vocabularies published without a tokenizer.json: a tiktoken rank file plus the model's own tokenizer code.

`flashmoe convert` builds the tokenizer.json such a checkpoint lacks (flashmoe/convert/tiktoken_vocab.py) from
what is recorded here per config.json `model_type`: the rank file's name, the pre-tokenisation regex and the
special-token ids that the code (not any data file) defines.

Kimi K2 (moonshotai/Kimi-K2-*, tokenization_kimi.py's `TikTokenTokenizer`): `tiktoken.model` holds the
byte-level BPE ranks; `pat_str` below is that class's, part for part; the special tokens take the
`num_reserved_special_tokens + 2` = 258 ids after the ranks, named by tokenizer_config.json's
`added_tokens_decoder` and `<|reserved_token_{id}|>` where it names none.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TiktokenVocabulary:
    """rank_file: the tiktoken rank file in the checkpoint (base64 token, space, rank per line); pattern: the
    pre-tokenisation regex (tiktoken's pat_str, fancy-regex / Oniguruma syntax); num_special: how many
    special-token ids follow the ranks; reserved_name: the name, formatted with the id, of a special id that
    tokenizer_config.json's added_tokens_decoder does not name."""

    rank_file: str
    pattern: str
    num_special: int
    reserved_name: str


_KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

#: config.json model_type -> its tiktoken vocabulary.
TIKTOKEN_VOCABULARIES = {
    "kimi_k2": TiktokenVocabulary("tiktoken.model", _KIMI_PATTERN, 256 + 2, "<|reserved_token_{}|>"),
}
