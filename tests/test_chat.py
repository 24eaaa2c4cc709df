"""flashmoe chat: history, state kept between turns (only new tokens prefilled), commands, multi-line input."""

from __future__ import annotations

import threading

import pytest
from chat_helpers import FakeEngine, write_model_dir
from chat_templates import QWEN3, QWEN35_XML

from flashmoe.serve.chat import ChatSession, read_message, run_repl
from flashmoe.serve.generate import CANCELLED, EOS, LENGTH, STOP_STRING
from flashmoe.serve.sampling import Sampler
from flashmoe.serve.session import ContextError, Session
from flashmoe.serve.tokenizer import Tokenizer


def echo(prompt: str) -> str:
    user = prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
    system = prompt.split("<|im_start|>system\n")[1].split("<|im_end|>")[0] if "<|im_start|>system" in prompt else ""
    return f"You said {user!r}" + (f" as {system!r}" if system else "")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(write_model_dir(tmp_path_factory.mktemp("chat"), QWEN3))


def _chat(tokenizer, **kwargs) -> ChatSession:
    engine = FakeEngine(tokenizer, kwargs.pop("reply", echo), max_position_embeddings=kwargs.pop("context", 512))
    return ChatSession(engine, tokenizer, Sampler(temperature=0.0), **kwargs)


def test_second_turn_prefills_only_the_new_tokens(tokenizer):
    chat = _chat(tokenizer)
    assert chat.send("hello").content == "You said 'hello'"
    n_cached = len(chat.session.tokens)
    n_calls = len(chat.engine.forward_lengths)
    assert chat.send("and again").content == "You said 'and again'"
    full_prompt = tokenizer.encode(tokenizer.apply_chat_template(chat.messages[:-1]))
    assert chat.session.last.reused_tokens == n_cached
    assert chat.engine.forward_lengths[n_calls] == len(full_prompt) - n_cached
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]


def test_reset_and_system_prompt_start_over(tokenizer):
    chat = _chat(tokenizer)
    chat.send("one")
    chat.set_system("a pirate")
    assert chat.messages == [] and chat.session.tokens == []
    assert chat.send("two").content == "You said 'two' as 'a pirate'"
    assert chat.session.last.reused_tokens == 0


def test_reasoning_is_kept_apart_from_content(tmp_path):
    tok = Tokenizer(write_model_dir(tmp_path, QWEN35_XML))
    chat = _chat(tok, reply=lambda prompt: "step by step\n</think>\n\nDone.")
    reply = chat.send("think")
    assert (reply.reasoning, reply.content) == ("step by step", "Done.")
    assert chat.messages[-1] == {"role": "assistant", "content": "Done.", "reasoning_content": "step by step"}


def test_a_conversation_that_outgrows_the_context_asks_for_reset(tokenizer):
    chat = _chat(tokenizer, context=40)
    chat.send("hi")
    with pytest.raises(ContextError, match="/reset to start over"):
        chat.send("x " * 50)


def test_a_first_message_longer_than_the_context_asks_for_a_larger_context_not_reset(tokenizer):
    n = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "x " * 50}],
                                                           add_generation_prompt=True)))
    with pytest.raises(ContextError) as err:
        engine = FakeEngine(tokenizer, echo, max_position_embeddings=512)
        ChatSession(engine, tokenizer, Sampler(temperature=0.0), context=5).send("x " * 50)
    assert str(err.value) == f"the message has {n} tokens with the chat template and fills the context of 5; a " \
                             "larger --context helps (the model takes 512)"
    with pytest.raises(ContextError) as err:  # the model's whole context: nothing to suggest
        _chat(tokenizer, context=40, system="be brief").send("x " * 50)
    assert str(err.value).endswith(" tokens with the chat template and the system prompt and fills the context "
                                   "of 40"), err.value


def test_a_message_that_is_not_utf8_is_one_error_line_and_the_chat_goes_on(tokenizer):
    chat = _chat(tokenizer)
    lines = iter(["caf\udce9", "hi", "/quit"])  # how Python hands over the undecodable byte 0xe9 of stdin
    out = []
    run_repl(chat, read_line=lambda prompt: next(lines), write=out.append, color=False)
    text = "".join(out)
    assert "[error: the message is not valid UTF-8 text: a lone surrogate U+DCE9, Python's stand-in for the " \
           "undecodable byte 0xe9 (character 3, after 'caf')]" in text
    assert "You said 'hi'" in text and [m["content"] for m in chat.messages][0] == "hi"


