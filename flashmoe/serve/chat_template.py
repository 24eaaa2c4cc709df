"""Chat templates: a model's own Jinja template rendered exactly as Hugging Face transformers renders it.

A prompt built here is, token for token, what `PreTrainedTokenizerBase.apply_chat_template` produces for the
same messages, tools and keyword arguments. What that takes (transformers 5.x,
`utils/chat_template_utils.py` and `tokenization_utils_base.py`, matched behaviour by behaviour):

- the environment: `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
  `loopcontrols` extension (`{% break %}`, `{% continue %}`) and a `{% generation %}` block tag that renders
  its body unchanged;
- globals `raise_exception(message)`, `strftime_now(format)`, `dict` and `namespace` (underscore names
  refused), and a `tojson` filter that is plain `json.dumps` with `ensure_ascii=False` and the
  `indent`, `separators`, `sort_keys` arguments (Jinja's own filter escapes HTML, which templates must not);
- the inputs: message keys whose value is None are dropped, everything the template sees is rebuilt from
  plain JSON types, a message's reasoning given as `thinking` or `reasoning` is also passed as
  `reasoning_content` (and `thinking`), and the special tokens of tokenizer_config.json (`bos_token`,
  `eos_token`, ...) are variables that explicit keyword arguments override;
- which template: `chat_template.jinja` and `additional_chat_templates/*.jinja` take priority over the
  `chat_template` entry of tokenizer_config.json; with several named templates, `tool_use` is chosen when
  tools are given and `default` otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flashmoe.errors import FlashMoeError

#: tokenizer_config.json keys that transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

#: Names a message's reasoning arrives under; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate(str):
    """A template's source text that remembers where it was read (`origin`: its file, or tokenizer_config.json
    and the field), so that an error in it names the place to fix."""

    origin: str

    def __new__(cls, text: str, origin: str) -> "ChatTemplate":
        template = super().__new__(cls, text)
        template.origin = origin
        return template


def load_chat_template(model_dir: str | Path, tokenizer_config: Mapping | None = None) -> str | dict[str, str] | None:
    """The chat template(s) of a model directory, with transformers' precedence.

    Returns one template (a ChatTemplate), a dict {name: template} when the model has several (a list of
    {"name", "template"} in tokenizer_config.json, or extra files in additional_chat_templates/), or None.

    Raises FlashMoeError when a template file cannot be read as UTF-8, or naming the field when
    tokenizer_config.json's chat_template is neither a string nor such a list.
    """
    model_dir = Path(model_dir)
    files: dict[str, Path] = {}
    if (model_dir / "chat_template.jinja").is_file():
        files["default"] = model_dir / "chat_template.jinja"
    extra = model_dir / "additional_chat_templates"
    if extra.is_dir():
        files.update({p.name.removesuffix(".jinja"): p for p in sorted(extra.glob("*.jinja"))})
    if files:
        try:
            templates = {name: ChatTemplate(path.read_text(encoding="utf-8"), str(path)) for name, path in files.items()}
        except (OSError, UnicodeDecodeError) as e:
            raise FlashMoeError(f"{model_dir}: cannot read chat template ({e})") from e
        return templates["default"] if list(templates) == ["default"] else templates
    value = (tokenizer_config or {}).get("chat_template")
    field = f"{model_dir / 'tokenizer_config.json'}, field 'chat_template'"
    if value is None or isinstance(value, str):
        return None if value is None else ChatTemplate(value, field)
    if isinstance(value, list) and all(isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                                       and isinstance(entry.get("template"), str) for entry in value):
        return {entry["name"]: ChatTemplate(entry["template"], f"{field} {entry['name']!r}") for entry in value}
    raise FlashMoeError(f"{field} must be a template or a list of {{\"name\", \"template\"}} objects, got "
                        f"{str(value)[:80]!r}")


def select_template(template: str | Mapping[str, str] | None, name: str | None = None,
                    tools: list | None = None) -> str:
    """Pick the template source to render: `name` from a dict of templates, else `tool_use` when tools are
    given and the model has one, else `default`. A plain template string is returned as is.

    Raises FlashMoeError when there is no template, or no default among several.
    """
    if template is None:
        raise FlashMoeError("this model has no chat template (tokenizer_config.json or chat_template.jinja)")
    if isinstance(template, str):
        return template
    if name is not None:
        if name not in template:
            raise FlashMoeError(f"chat template {name!r} not found; the model has {sorted(template)}")
        return template[name]
    if tools is not None and "tool_use" in template:
        return template["tool_use"]
    if "default" in template:
        return template["default"]
    raise FlashMoeError(f"the model has several chat templates and no default: {sorted(template)}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant-token masks;
    for rendering it is transparent."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render(caller) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace() without underscore attributes, which could reach interpreter internals."""

    def __init__(*args, **kwargs):  # noqa: N805 — the same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _TemplateNamespace._check_name(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a template source in transformers' environment (cached: servers render one template often).

    Raises FlashMoeError on a Jinja syntax error.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise FlashMoeError(f"{_origin(source)}, line {e.lineno}: {e.message}") from e


