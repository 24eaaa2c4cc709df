"""A validating, memory-mapped reader of llama.cpp's GGUF files (single files and `-00001-of-0000N` splits).

Format (llama.cpp docs/gguf.md, gguf-py's constants.py), all little-endian:
``"GGUF"``, u32 version (2 or 3), u64 tensor count, u64 metadata count; each metadata entry a string key, a
u32 value type and the value (strings are u64 length + UTF-8 bytes, arrays a u32 item type, u64 count and the
items); each tensor info a string name, u32 n_dims, n_dims u64 dimensions (innermost first: ``ne[0]`` is a
row's length), u32 GGML type and a u64 offset relative to the data section, a multiple of the alignment; the
data section starts at the first multiple of ``general.alignment`` (default 32) after the header.

Nothing in a header is trusted: every length is checked against the bytes left before it is read, every
dimension, type and offset against the file, names must be unique across all splits, and tensors must not
overlap. A problem is one CheckpointError naming the file (and the tensor or key). Tensor data are read-only
zero-copy views of an ``np.memmap`` of the file, handed out only for ranges already checked.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashmoe.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class GGMLType:
    """A GGML tensor type: `block_size` values are stored in `type_size` bytes (ggml.c's type_traits)."""

    name: str
    block_size: int
    type_size: int


#: GGML type id -> GGMLType (ggml.h's enum ggml_type; ids 4, 5 and 31-33 were removed from llama.cpp).
GGML_TYPES: dict[int, GGMLType] = {t_id: GGMLType(name, bs, ts) for t_id, name, bs, ts in (
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20), (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 40), (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144), (13, "Q5_K", 256, 176), (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74), (18, "IQ3_XXS", 256, 98), (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110), (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1), (25, "I16", 1, 2), (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56), (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17), (40, "NVFP4", 64, 36), (41, "Q1_0", 128, 18))}

# Metadata value types: id -> struct format of a scalar; 8 (string) and 9 (array) are read by _Cursor.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: `shape` in NumPy order (``[..., rows, row length]``, the reverse of GGUF's
    ``ne``), its GGMLType, and its bytes ``[offset, offset + nbytes)`` of `path` (absolute, checked)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    path: Path
    offset: int
    nbytes: int

    @property
    def type(self) -> GGMLType:
        return GGML_TYPES[self.type_id]