def test_from_a_pipe_a_message_that_is_not_utf8_ends_the_chat_with_the_error(tokenizer):
    from flashmoe.errors import TextError

    chat = _chat(tokenizer)
    lines = iter(["hi", "/system caf\udce9", "never"])
    out = []
    with pytest.raises(TextError, match=r"^the system prompt is not valid UTF-8 text: a lone surrogate U\+DCE9"):
        run_repl(chat, read_line=lambda prompt: next(lines), write=out.append, color=False, stop_on_error=True)
    assert "You said 'hi'" in "".join(out) and chat.system is None and len(chat.messages) == 2


@pytest.mark.parametrize("args, stdin, message", [
    (["--system", "caf\udce9"], "hi\n", "error: --system is not valid UTF-8 text"),  # as argv hands the byte 0xe9 over
    ([], b"hi\ncaf\xe9\nnever\n", "error: the message is not valid UTF-8 text"),
])
def test_chat_from_a_pipe_exits_2_with_one_line_for_text_that_is_not_utf8(tokenizer, monkeypatch, args, stdin, message):
    """As generate does: one error line naming the byte, exit code 2; a bad --system before the model loads."""
    from typer.testing import CliRunner

    import flashmoe.runtime.load
    from flashmoe.cli import app

    loaded = []
    monkeypatch.setattr(flashmoe.runtime.load, "load_engine",
                        lambda model, **kwargs: loaded.append(model) or FakeEngine(tokenizer, echo))
    result = CliRunner().invoke(app, ["chat", "--backend", "numpy", *args], input=stdin)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"{message}: a lone surrogate U+DCE9, Python's stand-in for the undecodable byte 0xe9 " \
                            "(character 3, after 'caf')\n"
    assert len(loaded) == (0 if args else 1) and "Traceback" not in result.output


def test_chat_and_generate_chat_refuse_a_model_without_a_chat_template_before_loading_it(tmp_path, monkeypatch):
    """One error line and exit code 2 at start-up, not an error line per turn and exit code 0."""
    from chat_helpers import TINY_QWEN35
    from typer.testing import CliRunner

    import flashmoe.runtime.load
    from flashmoe.cli import app
    from flashmoe.convert.synth import synth_model

    model = tmp_path / "model"
    synth_model(model, TINY_QWEN35, tokenizer=None)
    write_model_dir(model, None)
    loaded = []
    monkeypatch.setattr(flashmoe.runtime.load, "load_engine", lambda model, **kwargs: loaded.append(model))
    for args, stdin in ((["chat", str(model)], "hi\nagain\n"), (["generate", str(model), "-p", "hi", "--chat"], None)):
        result = CliRunner().invoke(app, [*args, "--backend", "numpy"], input=stdin)
        assert (result.exit_code, result.stdout, result.stderr) == (
            2, "", "error: this model has no chat template (tokenizer_config.json or chat_template.jinja)\n")
    assert loaded == []


def test_multi_line_input():
    lines = iter(["first \\", "second", '"""', "a", "", "b", '"""'])
    read = lambda prompt: next(lines)  # noqa: E731
    assert read_message(read) == "first \nsecond"
    assert read_message(read) == "a\n\nb"


@pytest.mark.parametrize("lines, sent", [(['"""', "first", "", "second"], "first\n\nsecond"),
                                         (["meow \\", "purr \\"], "meow \npurr ")])
def test_a_message_left_open_at_the_end_of_input_is_sent_not_dropped(tokenizer, lines, sent):
    """An unclosed \"\"\" block or a trailing backslash at EOF (a pipe, Ctrl-D): the lines read are the message."""
    remaining = iter(lines)

    def read_line(prompt: str) -> str:
        if (line := next(remaining, None)) is None:
            raise EOFError
        return line

    out = []
    run_repl(_chat(tokenizer), read_line=read_line, write=out.append, color=False)
    assert f"You said {sent!r}" in "".join(out)
    remaining = iter(['"""'])  # an empty block: nothing to send, the chat just ends
    out.clear()
    run_repl(_chat(tokenizer), read_line=read_line, write=out.append, color=False)
    assert "".join(out) == "flashmoe chat — /help for commands\n\n"


def test_repl_commands(tokenizer):
    chat = _chat(tokenizer)
    lines = iter(["hi", "/stats", "/system a cat", "/system", "meow \\", "purr", "/bogus", "/reset", "/stats", "/quit",
                  "never"])
    out = []
    run_repl(chat, read_line=lambda prompt: next(lines), write=out.append, color=False)
    text = "".join(out)
    assert "You said 'hi'" in text
    assert "last turn:" in text and "tokens cached" in text
    assert "[system prompt: 'a cat']" in text
    assert "You said 'meow \\npurr' as 'a cat'" in text
    assert "unknown command /bogus" in text and "[conversation cleared]" in text
    assert text.split("[conversation cleared]")[1].lstrip().startswith("last turn: none since the conversation started")
    assert chat.messages == []


