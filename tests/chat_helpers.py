"""Shared fixtures of the chat, tool-call and server tests: a small byte-level BPE tokenizer with ChatML,
Mixtral and Qwen tool/thinking tokens, and chat templates in the styles of real models (written here from
the public templates' structure; no downloads).

Templates:
- QWEN3: ChatML with JSON tool calls (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), thinking
  (`enable_thinking`), reversed-message namespace scan and `<tool_response>` merging, as Qwen3 ships it.
- QWEN35_XML: ChatML with Qwen3-Coder XML tool calls (`<function=...><parameter=...>`), `|items`, macros,
  loop.previtem/nextitem, and a generation prompt that opens `<think>` as Qwen3.5 does.
- MIXTRAL: `[INST]` turns with bos/eos tokens and raise_exception on bad role order.
- LLAMA_TOOLS: strftime_now, tojson with indent/sort_keys/separators, loop controls, {% generation %}.
- HARMONY: gpt-oss's harmony format (system and developer messages, tools as a TypeScript namespace,
  analysis/final channels, calls `to=functions.NAME` ended by <|call|>, results from `functions.NAME`).
- MINIMAX_M2: MiniMax-M2's `]~b]role` turns, <think> kept only after the last user message, tools as JSON in
  <tools>, calls in <minimax:tool_call> invoke blocks, and a generation prompt that opens <think>.
"""

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

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>"]
PLAIN_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# Added after training, so the ids above stay put: gpt-oss's harmony markup and MiniMax-M2's turn markers and
# call tags, all special tokens (decoding keeps those a chat format reads: flashmoe.serve.tokenizer).
SPECIAL_ADDED = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>",
                 "]~!b[", "]~b]", "[e~[", "<minimax:tool_call>", "</minimax:tool_call>"]

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

QWEN35_XML = r"""{%- macro render_extra_keys(json_dict, handled_keys) %}
    {%- if json_dict is mapping %}
        {%- for json_key in json_dict if json_key not in handled_keys %}
            {%- if json_dict[json_key] is mapping or (json_dict[json_key] is sequence and json_dict[json_key] is not string) %}
                {{- '\n<' ~ json_key ~ '>' ~ (json_dict[json_key] | tojson | safe) ~ '</' ~ json_key ~ '>' }}
            {%- else %}
                {{-'\n<' ~ json_key ~ '>' ~ (json_dict[json_key] | string) ~ '</' ~ json_key ~ '>' }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined or tools is none %}
    {%- set tools = [] %}
{%- endif %}
{%- if system_message is defined %}
    {{- "<|im_start|>system\n" + system_message }}
{%- elif tools | length > 0 %}
    {{- "<|im_start|>system\nYou are a helpful assistant that can call tools." }}
{%- endif %}
{%- if tools | length > 0 %}
    {{- "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {%- if tool.function is defined %}
            {%- set tool = tool.function %}
        {%- endif %}
        {{- "\n<function>\n<name>" ~ tool.name ~ "</name>" }}
        {{- '\n<description>' ~ (tool.description | trim) ~ '</description>' }}
        {{- '\n<parameters>' }}
        {%- for param_name, param_fields in tool.parameters.properties|items %}
            {{- '\n<parameter>\n<name>' ~ param_name ~ '</name>' }}
            {%- if param_fields.type is defined %}
                {{- '\n<type>' ~ (param_fields.type | string) ~ '</type>' }}
            {%- endif %}
            {{- render_extra_keys(param_fields, ['name', 'type', 'description']) }}
            {{- '\n</parameter>' }}
        {%- endfor %}
        {{- '\n</parameters>\n</function>' }}
    {%- endfor %}
    {{- "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>" }}
{%- endif %}
{%- if system_message is defined or tools | length > 0 %}
    {{- '<|im_end|>\n' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role == "assistant" and message.tool_calls is defined and message.tool_calls | length > 0 %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content is defined and message.content is string and message.content | trim | length > 0 %}
            {{- '\n' + message.content | trim + '\n' }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
            {%- for args_name, args_value in tool_call.arguments|items %}
                {{- '<parameter=' + args_name + '>\n' }}
                {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                {{- args_value }}
                {{- '\n</parameter>\n' }}
            {%- endfor %}
            {{- '</function>\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user\n' }}
        {%- endif %}
        {{- '<tool_response>\n' + message.content + '\n</tool_response>\n' }}
        {%- if loop.last or loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}"""

MIXTRAL = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

