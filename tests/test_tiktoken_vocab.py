"""A checkpoint that ships tiktoken BPE ranks instead of a tokenizer.json (Kimi K2's `tiktoken.model`):
`flashmoe convert` writes a tokenizer.json that the `tokenizers` library loads and that encodes text, special
tokens included, to the ids tiktoken gives from the same rank file, pattern and special tokens.

The rank file is trained here by tiktoken's own educational BPE trainer on text like the test texts. The trainer
splits with Python's `regex`, which reads Kimi K2's `&&` class intersections differently from tiktoken's Rust
regex and Oniguruma, so it trains with GPT-4's simpler split (TRAIN_PATTERN); any ranks serve, and the
encodings compared use Kimi K2's pattern on both sides: Han runs, case-split words with contractions, 1–3
digit groups, punctuation runs and whitespace.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys

import pytest

from flashmoe.arch.vocabularies import TIKTOKEN_VOCABULARIES
from flashmoe.convert.tiktoken_vocab import tokenizer_json_for
from flashmoe.errors import FlashMoeError

tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the oracle of the encoding")
pytest.importorskip("transformers", reason="its TikTokenConverter builds the tokenizer.json")
from tiktoken._educational import bpe_train  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

VOCAB = TIKTOKEN_VOCABULARIES["kimi_k2"]
TRAIN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CORPUS = ("The weather in Paris isn't sunny; IT'S raining, it's RAINING today. 我们明天去北京看天气怎么样。 Numbers "
          "12345 and 2026 and 3.14159!  Code: def f(x):\n    return x * 2\n camelCaseWords HTTPServer naïve café and "
          "trailing spaces, the weather, the Numbers. ") * 3
NAMED = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", None, "<|im_system|>", "<|im_middle|>"]
TEXTS = [
    "The weather in Paris isn't sunny; IT'S raining.",
    "<|im_user|>user<|im_middle|>北京天气怎么样？<|im_end|><|im_assistant|>assistant<|im_middle|>",
    "[BOS]Numbers: 1234567 and 3.14159, then ... !!! ???\n\n\n   indented\tTab\r\nCRLF",
    "camelCaseWords HTTPServer naïve café Ölfeld — emoji 🦊 and 世界hello世界",
    "a reserved token: <|reserved_token_{reserved}|> and [EOS] twice [EOS]",
    "   leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return bpe_train(CORPUS, 400, TRAIN_PATTERN, visualise=None)


def _write_vocab(root, ranks) -> None:
    """The rank file and tokenizer_config.json (added_tokens_decoder naming some special ids) of a checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda t: t[1])]
    (root / VOCAB.rank_file).write_text("\n".join(lines) + "\n")
    named = {str(len(ranks) + i): {"content": name, "special": True} for i, name in enumerate(NAMED) if name}
    (root / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": named, "bos_token": "[BOS]",
                                                            "eos_token": "[EOS]"}))


def _tiktoken_encoding(ranks) -> "tiktoken.Encoding":
    names = NAMED + [None] * (VOCAB.num_special - len(NAMED))
    specials = {name or VOCAB.reserved_name.format(len(ranks) + i): len(ranks) + i for i, name in enumerate(names)}
    return tiktoken.Encoding("test", pat_str=VOCAB.pattern, mergeable_ranks=ranks, special_tokens=specials)


def test_the_built_tokenizer_encodes_and_decodes_as_tiktoken_does(tmp_path, ranks):
    _write_vocab(tmp_path, ranks)
    tok = Tokenizer.from_str(tokenizer_json_for(tmp_path, "kimi_k2"))
    expected = _tiktoken_encoding(ranks)
    assert tok.get_vocab_size() == len(ranks) + VOCAB.num_special
    merged = 0
    for text in TEXTS:
        text = text.format(reserved=len(ranks) + 100)
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == expected.encode(text, allowed_special="all"), text
        assert tok.decode(ids, skip_special_tokens=False) == text
        merged += sum(256 <= i < len(ranks) for i in ids)
    assert merged > 30  # the learned merges are used, not only single bytes
    assert tok.token_to_id("[EOS]") == len(ranks) + 1 and tok.token_to_id("<|im_middle|>") == len(ranks) + 7
    assert tok.token_to_id(f"<|reserved_token_{len(ranks) + 5}|>") == len(ranks) + 5


def test_convert_writes_the_tokenizer_json(hf_checkpoint, tmp_path, ranks):
    from flashmoe.convert.checkpoint import convert_checkpoint
    from flashmoe.serve.tokenizer import Tokenizer as FlashMoeTokenizer

    src = shutil.copytree(hf_checkpoint("kimi_k2", "one_group_k2"), tmp_path / "src")
    _write_vocab(src, ranks)
    notes: list[str] = []
    dst = convert_checkpoint(src, tmp_path / "out", bits="none", progress=False, log=notes.append)
    assert any("tokenizer.json built from the tiktoken ranks" in n for n in notes), notes
    ours = FlashMoeTokenizer(dst)
    assert ours.eos_token_ids >= {len(ranks) + 1}  # [EOS], named by tokenizer_config.json
    for text in TEXTS:
        assert ours.encode(text) == _tiktoken_encoding(ranks).encode(text, allowed_special="all")


def test_a_checkpoint_with_a_tokenizer_json_or_another_model_type_is_left_alone(tmp_path, ranks):
    _write_vocab(tmp_path, ranks)
    assert tokenizer_json_for(tmp_path, "deepseek_v3") is None
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_json_for(tmp_path, "kimi_k2") is None


def test_bad_vocabulary_files_are_named(tmp_path, ranks):
    _write_vocab(tmp_path, ranks)
    (tmp_path / VOCAB.rank_file).write_text("not base64!! x\n")
    with pytest.raises(FlashMoeError, match=f"{VOCAB.rank_file}, line 1: not a tiktoken rank line"):
        tokenizer_json_for(tmp_path, "kimi_k2")
    _write_vocab(tmp_path, ranks)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"content": "x"}}}))
    with pytest.raises(FlashMoeError, match=r"tokenizer_config.json: added_tokens_decoder\['5'\] must name"):
        tokenizer_json_for(tmp_path, "kimi_k2")
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(FlashMoeError, match="tokenizer_config.json: cannot read"):
        tokenizer_json_for(tmp_path, "kimi_k2")


def test_building_the_tokenizer_without_torch_prints_nothing_of_transformers():
    """transformers imported without torch logs "PyTorch was not found ..."; building a vocabulary needs no
    torch, so `flashmoe convert` must not print it. A fresh process: this one has imported transformers."""
    code = ("import sys; sys.modules['torch'] = None  # as where torch is not installed\n"
            "from flashmoe.convert.tiktoken_vocab import bpe_from_ranks\n"
            "print(bpe_from_ranks({b'a': 0, b'b': 1, b'ab': 2}, r'\\w+', ['<|end|>']).encode('ab<|end|>').ids)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout, run.stderr) == (0, "[2, 3]\n", "")
