"""A GGUF's SentencePiece tokenizer (`tokenizer.ggml.model` = "llama": Mixtral, Llama) becomes a tokenizer.json
that encodes the same ids as the SentencePiece model it came from and as llama.cpp on the same GGUF.

The vocabulary is a real SentencePiece BPE model trained here on a few sentences (byte fallback, the identity
normaliser and a space prefix, as Llama's and Mixtral's), written into the GGUF the way llama.cpp's converter
does (conversion/base.py, _create_vocab_sentencepiece: pieces, scores, token types)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from flashmoe.bench.llama_cpp import cache_dir
from flashmoe.convert.gguf import GGUFModel
from flashmoe.convert.gguf_model import CONFIG_KEYS
from checkpoints import byte_level_tokens
from flashmoe.arch.gguf_names import PRE_TOKENIZERS
from flashmoe.convert.gguf_tokenizer import tokenizer_files

gguf = pytest.importorskip("gguf", reason="the gguf package writes the GGUF")
spm = pytest.importorskip("sentencepiece", reason="the SentencePiece model is the tokenizer's source")

_CORPUS = ("The quick brown fox jumps over the lazy dog. Hello world! héllo wörld, naïve café. 12345 don't stop.\n"
           "Streaming experts from disk lets a model larger than memory run; it reads only the experts a token "
           "routes to.\n") * 20
# spaces (runs, at the start, tabs, newlines), digits, accents, characters outside the vocabulary (byte
# fallback), words the merges build whole and in part
TEXTS = ["Hello wörld 中文", "The quick brown fox jumps over the lazy dog.", "  double  spaces\tand tabs\nnew line",
         "naïve café 12345 don't", "Streaming experts from disk", " leading space", "🙂 emoji and\n\n  x"]
# llama.cpp's token types (gguf.TokenType)
_TYPES = {"normal": 1, "unknown": 2, "control": 3, "unused": 5, "byte": 6}
_HPARAMS = dict(max_position_embeddings=512, hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0)


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory) -> tuple[Path, object]:
    """(a vocabulary-only `llama` GGUF, the SentencePiece processor its vocabulary comes from)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS.splitlines()), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
                                   character_coverage=1.0, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    kinds = [next(k for k, f in (("unknown", sp.IsUnknown), ("control", sp.IsControl), ("byte", sp.IsByte),
                                 ("unused", sp.IsUnused), ("normal", lambda i: True)) if f(i))
             for i in range(sp.GetPieceSize())]
    path = tmp_path_factory.mktemp("spm") / "vocab.gguf"
    w = _vocabulary_gguf(path)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.IdToPiece(i) for i in range(sp.GetPieceSize())])
    w.add_token_scores([sp.GetScore(i) for i in range(sp.GetPieceSize())])
    w.add_token_types([_TYPES[k] for k in kinds])
    w.add_unk_token_id(sp.unk_id())
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_add_space_prefix(True)
    _close(w)
    return path, sp


def _vocabulary_gguf(path: Path):
    """A GGUFWriter for a vocabulary-only `llama` GGUF, its hyperparameters written (llama.cpp reads them even
    for the vocabulary alone); the caller adds the tokenizer and calls _close."""
    w = gguf.GGUFWriter(path, "llama")
    for key, value in _HPARAMS.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"llama.{CONFIG_KEYS[key]}", value)
    return w


def _close(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def _ours(path: Path) -> Tokenizer:
    with GGUFModel(path) as model:
        return Tokenizer.from_str(tokenizer_files(model, print)["tokenizer.json"])


def test_sentencepiece_tokenizer_encodes_and_decodes_like_sentencepiece(sentencepiece_gguf):
    path, sp = sentencepiece_gguf
    ours = _ours(path)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text
        assert ours.decode(ids) == sp.decode(ids) == text
    assert any(sp.IsByte(i) for text in TEXTS for i in sp.encode(text))  # byte fallback was exercised


_BUILD = cache_dir()


needs_llama_cpp = pytest.mark.skipif(not (_BUILD / "build" / "src" / "libllama.a").exists(), reason=(
    "llama.cpp is not built in the cache (bench/llama_cpp.py builds it in ~15 min; CI does not)"))


@pytest.fixture(scope="module")
def llama_tokenize(tmp_path_factory) -> Path:
    """tests/data/llama_tokenize.cpp linked against the cached llama.cpp build."""
    program = tmp_path_factory.mktemp("llama") / "llama_tokenize"
    libs = [_BUILD / "build" / lib for lib in ("src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a",
                                                "ggml/src/libggml-base.a")]
    subprocess.run(["g++", "-O1", "-std=c++17", Path(__file__).with_name("data") / "llama_tokenize.cpp",
                    "-I", _BUILD / "src" / "include", "-I", _BUILD / "src" / "ggml" / "include", *libs, "-fopenmp",
                    "-lpthread", "-ldl", "-o", program], check=True, capture_output=True)
    return program


def _llama_cpp_ids(program: Path, path: Path, text: str) -> list[int]:
    run = subprocess.run([program, path], input=text.encode(), capture_output=True, check=True)
    return [int(i) for i in run.stdout.decode().strip().split(",") if i]


@needs_llama_cpp
def test_sentencepiece_tokenizer_encodes_like_llama_cpp(sentencepiece_gguf, llama_tokenize):
    """llama.cpp tokenizes each text (special tokens parsed) on the same GGUF."""
    path, _ = sentencepiece_gguf
    ours = _ours(path)
    for text in [*TEXTS, "<s>Hello</s> world<s>x", "</s>  after a special token"]:
        assert ours.encode(text, add_special_tokens=False).ids == _llama_cpp_ids(llama_tokenize, path, text), text


# digits in runs, CJK, contractions in both cases, punctuation before letters, a path, spaces and newlines
_BPE_TEXT = ("I'M here, don't STOP: 1234567 items/ 3.14\n\n  x  中文字符abc Hello123World!!! ('quoted') "
             "naïve   CAFÉ's\tend\r\n")


@needs_llama_cpp
@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_byte_level_pre_tokenizers_split_like_llama_cpp(pre, tmp_path, llama_tokenize):
    """A byte-level BPE vocabulary (the 256 bytes, and every adjacent byte pair of the text as a merge, so
    a pre-tokenizer's splits show in the ids: a pair merges only inside one piece) with each named
    pre-tokenizer: the same ids as llama.cpp's regex_exprs for that name."""
    tokens = byte_level_tokens()
    text = "".join(tokens[b] for b in _BPE_TEXT.encode())
    pairs = list(dict.fromkeys(a + b for a, b in zip(text, text[1:])))
    w = _vocabulary_gguf(tmp_path / "bpe.gguf")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens + pairs)
    w.add_token_merges([f"{p[0]} {p[1]}" for p in pairs])
    _close(w)
    ours = _ours(tmp_path / "bpe.gguf").encode(_BPE_TEXT).ids
    assert ours == _llama_cpp_ids(llama_tokenize, tmp_path / "bpe.gguf", _BPE_TEXT)
    assert len(ours) < len(_BPE_TEXT.encode())  # merges happened