LLAMA_TOOLS = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
<|im_start|>system
Today Date: {{ date_string }}
{% if tools is not none %}
{% for t in tools %}
{% if t.function.name == 'skip_me' %}{% continue %}{% endif %}
{{ t | tojson(indent=4, sort_keys=True) }}
{{ t.function.parameters | tojson(separators=(',', ':')) }}
{% endfor %}
{% endif %}
<|im_end|>
{% for m in messages %}
    {% if loop.index0 >= max_turns | default(100) %}{% break %}{% endif %}
    <|im_start|>{{ m.role }}
    {% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}

    {% if m.reasoning_content is defined %}[{{ m.reasoning_content }}]{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

HARMONY = r"""{%- macro ts_type(spec) -%}
{%- if spec.type in ("integer", "number") -%}number{%- elif spec.type in ("string", "boolean") -%}{{ spec.type }}{%- else -%}any{%- endif -%}
{%- endmacro -%}
{{- "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n\n" }}
{{- "Reasoning: " + (reasoning_effort | default("medium")) + "\n\n" }}
{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
{%- if tools %}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." }}{%- endif %}
{{- "<|end|>" }}
{%- if messages[0].role in ("developer", "system") %}
    {%- set developer_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if developer_message or tools %}
    {{- "<|start|>developer<|message|>" }}
    {%- if developer_message %}{{- "# Instructions\n\n" + developer_message + "\n\n" }}{%- endif %}
    {%- if tools %}
        {{- "# Tools\n\n## functions\n\nnamespace functions {\n\n" }}
        {%- for tool in tools %}
            {{- "// " + tool.function.description + "\ntype " + tool.function.name + " = (_: {\n" }}
            {%- for name, spec in tool.function.parameters.properties.items() %}
                {{- name + "?: " + ts_type(spec) + ",\n" }}
            {%- endfor %}
            {{- "}) => any;\n\n" }}
        {%- endfor %}
        {{- "} // namespace functions" }}
    {%- endif %}
    {{- "<|end|>" }}
{%- endif %}
{%- set last_tool = namespace(name=none) %}
{%- for message in loop_messages %}
    {%- if message.role == "assistant" and message.tool_calls %}
        {%- set later = namespace(final=false) %}
        {%- for m in loop_messages[loop.index:] %}
            {%- if m.role == "assistant" and not m.tool_calls %}{%- set later.final = true %}{%- endif %}
        {%- endfor %}
        {%- if message.thinking and not later.final %}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- "<|start|>assistant to=functions." + call.name + "<|channel|>commentary json<|message|>" }}
        {{- call.arguments | tojson + "<|call|>" }}
        {%- set last_tool.name = call.name %}
    {%- elif message.role == "assistant" %}
        {%- if loop.last and not add_generation_prompt and message.thinking %}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
        {%- endif %}
        {{- "<|start|>assistant<|channel|>final<|message|>" + message.content }}
        {{- "<|return|>" if loop.last and not add_generation_prompt else "<|end|>" }}
    {%- elif message.role == "tool" %}
        {%- if last_tool.name is none %}{{- raise_exception("a tool message needs an earlier tool call") }}{%- endif %}
        {{- "<|start|>functions." + last_tool.name + " to=assistant<|channel|>commentary<|message|>" }}
        {{- message.content | tojson + "<|end|>" }}
    {%- elif message.role == "user" %}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|start|>assistant" }}{%- endif %}"""

MINIMAX_M2 = r"""{%- set conversation = messages[1:] if messages[0].role == "system" else messages %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in conversation %}{%- if m.role == "user" %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{{- "]~!b[]~b]system\n" + (messages[0].content if messages[0].role == "system" else "You are a helpful assistant.") }}
{%- if tools %}
    {{- "\n\n# Tools\nYou may call one or more tools to assist with the user query.\n" }}
    {{- "Here are the tools available in JSONSchema format:\n\n<tools>\n" }}
    {%- for tool in tools %}{{- "<tool>" + tool.function | tojson + "</tool>\n" }}{%- endfor %}
    {{- "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n" }}
    {{- "<minimax:tool_call>\n<invoke name=\"tool-name-1\">\n<parameter name=\"param-key-1\">param-value-1</parameter>\n" }}
    {{- "</invoke>\n</minimax:tool_call>" }}
{%- endif %}
{{- "[e~[\n" }}
{%- for m in conversation %}
    {%- if m.role == "assistant" %}
        {{- "]~b]ai\n" }}
        {%- if m.reasoning_content and loop.index0 > ns.last_user %}
            {{- "<think>\n" + m.reasoning_content + "\n</think>\n\n" }}
        {%- endif %}
        {{- m.content or "" }}
        {%- if m.tool_calls %}
            {{- "\n<minimax:tool_call>\n" }}
            {%- for tc in m.tool_calls %}
                {{- "<invoke name=\"" + tc.function.name + "\">\n" }}
                {%- for k, v in tc.function.arguments | items %}
                    {{- "<parameter name=\"" + k + "\">" + (v if v is string else v | tojson) + "</parameter>\n" }}
                {%- endfor %}
                {{- "</invoke>\n" }}
            {%- endfor %}
            {{- "</minimax:tool_call>" }}
        {%- endif %}
        {{- "[e~[\n" }}
    {%- elif m.role == "tool" %}
        {%- if loop.first or conversation[loop.index0 - 1].role != "tool" %}{{- "]~b]tool" }}{%- endif %}
        {{- "\n<response>" + m.content + "</response>" }}
        {%- if loop.last or conversation[loop.index0 + 1].role != "tool" %}{{- "[e~[\n" }}{%- endif %}
    {%- elif m.role == "user" %}
        {{- "]~b]user\n" + m.content + "[e~[\n" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "]~b]ai\n<think>\n" }}{%- endif %}"""

TEMPLATES = {"qwen3": QWEN3, "qwen35_xml": QWEN35_XML, "mixtral": MIXTRAL, "llama_tools": LLAMA_TOOLS}

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
    running = RunningServer(app.app).start()
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
