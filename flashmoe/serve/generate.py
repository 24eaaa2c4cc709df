"""The generation loop: prefill the prompt, then decode token by token until an end-of-sequence id, the
token limit or the end of the model's context, streaming text as it becomes printable."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.runtime.engine import Engine, State
from flashmoe.errors import FlashMoeError
from flashmoe.serve.sampling import Sampler
from flashmoe.serve.tokenizer import StreamDecoder, Tokenizer

# Why generation stopped: one vocabulary from this loop to sessions, chat, the CLI and statistics
# (docs/design.md, "Why generation stops"). The servers translate it into their wire's words (OpenAI's
# finish_reason, Anthropic's stop_reason) only where they write a response.
EOS = "eos"  # an end-of-sequence token
STOP_STRING = "stop_string"  # a stop string the caller gave (sessions)
LENGTH = "length"  # max_tokens reached
CONTEXT = "context"  # the model's context (max_position_embeddings) is full
CANCELLED = "cancelled"  # the consumer stopped early: a client went away, Ctrl-C
STOP_REASONS = (EOS, STOP_STRING, LENGTH, CONTEXT, CANCELLED)


@dataclass
class Step:
    """One generated token: its id, the text it made printable (may be empty) and, on the last step only,
    why generation stopped: EOS (an end-of-sequence token, this one), LENGTH (max_tokens reached) or
    CONTEXT (the model's context, max_position_embeddings, is full)."""

    token_id: int
    text: str
    stop: str | None = None


def check_context(cfg: ModelConfig, n_prompt: int) -> None:
    """Raise FlashMoeError when the prompt is empty or leaves no room in the model's context
    (max_position_embeddings) for even one generated token."""
    limit = cfg.max_position_embeddings
    if n_prompt == 0:
        raise FlashMoeError("the prompt is empty after tokenisation")
    if n_prompt >= limit:
        fits = "fills" if n_prompt == limit else "is longer than"
        raise FlashMoeError(f"the prompt has {n_prompt} tokens, which {fits} the model's context of {limit} "
                            "(max_position_embeddings in config.json) and leaves no room to generate")


def generate_steps(engine: Engine, tokenizer: Tokenizer, prompt_ids: list[int], sampler: Sampler,
                   max_tokens: int, state: State | None = None, started: bool = False) -> Iterator[Step]:
    """Yield generated tokens one at a time.

    Prefill runs the whole prompt as one batch; decode stops at any of tokenizer.eos_token_ids (the EOS token
    is yielded with no text of its own), after max_tokens tokens, or at the end of the model's context; the
    last Step says which (Step.stop) and carries any bytes of an unfinished character as U+FFFD
    (StreamDecoder.flush). Time to first token and per-token decode times are recorded in engine.stats;
    `started` says the caller already called engine.stats.start() for this run, before prefill work of its
    own (Session's split prefill), so time to first token counts from there.

    Raises FlashMoeError when the prompt does not fit the context.
    """
    check_context(engine.cfg, len(prompt_ids))
    state = state or engine.new_state()
    stats = engine.stats
    history = list(prompt_ids)
    decoder = StreamDecoder(tokenizer)
    limit = min(max_tokens, engine.cfg.max_position_embeddings - len(prompt_ids))
    if not started:
        stats.start()
    try:
        logits = engine.forward(np.asarray(prompt_ids), state)
        for i in range(limit):
            token = sampler(logits[-1], history)
            history.append(token)
            stats.token_done()
            if token in tokenizer.eos_token_ids:
                yield Step(token, decoder.flush(), EOS)
                return
            stop = None if i < limit - 1 else LENGTH if limit == max_tokens else CONTEXT
            yield Step(token, decoder.push(token) + (decoder.flush() if stop else ""), stop)
            if stop is None:  # the last token's logits would never be used: no forward (its expert reads) for it
                logits = engine.forward(np.asarray([token]), state)
    finally:
        # An interrupt between a fetch and its release must not leave read buffers pinned.
        engine.store.release_all()

