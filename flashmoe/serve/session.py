"""A conversation's model state kept between turns: prefix reuse, context checks and stop strings.

`Session.generate` compares the new prompt's token ids with the tokens the state has already consumed and
prefills only what it must:

- a prompt that strictly extends them (last prompt + reply + new turn) continues the state;
- otherwise, for a model whose layers are all full attention, the KV caches are cut back to the longest
  common prefix (keys and values of earlier positions do not depend on later tokens);
- a GatedDeltaNet layer folds every token into a fixed-size recurrent state that cannot be cut back, so a
  hybrid model (Qwen3.5, Qwen3-Next) returns instead to a checkpoint: a copy of its linear-attention states
  taken at a position the caller names (`checkpoint_at`, typically where the conversation's history ends and
  the generation prompt begins: templates that re-render earlier replies differently, e.g. without their
  reasoning, diverge after that point); its KV caches are cut back to the same position;
- anything else starts from a fresh state.

Used by `flashmoe chat` (one user) and `flashmoe serve` (requests one at a time, from one worker thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from flashmoe.runtime.engine import Engine, KVCacheBuffer, LinearAttentionBuffer, State
from flashmoe.errors import FlashMoeError
from flashmoe.serve.generate import CANCELLED, EOS, LENGTH, STOP_STRING, Step, generate_steps
from flashmoe.serve.sampling import Sampler
from flashmoe.serve.tokenizer import Tokenizer


class ContextError(FlashMoeError):
    """The prompt plus the requested completion does not fit the context. `field` is what to change:
    'prompt' (empty, or too long to leave a token for the completion) or 'max_tokens' (the prompt fits, the
    completion asked for does not)."""

    def __init__(self, message: str, field: str = "prompt"):
        super().__init__(message)
        self.field = field


@dataclass
class RunInfo:
    """What one generate() call did. Times in seconds; tokens counted in token ids."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens already in the state (not prefilled again)
    completion_tokens: int = 0
    stop: str | None = None  # why the run ended (serve.generate.STOP_REASONS); None until it has
    stop_sequence: str | None = None  # the stop string that ended the reply, if one did
    ttft_s: float | None = None
    decode_s: float = 0.0

    @property
    def decode_tok_s(self) -> float | None:
        """Decode speed over tokens 2..n (the first carries prefill)."""
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "reused_tokens": self.reused_tokens,
                "completion_tokens": self.completion_tokens, "stop": self.stop,
                "ttft_s": self.ttft_s, "decode_tok_s": self.decode_tok_s}


