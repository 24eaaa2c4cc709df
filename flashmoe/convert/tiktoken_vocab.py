"""tokenizer.json from tiktoken BPE ranks, for checkpoints that publish a rank file instead (Kimi K2).

The ranks become a byte-level BPE exactly as transformers' `TikTokenConverter` builds it (it is used here:
vocabulary = ranks through GPT-2's bytes-to-unicode map, merges recovered from the ranks, the pattern as an
isolating Split before a regex-free ByteLevel step, special tokens after the ranks). The result encodes
text, special-token text included, to the ids that `tiktoken.Encoding(pat_str, ranks, special_tokens)
.encode(text, allowed_special="all")` gives (tests/test_tiktoken_vocab.py checks this).

What a model's tokenizer code defines (pattern, how many special ids, their default names) is read from
flashmoe/arch/vocabularies.py; the names of its special tokens from tokenizer_config.json.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path

from tokenizers import Tokenizer

from flashmoe.arch.vocabularies import TIKTOKEN_VOCABULARIES, TiktokenVocabulary
from flashmoe.errors import FlashMoeError


def bpe_from_ranks(ranks: dict[bytes, int], pattern: str, specials: list[str]) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with these tiktoken ranks (ids 0..len-1), pre-tokenisation
    regex and special tokens (ids len(ranks), len(ranks)+1, ... in order).

    Raises FlashMoeError when transformers is not installed, or the ranks are not 0..len-1.
    """
    # Importing transformers without torch logs "PyTorch was not found. Models won't be available ...": true,
    # and beside the point here (the converter needs no model class), so the notice is dropped while importing.
    transformers_log, drop = logging.getLogger("transformers"), lambda record: False
    transformers_log.addFilter(drop)
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise FlashMoeError(f"building a tokenizer.json from tiktoken ranks needs the 'transformers' package "
                            f"(pip install transformers): {e}") from None
    finally:
        transformers_log.removeFilter(drop)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise FlashMoeError("tiktoken ranks must be the ids 0..n-1, each once")

    class _Converter(TikTokenConverter):
        # TikTokenConverter reads ranks from a file; these are already in memory.
        def load_tiktoken_bpe(self, _url: str) -> dict[bytes, int]:
            return ranks

    return _Converter(vocab_file="<in memory>", pattern=pattern, extra_special_tokens=specials).converted()


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one `base64(token) rank` per line. Read here rather than by tiktoken's
    load_tiktoken_bpe, which caches a local file's contents by its path (a changed file would be read stale).

    Raises FlashMoeError naming the file and line for anything else.
    """
    ranks = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise FlashMoeError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise FlashMoeError(f"{path}, line {number}: not a tiktoken rank line (base64 token, space, rank): "
                                f"{line[:60]!r}") from None
    return ranks


def _special_names(config_path: Path, first_id: int, vocab: TiktokenVocabulary) -> list[str]:
    """The special tokens' names, ids first_id.. in order: tokenizer_config.json's added_tokens_decoder,
    else vocab.reserved_name. Raises FlashMoeError naming the file for a malformed or out-of-range entry."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FlashMoeError(f"{config_path}: cannot read ({e})") from None
    names = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        token_id = int(key) if str(key).isdigit() else -1
        content = entry.get("content") if isinstance(entry, dict) else None
        if not first_id <= token_id < first_id + vocab.num_special or not isinstance(content, str):
            raise FlashMoeError(f"{config_path}: added_tokens_decoder[{key!r}] must name a special token with an "
                                f"id in {first_id}..{first_id + vocab.num_special - 1} (after the "
                                f"{first_id} ranks of {vocab.rank_file})")
        names[token_id] = content
    return [names.get(i, vocab.reserved_name.format(i)) for i in range(first_id, first_id + vocab.num_special)]


def tokenizer_json_for(src_dir: Path, model_type: str) -> str | None:
    """The tokenizer.json text for a checkpoint that ships a tiktoken rank file and no tokenizer.json (its
    model_type in flashmoe/arch/vocabularies.py, the rank file present); None for any other checkpoint.

    Raises FlashMoeError naming the file for an unreadable rank file or tokenizer_config.json, and when
    transformers is not installed.
    """
    vocab = TIKTOKEN_VOCABULARIES.get(model_type)
    if vocab is None or (src_dir / "tokenizer.json").is_file() or not (src_dir / vocab.rank_file).is_file():
        return None
    ranks = read_ranks(src_dir / vocab.rank_file)
    specials = _special_names(src_dir / "tokenizer_config.json", len(ranks), vocab)
    try:
        return bpe_from_ranks(ranks, vocab.pattern, specials).to_str()
    except FlashMoeError as e:
        raise FlashMoeError(f"{src_dir / vocab.rank_file}: {e}") from None