def test_prefix_reuse_on_a_real_hybrid_model_matches_a_fresh_prefill(tmp_path):
    """KV caches and GatedDeltaNet states carried over from a previous turn give the same greedy tokens as
    prefilling the whole conversation again."""
    from chat_helpers import tiny_engine

    from flashmoe.serve.session import Session

    engine, tok = tiny_engine(tmp_path / "tiny")
    reused = Session(engine, tok)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello there"}]))
    first = [s.token_id for s in reused.generate(prompt, Sampler(), 6)]
    # The state holds every token but the last generated one: its logits would never be used, so it is not
    # forwarded until the next turn's prefill (with the new tokens, as one batch).
    assert len(first) == 6 and reused.tokens == prompt + first[:-1]
    follow = prompt + first + tok.encode("<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n")
    second = [s.token_id for s in reused.generate(follow, Sampler(), 6)]
    assert reused.last.reused_tokens == len(prompt) + 5
    fresh = Session(engine, tok)
    assert [s.token_id for s in fresh.generate(follow, Sampler(), 6)] == second
    assert fresh.last.reused_tokens == 0


def test_flashmoe_chat_command_reads_stdin(tmp_path):
    import subprocess
    import sys

    from chat_helpers import TINY_QWEN35

    from flashmoe.convert.synth import synth_model

    model = tmp_path / "model"
    synth_model(model, TINY_QWEN35, tokenizer=None)
    write_model_dir(model, QWEN3)
    done = subprocess.run([sys.executable, "-c", "from flashmoe.cli import app; app()", "chat", str(model), "--backend", "numpy",
                           "--max-tokens", "4", "--temperature", "0", "--context", "256"],
                          input="hello\n/stats\n/quit\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "flashmoe chat" in done.stdout
    assert "last turn:" in done.stdout and "(0 reused from the cache)" in done.stdout


def _greedy(session, prompt, **kwargs) -> list[int]:
    return [s.token_id for s in session.generate(prompt, Sampler(), 5, **kwargs)]


def test_hybrid_model_returns_to_the_checkpoint_where_the_history_ended(tmp_path):
    """The next prompt diverges right after the first prompt's history (as when a template re-renders the
    reply without its reasoning): the linear-attention checkpoint is restored, the KV caches cut back."""
    from chat_helpers import tiny_engine

    from flashmoe.serve.session import Session, history_boundary

    engine, tok = tiny_engine(tmp_path / "tiny")
    session = Session(engine, tok)
    messages = [{"role": "user", "content": "hello there"}]
    prompt = tok.encode(tok.apply_chat_template(messages) + "<think>\n")
    boundary = history_boundary(tok, messages, prompt)
    assert boundary == len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False)))
    _greedy(session, prompt, checkpoint_at=boundary)
    follow = prompt[:boundary] + tok.encode("<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n")
    second = _greedy(session, follow)
    assert session.last.reused_tokens == boundary
    assert _greedy(Session(engine, tok), follow) == second
    edited = follow[:-3] + tok.encode("x")  # diverges after the checkpoint again: back to it a second time
    third = _greedy(session, edited)
    assert session.last.reused_tokens == boundary
    assert _greedy(Session(engine, tok), edited) == third
    assert history_boundary(tok, messages + [{"role": "assistant", "content": "hi"}], follow) is None


def test_attention_only_model_rewinds_to_any_common_prefix(tmp_path):
    from chat_helpers import TINY_QWEN3_MOE, tiny_engine

    from flashmoe.serve.session import Session

    engine, tok = tiny_engine(tmp_path / "tiny", config=TINY_QWEN3_MOE)
    session = Session(engine, tok)
    prompt = tok.encode("the weather in Paris is sunny and 22 degrees")
    _greedy(session, prompt)
    other = prompt[:4] + tok.encode(" Rome is rainy")
    second = _greedy(session, other)
    assert session.last.reused_tokens == 4
    assert _greedy(Session(engine, tok), other) == second
    _greedy(session, other)  # the same prompt again: all but its last token are reused
    assert session.last.reused_tokens == len(other) - 1


