"""A validating, memory-mapped safetensors reader and a streaming writer.

Format (https://huggingface.co/docs/safetensors): 8-byte little-endian u64 header length N, N bytes of
UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` (may be padded
with spaces), then the data; offsets are relative to the end of the header, tensors are row-major,
little-endian. The reader checks every offset against the file before handing out a tensor, so a truncated
or corrupt shard is reported by name instead of crashing later; tensors are zero-copy read-only views of an
``np.memmap``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

from flashmoe.errors import CheckpointError

#: safetensors dtype code -> numpy dtype (little-endian).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors code (``F32``, ``BF16``, ``U32``...) of a numpy dtype; ValueError if it has none."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _CODES[dt]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors code") from None


class SafetensorsFile:
    """One .safetensors file, header parsed and validated on open.

    Raises CheckpointError naming the file (and tensor) when the header is unreadable, a dtype is
    unsupported, a tensor's byte range disagrees with its dtype and shape, ranges overlap, or the file is
    shorter or longer than its header says (e.g. a shard truncated by one byte).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", raw_len)
                if n > min(_MAX_HEADER, size - 8):
                    raise CheckpointError(f"{self.path}: safetensors header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: safetensors header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        end_max = 0
        spans = []
        for name, e in header.items():
            try:
                code, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r}: malformed header entry {e!r}") from None
            if code not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r}: unsupported dtype {code}")
            dt = DTYPES[code]
            expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if begin < 0 or end - begin != expected:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                    f"dtype {code} shape {list(shape)} needs {expected}"
                )
            self._entries[name] = (dt, shape, begin, end)
            spans.append((begin, end, name))
            end_max = max(end_max, end)
        spans.sort()
        for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{self.path}: tensors {n0!r} and {n1!r} overlap")
        if self._data_start + end_max != size:
            raise CheckpointError(
                f"{self.path}: file is {size} bytes but its header describes {self._data_start + end_max} "
                f"(truncated or corrupt)"
            )
        self._mm: np.memmap | None = None

    def names(self) -> list[str]:
        """Tensor names in file order of their data."""
        return sorted(self._entries, key=lambda k: self._entries[k][2])

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype of tensor `name`."""
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return self._entry(name)[1]

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only zero-copy view of the file (np.memmap slice)."""
        dt, shape, b, e = self._entry(name)
        if e == b:
            return np.zeros(shape, dt)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[self._data_start + b : self._data_start + e].view(dt).reshape(shape)

    def _entry(self, name: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor without holding the tensors in memory.

    Data goes to ``PATH.data`` as tensors arrive; ``close()`` writes the header and appends the data to
    ``PATH``. Tensors are written back to back in arrival order (safetensors forbids holes, so there is no
    per-tensor alignment); the header is space-padded so the data section starts 8-byte aligned.
    """

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data: BinaryIO = open(self._data_path, "wb")
        self._header: dict[str, dict] = {}
        self._metadata = dict(metadata or {})
        self._pos = 0

    def add(self, name: str, array: np.ndarray) -> None:
        """Append tensor `name` (any dtype with a safetensors code; written little-endian, row-major)."""
        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice")
        a = np.asarray(array)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        code = dtype_code(a.dtype)
        begin = self._pos
        self._data.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
        self._pos += a.nbytes
        self._header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [begin, self._pos]}

    def close(self) -> None:
        """Write the final file (header + data) and remove the temporary data file."""
        self._data.close()
        header = dict(self._header)
        if self._metadata:
            header["__metadata__"] = self._metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 1 << 20)
        os.unlink(self._data_path)

    def abort(self) -> None:
        """Close and remove the temporary data file (the caller removes the whole directory on error)."""
        self._data.close()
        self._data_path.unlink(missing_ok=True)

