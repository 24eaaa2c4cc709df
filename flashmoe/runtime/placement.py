"""Where a decode token's missing experts are computed: ``--expert-device gpu|cpu|auto`` (issue 15, item 3).

An expert that a GPU backend does not hold in its own memory (the VRAM tier) is either read into a pinned
host buffer, crosses PCIe and runs on the GPU with the experts the GPU holds ('gpu', the default), or runs
on the CPU where it lies, with numba's kernels, while the GPU computes the experts it holds ('cpu'): the
placement of llama.cpp's ``--n-cpu-moe``, KTransformers and Fiddler (Kamahori et al. 2024), which copy no
expert at all. The CPU way computes an expert the page cache holds on the expert file's mapping (the store's
``in_place``), so it is not read either; the others are read into buffers. The engine joins the two
weighted sums.

'auto' chooses per token from rates measured in this process: for each way, the seconds per byte of the
missing experts it took (from the fetch to their weighted sum: the reads, and the GPU's copies or numba's
call and the upload of its sum), an exponential average over the tokens that took it, leaving out those
that read from the disk: both ways wait for the disk alike there, and a way timed only on a cold page cache
would look slower than the other for good.
The first token of each way is not counted (it compiles numba's kernels or fills a staging buffer). A way
not yet measured is tried; after that the cheaper one runs, and every :data:`EXPLORE_EVERY` tokens the other
runs once, so that a rate that changes (page cache, load from other processes) is seen.
"""

from __future__ import annotations

from flashmoe.backends import get_backend
from flashmoe.backends.base import Backend
from flashmoe.errors import FlashMoeError

DEVICES = ("gpu", "cpu", "auto")
EXPLORE_EVERY = 64  # tokens between two runs of the way 'auto' does not prefer
SMOOTHING = 0.25  # weight of the newest token in a way's average seconds per byte


class ExpertPlacement:
    """Per decode token: whether the experts the GPU backend does not hold run on the CPU (:meth:`on_cpu`);
    :meth:`measured` feeds back each token's time. ``cpu`` is the numba backend that computes them there."""

    def __init__(self, mode: str, cpu: Backend) -> None:
        self.mode = mode
        self.cpu = cpu
        self.seconds_per_byte: dict[bool, float] = {}  # on_cpu -> average, once measured
        self._seen: set[bool] = set()  # ways that ran their first (uncounted) token
        self._tokens = 0
        #: tokens whose missing experts ran each way (False: the GPU's, True: the CPU's)
        self.tokens: dict[bool, int] = {False: 0, True: 0}

    @classmethod
    def of(cls, mode: str, backend: Backend, activations: str | None = None) -> "ExpertPlacement | None":
        """The placement for ``--expert-device mode`` on ``backend``; None for 'gpu' (nothing to choose). Its CPU
        way computes with numba's ``activations``: 'float' unless given (what the GPU computes), or 'q8' (int8
        activations, as numba's own default where the CPU has int8 dot instructions: faster, and within the
        q8 conformance tolerances of the reference rather than float's).
        Raises FlashMoeError for an unknown mode, 'cpu'/'auto' on a backend that computes experts in host
        memory already, or an activation mode numba does not compute (BackendError)."""
        if mode not in DEVICES:
            raise FlashMoeError(f"--expert-device {mode!r} is not one of {', '.join(DEVICES)}")
        if mode == "gpu":
            return None
        if backend.experts_in_place:
            raise FlashMoeError(f"--expert-device {mode} needs a backend that computes experts in its own "
                                f"memory (cuda); {backend.name} computes them in host memory already")
        return cls(mode, get_backend("numba", activations or "float"))

    def on_cpu(self) -> bool:
        """Whether this token's missing experts run on the CPU."""
        if self.mode == "cpu":
            return True
        self._tokens += 1
        for way in (False, True):
            if way not in self.seconds_per_byte:
                return way
        best = self.seconds_per_byte[True] < self.seconds_per_byte[False]
        return (not best) if self._tokens % EXPLORE_EVERY == 0 else best

    def measured(self, on_cpu: bool, nbytes: int, seconds: float, from_disk: bool = False) -> None:
        """One token's missing experts (``nbytes`` of them) took ``seconds`` of the host's time the way
        ``on_cpu`` says; ``from_disk``: some of them were read from the disk (not counted in the rates)."""
        self.tokens[on_cpu] += 1
        if on_cpu not in self._seen:
            self._seen.add(on_cpu)
            return
        if from_disk:
            return
        rate = seconds / max(nbytes, 1)
        old = self.seconds_per_byte.get(on_cpu)
        self.seconds_per_byte[on_cpu] = rate if old is None else old + SMOOTHING * (rate - old)
