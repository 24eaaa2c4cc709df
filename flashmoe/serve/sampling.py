"""Next-token sampling from a logits vector: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The filters are applied in the order llama.cpp and Hugging Face `generate` use: repetition penalty on the
raw logits, then temperature, then top-k, top-p and min-p on the resulting distribution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashmoe.errors import FlashMoeError

#: generation_config.json keys that set sampling (Hugging Face names).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
#: Used where neither the command line nor generation_config.json sets a value (llama.cpp's defaults).
FALLBACK = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.0}
#: Each setting's allowed values: (test, the range in words).
ALLOWED = {"temperature": (lambda v: v >= 0, ">= 0"), "top_k": (lambda v: v >= 0, ">= 0"),
           "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "min_p": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "repetition_penalty": (lambda v: v > 0, "> 0")}


@dataclass
class Sampler:
    """Draws token ids from logits.

    temperature: 0 means greedy (argmax); top_k: 0 disables; top_p: 1.0 disables; min_p: 0 disables
    (keep tokens whose probability is at least min_p times the top token's); repetition_penalty: 1.0
    disables (CTRL paper, Keskar et al. 2019: positive logits of seen tokens are divided by it, negative
    ones multiplied). seed makes sampling reproducible; None or -1 means a fresh random seed (llama.cpp's
    convention for -1).

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
        for name, (ok, allowed) in ALLOWED.items():
            if not ok(getattr(self, name)):  # the setting's name in the API, and its command-line flag
                raise FlashMoeError(f"{name} (--{name.replace('_', '-')}) must be {allowed}, got "
                                    f"{getattr(self, name)}")
        if self.seed is not None and self.seed < -1:
            raise FlashMoeError(f"seed (--seed) must be >= 0, or -1 for a random seed, got {self.seed}")
        self._rng = np.random.default_rng(None if self.seed == -1 else self.seed)

    def __call__(self, logits: np.ndarray, history: np.ndarray | list[int] = ()) -> int:
        """Pick the next token. logits: float [vocab_size]; history: token ids seen so far (prompt included)."""
        logits = np.asarray(logits, dtype=np.float64).copy()
        if self.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[seen < logits.shape[0]]
            vals = logits[seen]
            with np.errstate(over="ignore"):  # a penalty near 0 makes positive logits infinite
                logits[seen] = np.where(vals > 0, vals / self.repetition_penalty, vals * self.repetition_penalty)
        if self.temperature == 0:
            return int(np.argmax(logits))
        # Shifted by the largest logit before the temperature divides: every value is <= 0, so no temperature
        # however small overflows. Logits the penalty made infinite are the largest, tied (inf - inf: NaN -> 0).
        with np.errstate(invalid="ignore", over="ignore"):
            shifted = (logits - logits.max()) / self.temperature
        probs = np.exp(np.nan_to_num(shifted, nan=0.0))
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


def sampling_defaults(model_dir: str | Path) -> dict[str, float]:
    """The sampling settings of the model's generation_config.json (only the keys it sets).

    Raises FlashMoeError naming the file when it exists but cannot be read, and naming the field when a
    setting is not a number (top_k: not a whole number) or out of its range (ALLOWED).
    """
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError) as e:
        raise FlashMoeError(f"{path}: cannot read ({e})") from e
    if not isinstance(config, dict):
        raise FlashMoeError(f"{path}: not a JSON object")
    settings = {k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None}
    for key, value in settings.items():
        whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "top_k" and not whole:
            kind = "a whole number" if key == "top_k" else "a number"
            raise FlashMoeError(f"{path}: field {key!r} must be {kind}, got {value!r}")
        ok, allowed = ALLOWED[key]
        if not ok(value):
            raise FlashMoeError(f"{path}: field {key!r} must be {allowed}, got {value!r}")
    return {k: int(v) if k == "top_k" else float(v) for k, v in settings.items()}


def sampler_for(model_dir: str | Path, seed: int | None = None, **given: float | None) -> Sampler:
    """A Sampler whose settings come from `given` (None = not given), else the model's
    generation_config.json, else FALLBACK — the order transformers' generate and llama.cpp use."""
    settings = {**FALLBACK, **sampling_defaults(model_dir), **{k: v for k, v in given.items() if v is not None}}
    return Sampler(seed=seed, **settings)
