"""Shared fixtures of the chat, tool-call and server tests: a small byte-level BPE tokenizer with ChatML,
Mixtral and Qwen tool/thinking tokens (its merges learned from tests/chat_templates.py's templates), model
directories of it, a scripted FakeEngine and the scripted server over it, tiny random engines."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from flashmoe.runtime.engine import State
from flashmoe.runtime.stats import Stats

from chat_templates import MIXTRAL, QWEN3, QWEN35_XML

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>"]
PLAIN_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# Added after training, so the ids above stay put: gpt-oss's harmony markup and MiniMax-M2's turn markers and
# call tags, all special tokens (decoding keeps those a chat format reads: flashmoe.serve.tokenizer).
SPECIAL_ADDED = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>",
                 "]~!b[", "]~b]", "[e~[", "<minimax:tool_call>", "</minimax:tool_call>"]

_CORPUS = [QWEN3, QWEN35_XML, MIXTRAL, "the weather in Paris is sunny and 22 degrees; what is 2 + 2? 4.",
           'def f(x):\n    return "</tool_call>" + x\n', "Grüße, 世界 🦊 naïve café"]


def parse_in_pieces(parser, text: str, cuts) -> "ParsedOutput":
    """What a reply parser (OutputParser, HarmonyParser) returns for `text` fed in pieces cut at `cuts`."""
    from flashmoe.serve.parsed import ParsedOutput

    out = ParsedOutput()
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    for a, b in zip(bounds, bounds[1:]):
        out.extend(parser.feed(text[a:b]))
    out.extend(parser.finish())
    return out


def build_tokenizer() -> Tokenizer:
    """A byte-level BPE (any text encodes) with merges learned from the templates, the ChatML/Mixtral
    special tokens and Qwen's non-special added tokens (<think>, <tool_call>, ...)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 3, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_ADDED])
    return tok


def write_model_dir(out: Path, template: str | list | None, *, as_jinja_file: bool = False,
                    bos_token: str | None = None, eos_token: str = "<|im_end|>",
                    eos_token_ids: list[int] | None = None) -> Path:
    """Write tokenizer.json, tokenizer_config.json (and chat_template.jinja) into `out`; return it."""
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": eos_token,
              "pad_token": "<|endoftext|>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False}
    if as_jinja_file:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if eos_token_ids is not None:
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_ids}))
    return out


class FakeEngine:
    """Stands in for flashmoe.runtime.engine.Engine in chat and server tests: a "model" whose reply is scripted.

    On a prompt (any forward call that is not the expected next reply token) it decodes everything the
    state holds, asks `reply(text)` for the reply, and then emits that reply's tokens and an end-of-sequence
    token one per decode step. It records how many tokens each forward call consumed, so tests can check
    prefix reuse, and can sleep per call to make generation slow enough to race against.
    """

    def __init__(self, tokenizer, reply, max_position_embeddings: int = 512, delay_s: float = 0.0,
                 eos_token: str = "<|im_end|>"):
        self.tokenizer, self.reply, self.delay_s = tokenizer, reply, delay_s
        self.cfg = SimpleNamespace(max_position_embeddings=max_position_embeddings)
        self.stats = Stats()
        self.store = SimpleNamespace(release_all=lambda: None)
        self.eos_id = tokenizer.encode(eos_token)[0]
        self.forward_lengths: list[int] = []
        self.prompts: list[str] = []
        self.active = self.max_active = 0  # forward calls in flight at once (the server must keep this 1)

    def new_state(self):
        return State(layers=[[], [], 0])  # tokens so far, scripted reply ids, next reply index

    def forward(self, token_ids, state, all_logits: bool = False):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            return self._next_logits([int(t) for t in np.asarray(token_ids).reshape(-1)], state)
        finally:
            self.active -= 1

    def _next_logits(self, ids, state):
        tokens, reply, index = state.layers
        tokens.extend(ids)
        state.position += len(ids)
        self.forward_lengths.append(len(ids))
        if not (len(ids) == 1 and index < len(reply) and reply[index] == ids[0]):
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            self.prompts.append(text)
            reply = self.tokenizer.encode(self.reply(text)) + [self.eos_id]
            index = 0
        else:
            index += 1
        state.layers[1:] = [reply, index]
        logits = np.full((1, self.tokenizer.vocab_size), -30.0, np.float32)
        logits[0, reply[index] if index < len(reply) else self.eos_id] = 30.0
        return logits


#: A tiny Qwen3.5-MoE text model (GatedDeltaNet + full attention, routed + shared experts) whose vocabulary
#: covers build_tokenizer()'s.
TINY_QWEN35 = dict(model_type="qwen3_5_moe_text", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=32,
                   linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=16,
                   num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                   vocab_size=1000, max_position_embeddings=1024)


