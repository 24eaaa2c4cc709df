"""`flashmoe chat`: an interactive terminal conversation with a model.

The conversation is rendered with the model's chat template every turn; the Session keeps the KV cache
and GatedDeltaNet state of the previous turns, so a turn prefills only its new tokens (the user message
and the template's markup) as long as the template renders the history the way it was generated. When it
does not (Qwen3 and Qwen3.5 drop earlier turns' reasoning), the Session returns to where the previous
prompt's history ended and prefills the previous reply as rendered plus the new message.

Input: a line is a message; a line ending in a backslash continues on the next line; a line of three
double quotes starts and ends a block pasted as is. Commands: /reset, /system [TEXT], /stats, /help, /quit.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from flashmoe.runtime.engine import Engine
from flashmoe.errors import FlashMoeError, Terminated
from flashmoe.serve.sampling import Sampler
from flashmoe.serve.session import ContextError, RunInfo, Session, history_boundary
from flashmoe.serve.tokenizer import Tokenizer, check_text
from flashmoe.serve.chat_template import select_template
from flashmoe.serve.toolcalls import ParsedOutput, reply_parser, tool_call_format

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system [TEXT]  set the system prompt and start over (no TEXT: show it; /system - clears it)
  /stats          time to first token, tok/s, prefix reuse, expert I/O of the last turn and the run
  /help           this text
  /quit           leave (or Ctrl-D)
input: end a line with \\ to continue it; a line of \"\"\" starts and ends a multi-line block; Ctrl-C stops a reply"""


@dataclass
class ChatSession:
    """A conversation with one model: history, system prompt and the reusable model state.

    Args:
        engine, tokenizer: the loaded model.
        sampler: token sampling settings.
        max_tokens: longest reply in tokens (capped by what the context leaves).
        system: system prompt, or None.
        context: longest conversation in tokens (default: the model's max_position_embeddings).
        template_kwargs: extra chat-template variables, e.g. {"enable_thinking": False}.
    """

    engine: Engine
    tokenizer: Tokenizer
    sampler: Sampler
    max_tokens: int = 512
    system: str | None = None
    context: int | None = None
    template_kwargs: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system:
            check_text(self.system, "the system prompt")
        self.session = Session(self.engine, self.tokenizer, self.context)

    def reset(self) -> None:
        """Forget the conversation, the cached state and the last turn's figures."""
        self.messages = []
        self.session.reset()
        self.session.last = RunInfo()

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt; the conversation starts over. Raises TextError (keeping the old prompt)
        for text that is not valid UTF-8."""
        if text:
            check_text(text, "the system prompt")
        self.system = text or None
        self.reset()

    def send(self, text: str, on_delta: Callable[[ParsedOutput], None] | None = None) -> ParsedOutput:
        """Add a user message, generate the reply, add it to the history and return it.

        on_delta receives each new piece of reasoning / content as it is decoded. An interrupted reply
        (KeyboardInterrupt) keeps what was generated so far in the history, then re-raises.

        Raises ContextError when the conversation no longer fits the context (use reset()), TextError when text
        is not valid UTF-8 (naming the character of text).
        """
        check_text(text, "the message")
        system = [{"role": "system", "content": self.system}] if self.system else []
        turn = self.messages + [{"role": "user", "content": text}]
        prompt = self.tokenizer.apply_chat_template(system + turn, add_generation_prompt=True,
                                                    **self.template_kwargs)
        ids = self.tokenizer.encode(prompt)
        context, limit = self.session.context, self.engine.cfg.max_position_embeddings
        room = context - len(ids)
        if room < 1 and self.messages:
            raise ContextError(f"the conversation has {len(ids)} tokens and fills the context of {context}; "
                               "/reset to start over")
        if room < 1:  # the first message alone: /reset would change nothing
            larger = f"; a larger --context helps (the model takes {limit})" if context < limit else ""
            raise ContextError(f"the message has {len(ids)} tokens with the chat template"
                               f"{' and the system prompt' if self.system else ''} and fills the context of "
                               f"{context}{larger}")
        boundary = history_boundary(self.tokenizer, system + turn, ids, **self.template_kwargs)
        parser = reply_parser(tool_call_format(select_template(self.tokenizer.chat_template)), prompt,
                              parse_tools=False)
        reply = ParsedOutput()

        def take(delta: ParsedOutput) -> None:
            if delta:
                reply.extend(delta)
                if on_delta:
                    on_delta(delta)

        try:
            with contextlib.closing(self.session.generate(ids, self.sampler, min(self.max_tokens, room),
                                                          checkpoint_at=boundary)) as steps:
                for step in steps:
                    take(parser.feed(step.text))
            take(parser.finish())
        finally:
            self.messages = turn + [_assistant_message(reply)]
        return reply

    def stats_text(self) -> str:
        """The last turn's figures and the run's engine statistics."""
        last = self.session.last
        if last.prompt_tokens == 0:
            return "last turn: none since the conversation started\n" + self.engine.stats.summary()
        lines = [f"last turn: {last.prompt_tokens} prompt tokens ({last.reused_tokens} reused from the cache), "
                 f"{last.completion_tokens} generated, stop: {last.stop}"]
        if last.ttft_s is not None:
            speed = f"{last.decode_tok_s:.2f} tok/s" if last.decode_tok_s else "n/a"
            lines.append(f"last turn: time to first token {last.ttft_s:.3f} s, decode {speed}")
        lines.append(f"conversation: {len(self.session.tokens)} tokens cached of a {self.session.context} context")
        return "\n".join(lines) + "\n" + self.engine.stats.summary()


def _assistant_message(reply: ParsedOutput) -> dict:
    message = {"role": "assistant", "content": reply.content}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    return message


def read_message(read_line: Callable[[str], str]) -> str:
    """Read one message: continuation lines after a trailing backslash, or a \"\"\" block.

    The end of input inside a block that was never closed, or after a trailing backslash, ends the message:
    what was read is sent, not dropped (input from a pipe or file, or Ctrl-D, ends that way). Raises EOFError
    at the end of input when no line of a message was read.
    """
    line = read_line(">>> ")
    block = line.strip() == '"""'
    lines = [] if block else [line]
    try:
        if block:
            while (line := read_line("... ")).strip() != '"""':
                lines.append(line)
        else:
            while lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
                lines.append(read_line("... "))
    except EOFError:
        if not lines:
            raise
    return "\n".join(lines)