class StopMatcher:
    """Cuts streamed text at the first occurrence of any stop string (OpenAI `stop`).

    Text that could be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped: str | None = None  # the stop string found, once one is

    def feed(self, text: str) -> str:
        """Add generated text; return what can be released. After a stop string, `stopped` is that string
        and nothing more is released."""
        if self.stopped:
            return ""
        text = self._held + text
        hits = [(i, s) for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            at, self.stopped = min(hits)
            self._held = ""
            return text[:at]
        keep = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """End of generation: release held text (it did not become a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


@dataclass
class Session:
    """One sequence's state plus the token ids it has consumed.

    Args:
        engine: the loaded model.
        tokenizer: its tokenizer (end-of-sequence ids, detokenisation).
        context: the longest sequence, in tokens, a prompt plus its completion may reach; None means the
            model's max_position_embeddings (a larger value is capped to it).
    """

    engine: Engine
    tokenizer: Tokenizer
    context: int | None = None
    tokens: list[int] = field(default_factory=list)
    state: State | None = None
    last: RunInfo = field(default_factory=RunInfo)
    _checkpoint: "_Checkpoint | None" = field(default=None, repr=False)

    def __post_init__(self) -> None:
        limit = self.engine.cfg.max_position_embeddings
        self.context = min(self.context or limit, limit)

    def reset(self) -> None:
        """Forget the cached state and checkpoint; the next prompt is prefilled from scratch."""
        self.tokens, self.state, self._checkpoint = [], None, None

    def check_fits(self, n_prompt: int, max_tokens: int | None) -> int:
        """Return the completion budget: max_tokens, or all the room left when it is None.

        Raises ContextError (its `field` says which to change) when the prompt is empty, leaves no room for
        a completion, or prompt + max_tokens exceeds the context.
        """
        if n_prompt == 0:
            raise ContextError("the prompt is empty after tokenisation")
        if n_prompt >= self.context:  # whatever max_tokens: only a shorter prompt fits
            raise ContextError(f"the prompt has {n_prompt} tokens; the context is {self.context} tokens, "
                               "which leaves no room for a completion: shorten the prompt")
        if max_tokens is None:
            return self.context - n_prompt
        if n_prompt + max_tokens > self.context:
            raise ContextError(f"the context is {self.context} tokens, but {n_prompt + max_tokens} were "
                               f"requested ({n_prompt} in the prompt, {max_tokens} for the completion); lower "
                               f"max_tokens to at most {self.context - n_prompt} or shorten the prompt",
                               field="max_tokens")
        return max_tokens

    def _rewind(self, prompt_ids: Sequence[int]) -> int:
        """Bring the state to the longest reusable prefix of prompt_ids (see the module docstring) and
        return its length; 0 means a fresh state was made. At least one prompt token is always left to
        prefill (it yields the first logits)."""
        state, n = self.state, len(self.tokens)
        if state is not None and 0 < n < len(prompt_ids) and list(prompt_ids[:n]) == self.tokens:
            return n
        if state is not None and all(isinstance(layer, KVCacheBuffer) for layer in state.layers):
            common = _common_prefix(self.tokens, prompt_ids, len(prompt_ids) - 1)
            if common:
                self._cut(common)
                return common
        cp = self._checkpoint
        if state is not None and cp is not None and len(cp.tokens) < len(prompt_ids) and \
                list(prompt_ids[: len(cp.tokens)]) == cp.tokens:
            for i, saved in cp.linear.items():
                state.layers[i].conv, state.layers[i].recurrent = (a.copy() for a in saved)
            self._cut(len(cp.tokens))
            self.tokens = list(cp.tokens)
            return len(cp.tokens)
        self.reset()
        self.state = self.engine.new_state()
        return 0

    def _cut(self, n: int) -> None:
        """Cut the KV caches and token list back to the first n positions."""
        for layer in self.state.layers:
            if isinstance(layer, KVCacheBuffer):
                layer.length = n
        self.state.position = n
        self.tokens = self.tokens[:n]

    def _save_checkpoint(self) -> None:
        """Remember the linear-attention states at the current position (hybrid models only)."""
        to_numpy = self.engine.backend.to_numpy
        linear = {i: (np.array(to_numpy(layer.conv)), np.array(to_numpy(layer.recurrent)))
                  for i, layer in enumerate(self.state.layers) if isinstance(layer, LinearAttentionBuffer)}
        if linear and all(isinstance(layer, (KVCacheBuffer, LinearAttentionBuffer)) for layer in self.state.layers):
            self._checkpoint = _Checkpoint(list(self.tokens), linear)

    def _prefill_to_checkpoint(self, prompt_ids: Sequence[int], reused: int, checkpoint_at: int | None) -> int:
        """Prefill prompt_ids[reused:checkpoint_at] and save the linear-attention states there, when the model
        has such layers and reused <= checkpoint_at < len(prompt_ids); return where the rest of the prefill
        starts (checkpoint_at, else reused)."""
        state = self.state
        hybrid = any(isinstance(layer, LinearAttentionBuffer) for layer in state.layers)
        if not (hybrid and checkpoint_at is not None and reused <= checkpoint_at < len(prompt_ids)):
            return reused
        try:
            if checkpoint_at > reused:
                self.engine.forward(np.asarray(prompt_ids[reused:checkpoint_at]), state)
        except BaseException:  # as in generate's token loop: the state may be half-updated
            self.engine.store.release_all()
            self.reset()
            raise
        self.tokens = list(prompt_ids[:checkpoint_at])
        self._save_checkpoint()
        return checkpoint_at

    def generate(self, prompt_ids: Sequence[int], sampler: Sampler, max_tokens: int | None,
                 stop: Sequence[str] = (), cancel: threading.Event | None = None,
                 checkpoint_at: int | None = None) -> Iterator[Step]:
        """Generate a continuation of prompt_ids, reusing as much of the cached state as is valid.

        checkpoint_at: a prompt position (tokens) at which to save the linear-attention states, for a later
        prompt that shares only the first checkpoint_at tokens (history_boundary gives the usual one); the
        prefill is then split there. Ignored for models without linear-attention layers, which rewind to
        any common prefix.

        Yields one Step per generated token except the end-of-sequence token and the token that completes
        a stop string when it adds no text before it; the text is already cut at a stop string (a stop
        string itself is never yielded; text that may start one is held back until it cannot).
        Ends at an end-of-sequence token, a stop string, max_tokens, or when `cancel` is set (checked
        after every token). `self.last` describes the run when the iterator is exhausted or closed.

        Raises ContextError when prompt + max_tokens exceeds the context. When the engine raises, the
        state is dropped (it may be half-updated) and the error propagates.
        """
        max_tokens = self.check_fits(len(prompt_ids), max_tokens)
        t0 = t_first = time.perf_counter()
        self.engine.stats.start()  # the engine's time to first token counts from here too: rewind and split prefill
        reused = self._rewind(prompt_ids)
        state = self.state
        consumed = list(prompt_ids)
        info = RunInfo(prompt_tokens=len(prompt_ids), reused_tokens=reused)
        self.last = info
        stopper = StopMatcher(stop)
        start = self._prefill_to_checkpoint(prompt_ids, reused, checkpoint_at)
        steps = generate_steps(self.engine, self.tokenizer, list(prompt_ids[start:]), sampler, max_tokens, state,
                               started=True)
        info.stop = LENGTH
        try:
            for step in steps:
                now = time.perf_counter()
                if info.ttft_s is None:
                    info.ttft_s, t_first = now - t0, now
                info.decode_s = now - t_first
                info.completion_tokens += 1
                consumed.append(step.token_id)
                if step.stop is not None:  # the loop's last step: EOS, LENGTH or CONTEXT
                    info.stop = step.stop
                text = stopper.feed(step.text)  # EOS's step: only an unfinished character's U+FFFD
                if step.stop == EOS:
                    if text:
                        yield Step(step.token_id, text)
                    break
                if text or not stopper.stopped:
                    yield Step(step.token_id, text)
                if stopper.stopped:
                    info.stop, info.stop_sequence = STOP_STRING, stopper.stopped
                    break
                if cancel is not None and cancel.is_set():
                    info.stop = CANCELLED
                    break
            tail = stopper.flush()  # text held as a possible stop string that the reply ended inside
            if tail:
                yield Step(consumed[-1], tail)
        except GeneratorExit:  # the consumer stopped between tokens: the state is consistent
            info.stop = CANCELLED
            raise
        except BaseException as e:  # inside forward (an error, Ctrl-C): layers may be half-updated
            if isinstance(e, KeyboardInterrupt):
                info.stop = CANCELLED
            self.reset()
            raise
        finally:
            steps.close()
            if self.state is state:
                # The state consumed exactly the first `position` tokens of prompt + completion.
                self.tokens = consumed[: state.position]


@dataclass
class _Checkpoint:
    """Linear-attention states (conv, recurrent) by layer index, after the first len(tokens) tokens."""

    tokens: list[int]
    linear: dict[int, tuple[np.ndarray, np.ndarray]]


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most limit."""
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


def history_boundary(tokenizer: Tokenizer, messages: list[dict], prompt_ids: Sequence[int], **template_kwargs) -> int | None:
    """Where a chat prompt's history ends and its generation prompt begins, in tokens: the length of the
    conversation rendered without the generation prompt, when those tokens are a prefix of prompt_ids
    (None otherwise, or when the conversation does not end with a user message: after a tool result the
    next request usually extends the prompt and needs no checkpoint, and the one at the last user message
    stays the useful one).
    """
    if not messages or messages[-1].get("role") != "user":
        return None
    history = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False, **template_kwargs))
    n = len(history)
    return n if 0 < n < len(prompt_ids) and list(prompt_ids[:n]) == history else None
