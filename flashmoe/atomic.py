"""Atomic output: write to a temporary name beside the target, rename only when complete, so a failed or
interrupted run never leaves a partial file that looks finished."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flashmoe.errors import FlashMoeError


def check_writable(target: str | Path) -> None:
    """Raise FlashMoeError, before any work is done, when target cannot be written: its folder is missing
    or it is a directory."""
    target = Path(target)
    if target.is_dir():
        raise FlashMoeError(f"{target}: is a directory, not a file to write")
    if not target.parent.is_dir():
        raise FlashMoeError(f"{target}: folder {target.parent} does not exist")


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in target's directory; on normal exit rename it to target, else delete it."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        raise FlashMoeError(f"{target}: cannot write ({e.strerror or e})") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(target: str | Path, data) -> None:
    """Write data as indented JSON to target atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
