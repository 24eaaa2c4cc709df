"""Engine + Backend.experts_as_read (issue 15, item 2): a decode layer's missing experts reach the backend one at a
time as their reads land (ExpertStore.as_read), and their read buffers go back to the store only at the next
MoE layer or the step's end, after the backend's wait, never while it may still copy from them. A recording
stand-in for the CUDA backend's copies on the bundled model's NumPy engine; the logits are the plain path's."""

from __future__ import annotations

import numpy as np

from flashmoe.backends.base import ExpertsAsRead
from flashmoe.bench.bench_cuda import build_engine
from flashmoe.runtime.load import default_model_dir

TOKENS = [1, 200, 31, 7, 99]


class _Recording(ExpertsAsRead):
    """Keeps the buffers as a GPU's pending copies would read them, and checks at wait() that the store has
    not reused any of them yet."""

    def __init__(self, be, layout, keys, weights, act, log):
        self.be, self.layout, self.keys, self.weights, self.act, self.log = be, layout, keys, weights, act, log
        self.buffers, self.copies = {}, {}

    def put(self, i, buffer):
        self.log.append(("put", self.keys[i]))
        self.buffers[i], self.copies[i] = buffer, buffer.copy()

    def finish(self, x):
        self.log.append(("finish", self.keys[0][0]))
        packed = [self.buffers.get(i) for i in range(len(self.keys))]
        return self.be.packed_experts_ffn(x, packed, self.layout, self.weights, self.keys, self.act)

    def wait(self):
        self.log.append(("wait", self.keys[0][0]))
        for i, buf in self.buffers.items():
            assert np.array_equal(buf, self.copies[i]), f"expert {self.keys[i]}'s buffer was reused before wait"


def _generate(engine, after_prefill=lambda: None, before_token=lambda: None, after_token=lambda: None
              ) -> np.ndarray:
    """The logits of a 2-token prompt and 3 decode tokens, with the callbacks around each forward call."""
    state = engine.new_state()
    logits = [engine.forward(np.array(TOKENS[:2]), state)]
    after_prefill()
    for t in TOKENS[2:]:
        before_token()
        logits.append(engine.forward(np.array([t]), state))
        after_token()
    engine.store.close()
    return np.concatenate(logits)


def test_experts_reach_the_backend_as_read_and_their_buffers_outlive_the_layer_until_its_wait():
    want = _generate(build_engine(default_model_dir(), "numpy"))

    engine = build_engine(default_model_dir(), "numpy")
    store, be, log = engine.store, engine.backend, []
    be.experts_as_read = lambda layout, keys, weights, act=None: _Recording(be, layout, keys, weights, act, log)
    fetch, release, route = store.fetch, store.release, engine._route

    def logged_fetch(layer, ids, in_place=False):
        log.append(("fetch", layer, len(store._live)))
        return fetch(layer, ids, in_place)

    def logged_release(f):
        log.append(("release", f.layer))
        release(f)

    def logged_route(layer, x, k):
        log.append(("route", layer))
        return route(layer, x, k)

    store.fetch, store.release, engine._route = logged_fetch, logged_release, logged_route

    def prefilled():  # prefill takes no experts_as_read
        assert not any(e[0] in ("put", "finish", "wait") for e in log)

    def decoded():
        assert not store._live  # every fetch released by the step's end
        layers, k = engine.model_dir.moe_layers, engine.k
        # per MoE layer: its router, the previous layer's wait and release (after this layer's attention and
        # router, queued behind the previous layer's copies), its fetch (no other fetch alive), its k puts,
        # finish; the last layer's wait and release at the step's end
        expect = []
        for n, layer in enumerate(layers):
            expect += [("route", layer)] + ([("wait", layers[n - 1]), ("release", layers[n - 1])] if n else [])
            expect += [("fetch", layer, 0)] + ["put"] * k + [("finish", layer)]
        expect += [("wait", layers[-1]), ("release", layers[-1])]
        assert [e if e[0] != "put" else "put" for e in log] == expect
        puts = [e[1] for e in log if e[0] == "put"]
        assert [key[0] for key in puts] == [layer for layer in layers for _ in range(k)]

    got = _generate(engine, prefilled, log.clear, decoded)
    np.testing.assert_array_equal(got, want)
