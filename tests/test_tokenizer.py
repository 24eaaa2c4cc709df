import json

import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from flashmoe.errors import FlashMoeError
from flashmoe.serve.tokenizer import StreamDecoder, Tokenizer


@pytest.fixture
def model_dir(tmp_path):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    # Three files, three different end-of-sequence declarations, as Qwen checkpoints ship them.
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_start|>"},
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }))
    return tmp_path


def test_eos_ids_are_the_union_of_all_config_files(model_dir):
    assert Tokenizer(model_dir).eos_token_ids == {0, 1, 2}


def test_stream_decoder_reassembles_multibyte_text_exactly(model_dir):
    tok = Tokenizer(model_dir)
    text = "the fox — naïve 世界 🦊 dog"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_flush_prints_an_unfinished_character_as_replacement_characters(model_dir):
    tok = Tokenizer(model_dir)
    ids = tok.encode("dog 世")  # ..., "Ġ", then 世's three bytes as three tokens
    decoder = StreamDecoder(tok)
    assert "".join(decoder.push(i) for i in ids[:-1]) == "dog "
    assert decoder.flush() == "\ufffd"  # two of the three bytes of 世: one U+FFFD, as tokenizers decodes them
    assert decoder.flush() == ""


def test_special_token_text_encodes_to_its_id(model_dir):
    tok = Tokenizer(model_dir)
    assert tok.encode("<|im_end|>") == [2]


def test_chat_template_renders_generation_prompt(model_dir):
    text = Tokenizer(model_dir).apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_missing_tokenizer_file_names_the_path(tmp_path):
    with pytest.raises(FlashMoeError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_stream_decoder_matches_whole_decode_for_random_token_sequences(model_dir):
    import random

    tok = Tokenizer(model_dir)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        decoder = StreamDecoder(tok)
        streamed = "".join(decoder.push(i) for i in ids)
        # an unfinished last character is held back until the end, then printed as U+FFFD
        assert streamed + decoder.flush() == tok.decode(ids)
