"""A decode step of the CUDA backend recorded once as a CUDA graph and replayed for every later token.

A decode token of Qwen3-30B-A3B is ~800 launches of small kernels; through Python each costs tens of
microseconds of host time, several times the GPU's own work (docs/benchmarks.md, issue 15). Stream capture
records the launches of one eager step into a graph (cuda.core's GraphBuilder); a replay is one launch. What
changes from token to token is read from device memory: the token id and position (the graph's two inputs,
copied up before each replay), the KV cache length (the position), the routed experts (chosen on the GPU,
``CudaBackend.routed_experts``). Everything else a graph bakes in (the addresses of weights, activations, KV
caches and the expert tier's slot tables) must stay put while it is replayed: the activation blocks allocated
during the capture are kept for the graph (cuda_arrays.CAPTURE), the engine re-captures when a KV cache moves,
and :meth:`DecodeGraph.valid` turns false once the expert tier evicts.

A capture refuses (cuda_arrays.CaptureError) anything a replay would not redo: copies to or from the host (a
router on the host, an upload of token ids), launches through numba's own path. The step then runs eagerly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
from numba import cuda

from flashmoe.backends import cuda_arrays as A
from flashmoe.backends.cuda_arrays import DeviceArray, flat_view
from flashmoe.backends.cuda_staging import ExpertStaging


class DecodeGraph:
    """One decode step as an executable CUDA graph: :meth:`replay` runs it for a token at a position and returns
    its logits (the same device array every time, overwritten by each replay)."""

    def __init__(self, graph: Any, logits: DeviceArray, capture: A._Capture, inputs: Any, staging: ExpertStaging,
                 routed: list, tier: tuple) -> None:
        self._graph, self.logits, self._capture, self._inputs = graph, logits, capture, inputs
        self._pinned = cuda.pinned_array(2, np.int64)  # [token id, position], copied up before each replay
        self._staging, self._routed, self._tier = staging, routed, tier

    def valid(self) -> bool:
        """Whether the expert tier still has the slots the graph read (no eviction, same tier)."""
        return self._staging.tier_version() == self._tier

    def replay(self, token: int, position: int) -> DeviceArray:
        """Run the captured step for `token` at `position` (ints); -> logits ``[1, vocab]``, valid until the
        next replay. The experts the GPU routes to are counted as tier hits at the next settle."""
        self._staging.settle()  # the previous replay's chosen ids: its ring entries are about to be rewritten
        self._pinned[0], self._pinned[1] = token, position
        self._inputs.copy_to_device(self._pinned, stream=cuda.legacy_default_stream())
        self._graph.launch(A.core_stream())
        A.LAUNCHES[0] += 1
        self._staging.replayed(self._routed)
        return self.logits


def capture_decode(step: Callable[[], DeviceArray], staging: ExpertStaging) -> DecodeGraph:
    """Record `step` (one decode token's launches, returning its logits) as a DecodeGraph. The step runs on the
    host once, with that token's side effects on the host (the caller restores them); nothing is computed.
    Raises CaptureError (cuda_arrays) when the step needs the host mid-way; the capture is then abandoned."""
    from cuda.core import Device, StreamOptions

    staging.settle()  # the routed-id ring starts empty: the capture's entries are the replays' entries
    inputs = cuda.device_array(2, np.int64)
    try:
        device = Device(cuda.get_current_device().id)
        device.set_current()
        # A blocking stream: work queued on the default stream during the capture fails it instead of running
        # outside the graph unnoticed.
        builder = device.create_stream(options=StreamOptions(nonblocking=False)).create_graph_builder()
        cuda.synchronize()
        builder.begin_building("relaxed")  # relaxed: the caching allocator may call cuMemAlloc meanwhile
    except Exception as e:  # this cuda.core or driver cannot capture: decode runs eagerly, and says why
        raise A.CaptureError(f"no CUDA graph capture here: {type(e).__name__}: {e}") from e
    capture = A._Capture(flat_view(inputs, 0, 1), flat_view(inputs, 1, 2), builder)
    A.CAPTURE.active = capture
    try:
        logits = step()
    except BaseException:
        A.CAPTURE.active = None
        staging.take_pending()
        with contextlib.suppress(Exception):  # the step's own error is the one to report
            builder.end_building()
        raise
    A.CAPTURE.active = None
    routed = staging.take_pending()
    try:
        graph = builder.end_building().complete()
    except Exception as e:  # e.g. the capture was invalidated by work outside it
        raise A.CaptureError(f"the CUDA graph could not be completed: {type(e).__name__}: {e}") from e
    return DecodeGraph(graph, logits, capture, inputs, staging, routed, staging.tier_version())
