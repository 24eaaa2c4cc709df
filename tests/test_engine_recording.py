"""Decode steps replayed from a recording (Engine + Backend.capture_decode), checked on the host.

On a GPU the recording is a CUDA graph (conformance/test_cuda_backend.py checks it there); here a stand-in
recording replays by running the step again and then leaving the state as a graph leaves it (untouched), so
the engine's side is checked on every machine: when it records, what it restores after recording, what it
advances after each replay, and that a refused recording leaves the step to run eagerly.
"""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.backends.base import BackendError
from flashmoe.backends.numpy_backend import NumpyBackend
from flashmoe.conformance.model_cases import TINY_CONFIGS
from flashmoe.convert.synth import synth_model
from flashmoe.runtime.load import load_engine

PROMPT, DECODE = [5, 17], [9, 30, 2, 41, 7]


class _Replay:
    """Stands in for a CUDA graph of one decode step: computes the step for any token, touching no host state."""

    def __init__(self, engine, state):
        self.engine, self.state = engine, state

    def valid(self) -> bool:
        return True

    def replay(self, token: int, position: int):
        assert position == self.state.position
        lengths = [cache.length for cache in self.state.layers]
        logits = self.engine._step(np.array([token]), self.state, False)
        self.state.position = position
        for cache, n in zip(self.state.layers, lengths):
            cache.length = n
        return logits


class _RecordingNumpy(NumpyBackend):
    """The NumPy backend with a capture_decode that runs the step once (as a capture does) and then records
    a _Replay for `self.target` (engine, state), or refuses."""

    def __init__(self, refuse: bool):
        super().__init__()
        self.refuse, self.attempts, self.target = refuse, 0, None

    def capture_decode(self, step):
        self.attempts += 1
        step()
        if self.refuse:
            raise BackendError("no recording here")
        return _Replay(*self.target)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("rec") / "tiny", TINY_CONFIGS["qwen3_moe"], bits=4, group_size=32,
                       seed=3)


def _decode(engine, state) -> np.ndarray:
    out = [engine.forward(np.array(PROMPT), state)]
    return np.concatenate(out + [engine.forward(np.array([t]), state) for t in DECODE])


@pytest.mark.parametrize("refuse", [False, True])
def test_recorded_decode_steps_give_the_eager_logits_and_advance_the_state(model, refuse):
    """Replays give the eager engine's logits bit for bit, the position and cache lengths advance once per
    token; a refused recording is asked for once per state and the steps run eagerly, saying why."""
    plain = load_engine(model, backend="numpy", context=64)
    want = _decode(plain, plain.new_state())
    engine = load_engine(model, backend="numpy", context=64)
    engine.backend = be = _RecordingNumpy(refuse)
    state = engine.new_state()
    be.target = (engine, state)
    got = _decode(engine, state)
    np.testing.assert_array_equal(got, want)
    n = len(PROMPT) + len(DECODE)
    assert state.position == n and all(cache.length == n for cache in state.layers)
    assert be.attempts == 1  # at the second decode token; refused once, not asked again for this state
    assert engine._recording[0] is state and (engine._recording[1] is None) == refuse
    assert engine.not_recorded == ("no recording here" if refuse else None)
    other = engine.new_state()  # a new state is recorded again (or tried again)
    be.target = (engine, other)
    np.testing.assert_array_equal(_decode(engine, other), want)
    assert be.attempts == 2 and engine._recording[0] is other


def test_the_first_decode_step_collects_garbage_once_per_backend(model, monkeypatch):
    """After the first eager decode step (its kernels compiled) the engine has CPython make a full
    collection, once per backend in the process: not after the prompt, not again for later steps or
    engines, so the collection that compiling makes due does not land in a later, recorded step."""
    import gc

    from flashmoe.runtime import memory

    calls = []
    monkeypatch.setattr(memory, "_COLLECTED_FOR", set())
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    engine = load_engine(model, backend="numpy", context=64)
    state = engine.new_state()
    engine.forward(np.array(PROMPT), state)
    assert calls == []
    engine.forward(np.array(DECODE[:1]), state)
    assert calls == [()]
    engine.forward(np.array(DECODE[1:2]), state)
    again = load_engine(model, backend="numpy", context=64)
    _decode(again, again.new_state())
    assert calls == [()]
