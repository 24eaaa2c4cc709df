"""Next-token sampling from a logits vector: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The filters are applied in the order llama.cpp and Hugging Face `generate` use: repetition penalty on the
raw logits, then temperature, then top-k, top-p and min-p on the resulting distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flashmoe.errors import FlashMoeError


@dataclass
class Sampler:
    """Draws token ids from logits.

    temperature: 0 means greedy (argmax); top_k: 0 disables; top_p: 1.0 disables; min_p: 0 disables
    (keep tokens whose probability is at least min_p times the top token's); repetition_penalty: 1.0
    disables (CTRL paper, Keskar et al. 2019: positive logits of seen tokens are divided by it, negative
    ones multiplied). seed makes sampling reproducible.

    Raises FlashMoeError for out-of-range settings.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise FlashMoeError(message)
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray, history: np.ndarray | list[int] = ()) -> int:
        """Pick the next token. logits: float [vocab_size]; history: token ids seen so far (prompt included)."""
        logits = np.asarray(logits, dtype=np.float64).copy()
        if self.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[seen < logits.shape[0]]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / self.repetition_penalty, vals * self.repetition_penalty)
        if self.temperature == 0:
            return int(np.argmax(logits))
        logits /= self.temperature
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        keep = np.ones_like(sorted_probs, dtype=bool)
        if self.top_k:
            keep[self.top_k :] = False
        if self.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
            before = np.cumsum(sorted_probs) - sorted_probs
            keep &= before < self.top_p
        if self.min_p > 0:
            keep &= sorted_probs >= self.min_p * sorted_probs[0]
        kept = np.where(keep, sorted_probs, 0.0)
        kept /= kept.sum()
        return int(order[self._rng.choice(len(kept), p=kept)])
