"""Tokenizer of a model directory: `tokenizers` for BPE, end-of-sequence ids from every file that declares
them, a streaming detokeniser, and the model's Jinja chat template."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from flashmoe.serve.chat_template import load_chat_template, render_chat, special_tokens_of
from flashmoe.serve.toolcalls import MARKUP_TAGS
from flashmoe.errors import FlashMoeError, TextError


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FlashMoeError(f"{path}: invalid JSON ({e})") from e


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_text(text: str, what: str = "the prompt") -> None:
    """Raise TextError naming `what` and the first lone surrogate of text (the `tokenizers` library refuses such
    strings with a bare TypeError). Python decodes an undecodable byte b of stdin or argv as U+DC00 + b
    (surrogateescape, PEP 383), so the message names that byte too."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f", Python's stand-in for the undecodable byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else ""
        after = f", after {text[max(0, e.start - 20):e.start]!r}" if e.start else ""
        raise TextError(f"{what} is not valid UTF-8 text: a lone surrogate U+{code:04X}{byte} "
                        f"(character {e.start}{after})") from None


def _token_ids(path: Path, value, vocab_size) -> set[int]:
    """The token id(s) of an `eos_token_id` field (one id or a list), each below the model's `vocab_size` (its
    logits' length; not checked when config.json gives none): an id the model cannot produce would never end
    a reply. FlashMoeError naming the file and field otherwise."""
    ids = _as_list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise FlashMoeError(f"{path}: field 'eos_token_id' must be a token id or a list of them, got {value!r}")
    outside = [i for i in ids if isinstance(vocab_size, (int, float)) and i >= vocab_size]
    if outside:
        raise FlashMoeError(f"{path}: field 'eos_token_id' holds {outside[0]}, not a token of the model "
                            f"(vocab_size {vocab_size} in config.json): the model could never end a reply with it")
    return set(ids)


def eos_token_ids(model_dir: Path) -> set[int]:
    """The `eos_token_id`s of config.json (and its text_config) and generation_config.json in `model_dir`, each
    checked below config.json's vocab_size (_token_ids). Raises FlashMoeError naming the file and field."""
    model_config = _read_json(model_dir / "config.json")
    generation_config = _read_json(model_dir / "generation_config.json")
    text_config = model_config.get("text_config", {})
    vocab_size = text_config.get("vocab_size", model_config.get("vocab_size"))
    ids = _token_ids(model_dir / "config.json", model_config.get("eos_token_id"), vocab_size)
    ids |= _token_ids(model_dir / "config.json", text_config.get("eos_token_id"), vocab_size)
    return ids | _token_ids(model_dir / "generation_config.json", generation_config.get("eos_token_id"), vocab_size)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _with_markup_kept(text: str) -> str:
    """tokenizer.json text in which the reasoning and tool-call tags the output parser reads
    (toolcalls.MARKUP_TAGS) are not special tokens, so that decoding keeps them. Some tokenizers declare such
    tags special (and decoding skips special tokens); vLLM's parsers for them turn skip_special_tokens off
    instead, which would also print the end-of-sequence and padding tokens."""
    spec = json.loads(text)
    kept = [t for t in spec.get("added_tokens") or () if t.get("special") and t.get("content") in MARKUP_TAGS]
    for token in kept:
        token["special"] = False
    return json.dumps(spec) if kept else text


def read_tokenizer_json(path: Path) -> HFTokenizer:
    """The tokenizer in tokenizer.json file `path`, its reasoning and tool-call tags kept in decoded text
    (_with_markup_kept). Raises FlashMoeError naming path when the file cannot be read or loaded."""
    try:
        return HFTokenizer.from_str(_with_markup_kept(path.read_text(encoding="utf-8")))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise FlashMoeError(f"{path}: cannot load tokenizer ({e})") from e


class Tokenizer:
    """The tokenizer.json of a model directory plus what generation needs from the config files.

    eos_token_ids is the union of `eos_token_id` in config.json and generation_config.json and the
    `eos_token` of tokenizer_config.json: the three often disagree (Qwen lists <|im_end|> in one and
    <|endoftext|> in another), and stopping on any of them is what transformers' generate does.

    Raises FlashMoeError when tokenizer.json is missing or unreadable, or an eos_token_id is no token id below
    config.json's vocab_size.
    """

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FlashMoeError(f"{path}: no tokenizer.json in the model directory")
        self._tok = read_tokenizer_json(path)
        self.config = _read_json(model_dir / "tokenizer_config.json")
        ids = eos_token_ids(model_dir)
        eos_text = _token_text(self.config.get("eos_token"))
        if eos_text is not None and self._tok.token_to_id(eos_text) is not None:
            ids.add(self._tok.token_to_id(eos_text))
        self.eos_token_ids: frozenset[int] = frozenset(ids)
        self.chat_template: str | dict[str, str] | None = load_chat_template(model_dir, self.config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. Special-token text such as <|im_start|> maps to its id.

        Raises TextError when text is not valid UTF-8 text (holds a lone surrogate)."""
        check_text(text)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        """Render the model's chat template exactly as transformers' apply_chat_template(tokenize=False) does
        (flashmoe.serve.chat_template.render_chat); kwargs are template variables such as enable_thinking.

        Raises FlashMoeError when the model has no chat template or the template raises.
        """
        return render_chat(self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           special_tokens=special_tokens_of(self.config), **kwargs)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces as they become printable.

    Byte-level BPE splits a multi-byte character across tokens; decoding such a prefix yields U+FFFD, so a
    piece ending in U+FFFD is held back until the next token completes the character. Only a short window of
    recent tokens is decoded per call (the offsets scheme of vLLM's incremental detokeniser), so the cost per
    token stays constant however long the reply grows; the window keeps the previous token so decoders whose
    output depends on the neighbour (leading-space rules) render it as a whole decode would.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # end of the part of the window already printed

    def push(self, token_id: int) -> str:
        """Add one token; return the newly printable text (possibly empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text held back when generation ends: bytes of a character the last tokens began but did not
        finish decode as U+FFFD, as Hugging Face's TextStreamer.end() and llama.cpp print them."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        printed = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(printed) or text.endswith("\ufffd") and not final:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(printed) :]
