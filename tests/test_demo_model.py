"""The bundled demo model (flashmoe/data/demo-model, built by tools/train_demo.py and tools/verify_demo.py):
it validates, its reference logits and greedy text equal the values recorded when it was built, and,
where the float training checkpoint is present, its float conversion matches transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.runtime.load import default_model_dir
from flashmoe.format.modeldir import ModelDir
from flashmoe.reference import ReferenceModel

REPO = Path(__file__).resolve().parent.parent
FLOAT_CHECKPOINT = REPO / "tools" / "demo-checkpoint"

# Recorded by `python tools/verify_demo.py check` on the shipped 4-bit model (flashmoe reference, float32).
PIN_PROMPT = "O Romeo, Romeo!"
PIN_PROMPT_IDS = [49, 3555, 14, 3555, 3]
PIN_TOP5_IDS = [201, 223, 297, 760, 325]
PIN_TOP5_LOGITS = [10.96528, 6.88086, 6.54514, 6.47828, 6.45989]
PIN_GREEDY_TEXT = "\n\n[Exit.]\n\n[Enter Romeo.]\n\nRomeo.\nHow now, my lord! what's"


@pytest.fixture(scope="module")
def shipped() -> tuple[ReferenceModel, Tokenizer]:
    path = default_model_dir()
    return ReferenceModel.from_dir(path), Tokenizer.from_file(str(path / "tokenizer.json"))


def test_shipped_demo_model_validates_with_the_documented_shape():
    md = ModelDir.open(default_model_dir())
    cfg = md.config
    assert md.manifest.model_type == "qwen3_5_moe_text"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok) == (8, 384, 32, 4)
    assert list(cfg.layer_types) == (["linear_attention"] * 3 + ["full_attention"]) * 2
    assert md.moe_layers == list(range(8))
    assert md.quantization("layers.0.linear_attn.in_proj_qkv.weight").bits == 4
    total = sum(f.stat().st_size for f in default_model_dir().rglob("*") if f.is_file())
    assert total <= 40_000_000


def test_shipped_tokenizer_has_chatml_specials(shipped):
    _, tok = shipped
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.encode(PIN_PROMPT).ids == PIN_PROMPT_IDS


def test_reference_logits_on_shipped_model_equal_build_time_values(shipped):
    model, _ = shipped
    last = model.forward(np.asarray(PIN_PROMPT_IDS))[-1]
    top = np.argsort(last)[::-1][:5]
    assert top.tolist() == PIN_TOP5_IDS
    np.testing.assert_allclose(last[top], PIN_TOP5_LOGITS, rtol=0, atol=1e-3)


def test_greedy_continuation_is_the_recorded_english_text(shipped):
    model, tok = shipped
    cache = model.new_cache()
    logits = model.forward(np.asarray(PIN_PROMPT_IDS), cache)
    out: list[int] = []
    for _ in range(24):
        out.append(int(np.argmax(logits[-1])))
        logits = model.forward(np.asarray(out[-1:]), cache)
    assert tok.decode(out) == PIN_GREEDY_TEXT


@pytest.mark.skipif(not (FLOAT_CHECKPOINT / "config.json").exists(),
                    reason="the float training checkpoint (tools/demo-checkpoint, ~55 MB) is not in git; "
                           "`python tools/train_demo.py` makes it")
def test_float_conversion_matches_transformers_within_1e4_relative(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    convert_checkpoint(FLOAT_CHECKPOINT, tmp_path / "f", bits="none", progress=False)
    tok = Tokenizer.from_file(str(FLOAT_CHECKPOINT / "tokenizer.json"))
    ids = np.asarray(tok.encode("Now is the winter of our discontent\nMade glorious summer by this sun of York;").ids)
    ref = ReferenceModel.from_dir(tmp_path / "f").forward(ids)
    hf_model = transformers.Qwen3_5MoeForCausalLM.from_pretrained(FLOAT_CHECKPOINT, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = hf_model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.linalg.norm(ref - hf) / np.linalg.norm(hf) < 1e-4


# The build tools (tools/), on tiny inputs: what makes the demo model reproducible.
sys.path.insert(0, str(REPO / "tools"))


def test_corpus_split_is_deterministic_and_loses_no_text():
    import demo_corpus

    text = "".join(f"line {i} of a long work\n" for i in range(40_000))
    pieces = demo_corpus.pieces(text)
    assert "".join(pieces) == text and all(len(p) >= demo_corpus.PIECE_CHARS for p in pieces[:-1])
    train, heldout = demo_corpus.split_corpus([("a", text), ("b", text)])
    assert (train, heldout) == demo_corpus.split_corpus([("a", text), ("b", text)])
    # pieces 7 and 57 of the 2 x 52 are held out
    assert len(heldout.split(demo_corpus.EOT)) == 2 and 0 < len(heldout) < 0.05 * len(train)


def test_training_batches_depend_only_on_seed_and_step():
    import train_demo

    tokens = np.arange(10_000, dtype=np.uint16)
    a = train_demo.batch_at(tokens, step=7, seed=1, batch=3, seq=16)
    assert a.shape == (3, 17) and (np.diff(a, axis=1) == 1).all()
    np.testing.assert_array_equal(a, train_demo.batch_at(tokens, step=7, seed=1, batch=3, seq=16))
    assert not np.array_equal(a, train_demo.batch_at(tokens, step=8, seed=1, batch=3, seq=16))


def test_tokenizer_training_writes_chatml_tokenizer_files(tmp_path):
    import json

    import demo_tokenizer

    (tmp_path / "train.txt").write_text("Now is the winter of our discontent.\n" * 50, encoding="utf-8")
    tok = demo_tokenizer.train_tokenizer(tmp_path / "train.txt", vocab_size=300)
    demo_tokenizer.write_tokenizer_files(tok, tmp_path / "tok", max_length=2048)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    from jinja2 import Template

    rendered = Template(config["chat_template"]).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).decode(tok.encode("winter").ids) == "winter"