#: A tiny Qwen3-MoE model: full attention only.
TINY_QWEN3_MOE = dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=64, intermediate_size=256, norm_topk_prob=True, vocab_size=1000,
                      max_position_embeddings=1024)


def tiny_engine(out: Path, template: str = QWEN3, config: dict = TINY_QWEN35):
    """A random model directory (TINY_QWEN35 unless `config` says otherwise) with the test tokenizer at
    `out`, loaded on the NumPy backend. Returns (engine, tokenizer)."""
    from flashmoe.runtime.load import load_engine
    from flashmoe.convert.synth import synth_model
    from flashmoe.serve.tokenizer import Tokenizer as FlashMoeTokenizer

    synth_model(out, config, tokenizer=None)
    write_model_dir(out, template)
    return load_engine(out, backend="numpy", context=1024), FlashMoeTokenizer(out)


# ---- the servers' scripted model -----------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"}}}}}
LONG_REPLY = " ".join(f"word{i}" for i in range(150))


def _last_user(prompt: str) -> str:
    if "]~b]user\n" in prompt:  # MiniMax-M2's turns
        return prompt.split("]~b]user\n")[-1].split("[e~[")[0]
    return prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]


def scripted_reply(prompt: str) -> str:
    """The fake model's behaviour in the server tests, chosen by the last user message."""
    user = _last_user(prompt)
    if "<|im_start|>" not in prompt and "]~b]" not in prompt:
        return " and that is the completion."
    if user.startswith("echo:"):
        return user[len("echo:"):].strip()
    if user == "weather json":
        return ('<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
                '"arguments": {"city": "Paris", "note": "</tool_call> inside"}}\n</tool_call>')
    if user == "weather xml":
        return ("Checking.\n</think>\n\nLet me look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
                "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    if user == "weather invoke":
        return ('Checking.\n</think>\n\nLet me look.\n<minimax:tool_call>\n<invoke name="get_weather">\n'
                '<parameter name="city">Oslo</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n'
                '</minimax:tool_call>')
    if user == "long":
        return LONG_REPLY
    if user.startswith("<tool_response>\n"):
        return "The tool said: " + user.split("\n")[1]
    return "Hello! I am fine."


@contextmanager
def serving(model_dir: Path, reply=scripted_reply, **engine_kwargs):
    """A FlashMoeServer over a FakeEngine(engine_kwargs) replying reply(prompt) on loopback: (server, engine, running)."""
    from flashmoe.serve.server import FlashMoeServer, RunningServer
    from flashmoe.serve.tokenizer import Tokenizer as FlashMoeTokenizer

    tokenizer = FlashMoeTokenizer(model_dir)
    engine = FakeEngine(tokenizer, reply, **engine_kwargs)
    app = FlashMoeServer(engine, tokenizer, "fake", context=engine_kwargs.get("max_position_embeddings"))
    running = RunningServer(app).start()
    try:
        yield app, engine, running
    finally:
        running.stop()
        app.close()


def fake_server(tmp_path_factory, template, name, **engine_kwargs):
    """`serving` scripted_reply with a tokenizer directory for chat template `template` (a with-block)."""
    return serving(write_model_dir(tmp_path_factory.mktemp(name), template), **engine_kwargs)


def write_special_tokens_dir(out: Path, special: list[str], corpus: list[str], *, eos_token: str,
                             template: str, tool_use: str | None = None, bos_token: str | None = None) -> Path:
    """A model directory's tokenizer files for a family's own chat format: a byte-level BPE learned from
    `corpus` with `special` added as special tokens (the reasoning and tool-call tags among them, to cover a
    tokenizer that declares them special), tokenizer_config.json, chat_template.jinja and, when given,
    additional_chat_templates/tool_use.jinja. Returns out."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 3, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": eos_token,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    if tool_use is not None:
        (out / "additional_chat_templates").mkdir(exist_ok=True)
        (out / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use, encoding="utf-8")
    return out


def serve_scripted(model_dir: Path, reply, eos_token: str):
    """`serving` reply(prompt), context 2048: yields (engine, openai client), a pytest fixture's body."""
    import openai
    with serving(model_dir, reply, max_position_embeddings=2048, eos_token=eos_token) as (_, engine, running):
        yield engine, openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def streamed_reply(chunks: list) -> tuple[str, str, list[tuple[int, str, dict]], str]:
    """An OpenAI chat stream's (reasoning, content, [(index, name, arguments)], finish_reason), joined."""
    deltas = [c.choices[0].delta for c in chunks]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    return ("".join(d.model_extra.get("reasoning_content") or "" for d in deltas), "".join(d.content or "" for d in deltas),
            [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls],
            chunks[-1].choices[0].finish_reason)