class _Cursor:
    """Reads a GGUF header from a buffer, checking each length against the bytes left before reading."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"truncated header: {what} needs {n} bytes at offset {self.pos}, the file has "
                            f"{len(self.buf)}")
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("<Q", what), what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _FLOAT32:  # the shortest decimal that is this float32 (1e-06, not 9.99999997e-07)
            return float(str(np.float32(self.scalar("<f", what))))
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"{what}: unknown metadata value type {vtype}")
        itype, count = self.scalar("<I", what), self.scalar("<Q", what)
        if itype in _SCALARS:  # numbers in one read, as an array
            dt = np.dtype(_SCALARS[itype])
            if count > len(self.buf):
                raise self.fail(f"truncated header: {what} claims {count} items")
            return np.frombuffer(self.take(count * dt.itemsize, what), dt).tolist()
        if count > len(self.buf) - self.pos:  # every item takes at least a byte
            raise self.fail(f"truncated header: {what} claims {count} items")
        return [self.value(itype, f"{what}[{i}]") for i in range(count)]


class GGUFFile:
    """One GGUF file, header parsed and checked on open: `version`, `metadata` (key -> int, float, bool, str or
    list), `tensors` (name -> GGUFTensor, in file order). Raises CheckpointError naming the file and the key or
    tensor for a wrong magic or version, a truncated header, an unknown type, a tensor whose dimensions, offset
    or bytes do not fit the file, overlapping tensors or a duplicated name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = f.seek(0, 2)
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        cur = _Cursor(memoryview(self._mm), self.path)
        if bytes(cur.take(4, "the magic")) != MAGIC:
            raise cur.fail("not a GGUF file (no 'GGUF' magic)")
        self.version = cur.scalar("<I", "the version")
        if self.version not in VERSIONS:
            raise cur.fail(f"GGUF version {self.version} is not supported (only {VERSIONS})")
        n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the metadata count")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            if key in self.metadata:
                raise cur.fail(f"metadata key {key!r} appears twice")
            self.metadata[key] = cur.value(cur.scalar("<I", f"the type of {key!r}"), f"metadata {key!r}")
        infos = [self._tensor_info(cur) for _ in range(min(n_tensors, len(self._mm)))]
        if len(infos) != n_tensors:
            raise cur.fail(f"truncated header: {n_tensors} tensors claimed")
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment = {alignment!r} is not a power of two")
        self.data_start = -(-cur.pos // alignment) * alignment
        self.tensors = self._place(infos, alignment)

    def _tensor_info(self, cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string("a tensor name")
        n_dims = cur.scalar("<I", f"tensor {name!r}'s dimension count")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cur.fail(f"tensor {name!r}: {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        ne = [cur.scalar("<Q", f"tensor {name!r}'s dimensions") for _ in range(n_dims)]
        type_id = cur.scalar("<I", f"tensor {name!r}'s type")
        offset = cur.scalar("<Q", f"tensor {name!r}'s offset")
        if type_id not in GGML_TYPES:
            raise cur.fail(f"tensor {name!r}: unknown GGML type {type_id}")
        return name, tuple(reversed(ne)), type_id, offset

    def _place(self, infos: list, alignment: int) -> dict[str, GGUFTensor]:
        tensors: dict[str, GGUFTensor] = {}
        for name, shape, type_id, offset in infos:
            t = GGML_TYPES[type_id]
            where = f"{self.path}: tensor {name!r}"
            if name in tensors:
                raise CheckpointError(f"{where} appears twice")
            if any(d == 0 for d in shape) or shape[-1] % t.block_size:
                raise CheckpointError(f"{where}: shape {list(shape)} is not whole {t.name} blocks of "
                                      f"{t.block_size} along its rows")
            if offset % alignment:
                raise CheckpointError(f"{where}: offset {offset} is not a multiple of the alignment {alignment}")
            nbytes = int(np.prod(shape, dtype=object)) // t.block_size * t.type_size
            start = self.data_start + offset
            if start + nbytes > self.size:
                raise CheckpointError(f"{where}: bytes [{start}, {start + nbytes}) run past the end of the file "
                                      f"({self.size} bytes): truncated?")
            tensors[name] = GGUFTensor(name, shape, type_id, self.path, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise CheckpointError(f"{self.path}: tensors {a!r} and {b!r} overlap")
        return tensors

    def raw(self, name: str) -> np.ndarray:
        """The bytes of tensor `name`: a read-only uint8 view ``[rows..., bytes per row]`` of the file."""
        t = self.tensors[name]
        rows = t.shape[:-1]
        data = np.frombuffer(self._mm, np.uint8, count=t.nbytes, offset=t.offset)
        return data.reshape(rows + (-1,))

    def close(self) -> None:
        """Unmap the file (views handed out by raw() must not be used afterwards)."""
        if isinstance(self._mm, mmap.mmap):
            try:
                self._mm.close()
            except BufferError:  # a view is alive; the map goes with the last one
                pass


class GGUFModel:
    """A GGUF model: one file, or all splits of llama.cpp's `NAME-00001-of-0000N.gguf` given its first.

    `metadata` is the first file's (split.* keys checked: every split names the same count and its own
    number); `tensors` is the union over the splits (a name in two splits is an error). `raw(name)` gives a
    tensor's bytes as GGUFFile.raw does. Raises CheckpointError naming the file for a missing or invalid split.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        self.files = [GGUFFile(p) for p in _split_paths(path)]
        self.path, self.metadata = path, self.files[0].metadata
        self.tensors: dict[str, GGUFTensor] = {}
        self._owner: dict[str, GGUFFile] = {}
        for i, f in enumerate(self.files):
            if len(self.files) > 1 and (f.metadata.get("split.no", i) != i or
                                        f.metadata.get("split.count", len(self.files)) != len(self.files)):
                raise CheckpointError(f"{f.path}: split.no/split.count say {f.metadata.get('split.no')} of "
                                      f"{f.metadata.get('split.count')}, expected {i} of {len(self.files)}")
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{f.path}: tensor {name!r} is also in {self.tensors[name].path}")
                self.tensors[name], self._owner[name] = t, f
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and expected != len(self.tensors):
            raise CheckpointError(f"{path}: split.tensors.count = {expected}, the splits hold {len(self.tensors)}")

    @property
    def architecture(self) -> str:
        """`general.architecture` (llama.cpp's name: qwen3moe, llama, ...). Raises CheckpointError when absent."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: no general.architecture in the metadata")
        return arch

    def raw(self, name: str) -> np.ndarray:
        """Tensor `name`'s bytes (GGUFFile.raw). Raises CheckpointError naming the file when it has no such tensor."""
        if name not in self._owner:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self._owner[name].raw(name)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_paths(first: Path) -> list[Path]:
    """[first] for a single file; every split of `PREFIX-00001-of-0000N.gguf` in order, checked to exist."""
    m = _SPLIT.match(first.name)
    if m is None:
        return [first]
    count = int(m["count"])
    if int(m["no"]) != 1:
        raise CheckpointError(f"{first}: give the first split (-00001-of-{m['count']}.gguf)")
    paths = [first.with_name(f"{m['prefix']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)]
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: split missing ({count} splits expected beside {first.name})")
    return paths