def _origin(source: str) -> str:
    """Where a template's source was read, for messages (a ChatTemplate's file; 'chat template' otherwise)."""
    return getattr(source, "origin", "chat template")


def _plain(value: Any) -> Any:
    """Rebuild a value from exact JSON types (str, int, float, bool, None, dict, list, tuple): subclasses
    such as enums carry methods the sandbox does not know; anything else becomes the text '<TypeName>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models, such as the openai client's messages
        return _plain(value.model_dump())
    if callable(getattr(value, "item", None)):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: list) -> list[dict]:
    """Messages as the template sees them: plain dicts without None values, reasoning under every name.

    Raises FlashMoeError when a message is not a mapping.
    """
    out = []
    for i, message in enumerate(messages):
        if callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise FlashMoeError(f"messages[{i}]: a message must be an object, got {type(message).__name__}")
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(template: str | Mapping[str, str] | None, messages: list, *, tools: list[dict] | None = None,
                documents: list[dict] | None = None, add_generation_prompt: bool = False,
                template_name: str | None = None, special_tokens: Mapping[str, str] | None = None,
                **kwargs: Any) -> str:
    """Render a conversation to prompt text, as transformers' `apply_chat_template(..., tokenize=False)`.

    Args:
        template: a template source, or a dict of named templates (see select_template).
        messages: [{"role": ..., "content": ..., optional "tool_calls", "reasoning_content", ...}].
        tools: JSON schemas of the available tools ({"type": "function", "function": {...}}), or None.
        documents: retrieval documents for templates that support them, or None.
        add_generation_prompt: end with the header that starts an assistant reply.
        template_name: which of several named templates to use.
        special_tokens: {"bos_token": "<s>", ...}; keyword arguments with the same names override them.
        **kwargs: further template variables, e.g. enable_thinking=False.

    Returns the rendered text; encode it without adding special tokens.
    Raises FlashMoeError when the conversation is empty, a message is malformed, or the template raises
    (raise_exception) or fails.
    """
    if not messages:
        raise FlashMoeError("cannot render an empty conversation; give at least one message")
    source = select_template(template, template_name, tools)
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(_plain(kwargs))
    messages = normalize_messages(messages)
    if any(_with_argument_text(m) is not m for m in messages) and _joins_argument_text(source):
        messages = [_with_argument_text(m) for m in messages]
    try:
        return compile_template(source).render(
            messages=messages, tools=_plain(tools), documents=_plain(documents),
            add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise FlashMoeError(f"{_origin(source)}: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise FlashMoeError(f"{_origin(source)} failed on these messages: {type(e).__name__}: {e}") from e


def _object_arguments(call) -> bool:
    """Whether a tool call (OpenAI form: {"function": {"name", "arguments"}}) gives its arguments as an object."""
    return isinstance(call, dict) and isinstance(call.get("function"), dict) and \
        isinstance(call["function"].get("arguments"), dict)


def _with_argument_text(message: dict) -> dict:
    """The message with its tool calls' object arguments written as JSON text."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not any(map(_object_arguments, calls)):
        return message
    text = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"],
                                                                         ensure_ascii=False)}}
            if _object_arguments(c) else c for c in calls]
    return {**message, "tool_calls": text}


@lru_cache(maxsize=32)
def _joins_argument_text(source: str) -> bool:
    """Whether the template adds tool-call arguments to strings (DeepSeek-V3.1's writes
    `'<｜tool▁sep｜>' + tool['function']['arguments']`), so that it needs them as JSON text.

    Most templates iterate the arguments or `tojson` them, and flashmoe passes them as objects; transformers
    passes whatever it is given, and such a template fails on objects. Found as llama.cpp's chat-template
    capability probe finds it: one assistant call rendered with object arguments fails, and with the same
    arguments as text succeeds."""
    def renders(arguments) -> bool:
        call = {"type": "function", "id": "call_probe", "function": {"name": "probe", "arguments": arguments}}
        messages = [{"role": "user", "content": "probe"},
                    {"role": "assistant", "content": "", "tool_calls": [call]}]
        try:
            compile_template(source).render(messages=messages, add_generation_prompt=False)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, AttributeError):
            return False
        return True

    return not renders({"city": "Paris"}) and renders('{"city": "Paris"}')


def special_tokens_of(tokenizer_config: Mapping) -> dict[str, str]:
    """The special-token variables transformers passes to templates, from tokenizer_config.json (written
    there either as strings or as AddedToken dicts with a "content" key)."""
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = tokenizer_config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if value is not None:
            out[key] = str(value)
    return out