def run_repl(chat: ChatSession, read_line: Callable[[str], str] = input,
             write: Callable[[str], None] | None = None, color: bool | None = None,
             stop_on_error: bool = False) -> None:
    """The interactive loop: read messages and commands until /quit or end of input. A message or command
    that fails (FlashMoeError: text that is not UTF-8, a full context) is an `[error: ...]` line and the loop
    goes on, unless `stop_on_error` (input from a pipe or file, where no one can correct it): then it raises."""
    if read_line is input:
        with contextlib.suppress(ImportError):  # line editing and arrow-key history for input()
            import readline  # noqa: F401
    if write is None:
        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
    dim, plain = ("\033[2m", "\033[0m") if (sys.stdout.isatty() if color is None else color) else ("", "")
    write("flashmoe chat — /help for commands\n")
    while True:
        try:
            text = read_message(read_line)
        except EOFError:
            write("\n")
            return
        except Terminated:
            raise
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt
            write("\n")
            continue
        command, _, arg = text.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            write(HELP + "\n")
        elif command == "/reset":
            chat.reset()
            write("[conversation cleared]\n")
        elif command == "/stats":
            write(chat.stats_text() + "\n")
        elif command == "/system":
            if not arg:
                write(f"[system prompt: {chat.system!r}]\n")
            else:
                try:
                    chat.set_system(None if arg.strip() == "-" else arg.strip())
                    write("[system prompt set; conversation cleared]\n")
                except FlashMoeError as e:
                    _error(e, write, stop_on_error)
        elif command.startswith("/"):
            write(f"[unknown command {command}; /help lists them]\n")
        elif text.strip():
            _reply(chat, text, write, dim, plain, stop_on_error)


def _error(error: FlashMoeError, write: Callable[[str], None], stop: bool) -> None:
    if stop:
        raise error
    write(f"[error: {error}]\n")


def _reply(chat: ChatSession, text: str, write: Callable[[str], None], dim: str, plain: str,
           stop_on_error: bool) -> None:
    shown = {"reasoning": False}

    def show(delta: ParsedOutput) -> None:
        if delta.reasoning:
            write(dim + delta.reasoning + plain)
            shown["reasoning"] = True
        if delta.content:
            if shown["reasoning"]:
                write("\n\n")
                shown["reasoning"] = False
            write(delta.content)

    try:
        chat.send(text, show)
    except Terminated:
        raise
    except KeyboardInterrupt:
        write(" [stopped]")
    except FlashMoeError as e:
        _error(e, write, stop_on_error)
        return
    write("\n")