ENGINE_ARGS = ["--backend", "numpy", "--io", "direct", "--max-memory", "3G", "-k", "2", "--cache-policy", "lru",
               "--gpu-memory", "1G", "--speculate", "--activations", "float", "--expert-device", "auto"]


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["chat"], ["serve"]])
def test_generate_chat_and_serve_take_the_same_engine_options_to_load_engine(command, monkeypatch):
    """The three commands share one definition of the engine options (flashmoe.cli.shared.engine_options)."""
    from typer.testing import CliRunner

    import flashmoe.runtime.load
    from flashmoe.cli import app
    from flashmoe.errors import FlashMoeError

    seen = {}

    def load_engine(model, **kwargs):
        seen.update(kwargs)
        raise FlashMoeError("stop before loading")

    monkeypatch.setattr(flashmoe.runtime.load, "load_engine", load_engine)
    result = CliRunner().invoke(app, [*command, *ENGINE_ARGS])  # the bundled demo model
    assert result.exit_code == 2 and "error: stop before loading" in result.output, result.output
    assert {k: v for k, v in seen.items() if k != "context"} == dict(
        backend="numpy", io="direct", max_memory="3G", experts_per_token=2, cache_policy="lru", gpu_memory="1G",
        speculate=True, activations="float", expert_device="auto")


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_a_missing_model_directory_is_named_as_missing(command, tmp_path):
    from typer.testing import CliRunner

    from flashmoe.cli import app

    missing = tmp_path / "nonexistent"
    result = CliRunner().invoke(app, [command, str(missing), *(["-p", "hi"] if command == "generate" else [])])
    assert result.exit_code == 2 and result.output.startswith(f"error: {missing}: does not exist (give a model ")
    assert result.output.count("\n") == 1
    gguf = tmp_path / "model.gguf"  # a GGUF given where a model directory goes: how to convert it
    gguf.write_bytes(b"GGUF")
    result = CliRunner().invoke(app, [command, str(gguf), *(["-p", "hi"] if command == "generate" else [])])
    assert result.exit_code == 2
    assert result.output == f"error: {gguf}: not a directory (a GGUF file is read after `flashmoe convert {gguf} DIR`)\n"


def test_a_run_says_why_it_stopped_in_the_one_vocabulary(tokenizer):
    engine = FakeEngine(tokenizer, lambda prompt: "alpha beta gamma")
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "x"}]))

    def run(**kwargs) -> str:
        session = Session(engine, tokenizer)
        list(session.generate(prompt, Sampler(temperature=0.0), **kwargs))
        return session.last.stop

    assert run(max_tokens=100) == EOS
    assert run(max_tokens=100, stop=["beta"]) == STOP_STRING
    assert run(max_tokens=2) == LENGTH
    cancel = threading.Event()
    cancel.set()
    assert run(max_tokens=100, cancel=cancel) == CANCELLED


def test_a_reply_that_ends_inside_a_character_ends_with_u_fffd_at_eos_and_at_max_tokens(tokenizer):
    """The bytes of an unfinished character are printed as U+FFFD (as llama.cpp and transformers' TextStreamer
    do), not dropped. 世 is three byte tokens of the test tokenizer."""
    from types import SimpleNamespace

    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "x"}]))
    cut = SimpleNamespace(decode=tokenizer.decode, vocab_size=tokenizer.vocab_size,  # replies 世's first two bytes
                          encode=lambda text: tokenizer.encode(text)[:-1] if text == "ok 世" else tokenizer.encode(text))
    for engine, max_tokens, stop in ((FakeEngine(cut, lambda prompt: "ok 世"), 100, EOS),
                                     (FakeEngine(tokenizer, lambda prompt: "ok 世"), len(tokenizer.encode("ok 世")) - 1,
                                      LENGTH)):
        session = Session(engine, tokenizer)
        text = "".join(s.text for s in session.generate(prompt, Sampler(temperature=0.0), max_tokens))
        assert (text, session.last.stop) == ("ok \ufffd", stop)


def test_ctrl_c_inside_the_forward_pass_is_reported_as_cancelled(tokenizer):
    chat = _chat(tokenizer)
    chat.send("hello")
    real_forward, calls = chat.engine.forward, []

    def interrupted(token_ids, state, all_logits=False):
        calls.append(1)
        if len(calls) == 3:  # the prompt, one decode step, then Ctrl-C
            raise KeyboardInterrupt
        return real_forward(token_ids, state, all_logits)

    chat.engine.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        chat.send("tell me more")
    assert chat.session.last.stop == CANCELLED
    assert "stop: cancelled" in chat.stats_text()
