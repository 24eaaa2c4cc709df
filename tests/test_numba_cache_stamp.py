"""numba's disk cache of the backend's kernels goes stale with any module a kernel is compiled from
(backends/numba_cache.py), not only with the kernel's own file. No kernel runs here, so this file does not wait
for the conformance gate's compilation (it is not marked numba)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("numba", reason="the numba backend needs numba")


def test_a_kernel_is_stale_when_a_module_it_is_compiled_from_changes(tmp_path, monkeypatch):
    """numba stamps a cached kernel with its own file only; numba_q8's kernels inline numba_x86's row kernels,
    so the stamp (numba_cache.cached_njit) covers numba_x86.py too: a changed copy of it changes the stamp of
    numba_q8's kernels, and only the stamp's own part for that file."""
    from flashmoe.backends import numba_cache, numba_norms, numba_q8, numba_x86

    sources = numba_cache.kernel_sources("flashmoe.backends.numba_q8")
    names = {p.name for p in sources}
    assert {"numba_q8.py", "numba_x86.py", "numba_packed.py", "q8.py", "mxfp4.py"} <= names
    assert "engine.py" not in names and "base.py" not in names  # only what the kernels import
    for kernel in (numba_q8.quantize_q8, numba_q8.q8_kernels(4, "f32", "natural").matvecs, numba_norms.rms_norm):
        assert isinstance(kernel._cache, numba_cache.KernelCache)
    locator = numba_q8.quantize_q8._cache._impl.locator
    before = locator.get_source_stamp()
    assert locator.get_source_stamp() == before  # stable, so an unchanged checkout hits its cache
    copy = tmp_path / "numba_x86.py"
    copy.write_text(open(numba_x86.__file__).read())
    moved = [copy if p.name == "numba_x86.py" else p for p in sources]
    monkeypatch.setattr(numba_cache, "kernel_sources", lambda module: moved)
    assert locator.get_source_stamp() == before  # same contents elsewhere: same stamp
    copy.write_text(copy.read_text() + "\n# an edit\n")
    after = locator.get_source_stamp()
    assert after[0] == before[0]  # numba's own stamp (numba_q8.py) did not see it
    changed = [a for a, b in zip(after[1], before[1]) if a != b]
    assert [name for name, _ in changed] == ["numba_x86.py"]
