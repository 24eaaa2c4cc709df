"""--expert-device (flashmoe.runtime.placement): the choice between computing a decode token's missing experts
on the GPU or on the CPU, from the rates it measures."""

from __future__ import annotations

import pytest

from flashmoe.backends import get_backend
from flashmoe.errors import FlashMoeError
from flashmoe.runtime.placement import EXPLORE_EVERY, ExpertPlacement


def test_gpu_needs_no_placement_and_bad_choices_are_refused():
    numpy = get_backend("numpy")
    assert ExpertPlacement.of("gpu", numpy) is None
    with pytest.raises(FlashMoeError, match="--expert-device 'fast' is not one of gpu, cpu, auto"):
        ExpertPlacement.of("fast", numpy)
    with pytest.raises(FlashMoeError, match="numpy computes them in host memory already"):
        ExpertPlacement.of("cpu", numpy)


def test_auto_tries_each_way_then_takes_the_cheaper_and_looks_at_the_other_now_and_then():
    p = ExpertPlacement("auto", cpu=None)
    cost = {False: 2.0, True: 1.0}  # seconds per token of 1 byte: the CPU is cheaper
    ways = []
    for _ in range(2 * EXPLORE_EVERY):
        way = p.on_cpu()
        ways.append(way)
        p.measured(way, 1, cost[way] * (100.0 if len(ways) in (1, 3) else 1.0))  # first of each: a compile
    assert ways[:4] == [False, False, True, True]  # the first token of each way is not counted
    assert p.seconds_per_byte == {False: 2.0, True: 1.0}
    assert ways.count(False) == 2 + 2  # the two tries, then once per EXPLORE_EVERY tokens
    assert p.tokens == {False: 4, True: 2 * EXPLORE_EVERY - 4}


def test_cpu_always_takes_the_cpu():
    p = ExpertPlacement("cpu", cpu=None)
    assert all(p.on_cpu() for _ in range(3))
