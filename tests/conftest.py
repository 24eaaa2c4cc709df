"""Shared fixtures: tiny Hugging Face checkpoints, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import checkpoints`

from checkpoints import build_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Callable[[str, str], Path]:
    """hf_checkpoint(arch, variant) -> directory with config.json + model.safetensors (built on first use)."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, variant: str) -> Path:
        if (arch, variant) not in built:
            built[(arch, variant)] = build_hf_checkpoint(arch, variant, root / f"{arch}-{variant}")
        return built[(arch, variant)]

    return get
