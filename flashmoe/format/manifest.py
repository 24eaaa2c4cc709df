"""flashmoe.json, the manifest of a model directory (docs/formats.md): its dataclasses, the expert layout
arithmetic, the constants of the format and the per-file checksum.

Everything here is plain data with exact JSON round trips; `flashmoe.format.modeldir` checks a manifest
against the files it describes, `flashmoe.format.writer` builds one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from flashmoe.arch.tensors import EXPERT_PROJS
from flashmoe.errors import FlashMoeError, FormatError
from flashmoe.format.mxfp4 import BLOCK as MXFP4_BLOCK
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.quant import BITS, FORMAT_GROUP_SIZES, QuantizedTensor

AFFINE = "affine"
MXFP4 = "mxfp4"
#: A stored expert projection: affine-quantised, MXFP4 or float [out, in].
ExpertPart = QuantizedTensor | Mxfp4Tensor | np.ndarray

#: Version 2 names each quantised tensor's format (`affine` or `mxfp4`) and allows expert biases; version 3 allows
#: affine groups of 16 (llama.cpp's Q2_K/Q3_K/Q6_K imported exactly). The writer writes the lowest version that
#: holds the directory (version_for), so a directory without groups of 16 stays readable by a version-2 reader;
#: version 1 directories (all affine, no expert biases) are still read.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
GROUP16_VERSION = 3
MANIFEST = "flashmoe.json"
RESIDENT = "resident.safetensors"
#: The O_DIRECT alignment: expert strides, and the reader's offsets, lengths and buffer addresses, are multiples
#: of it (4096 covers the logical block size of common disks and the page size).
ALIGN = 4096
#: Alignment of every component inside an expert (cache line; SIMD loads).
COMPONENT_ALIGN = 64

#: Manifest dtype names -> numpy dtypes (all little-endian).
DTYPES: dict[str, np.dtype] = {
    "uint32": np.dtype("<u4"),
    "uint8": np.dtype("u1"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: np.dtype) -> str:
    """Manifest name of a numpy dtype; FormatError when the format has no such dtype."""
    try:
        return _DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored in a flashmoe model directory") from None


def expert_file_name(layer: int) -> str:
    """Relative path of the expert file of decoder layer `layer`: experts/layer_NNN.bin."""
    return f"experts/layer_{layer:03d}.bin"


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class QuantSpec:
    """The format of one quantised tensor: `affine` (MLX layout, flashmoe.format.quant: bits, group_size) or
    `mxfp4` (flashmoe.format.mxfp4: always 4 bits, blocks of 32)."""

    bits: int
    group_size: int
    format: str = AFFINE

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "bits": self.bits, "group_size": self.group_size}

    def describe(self) -> str:
        """'mxfp4', or '4-bit g64' for affine."""
        return MXFP4 if self.format == MXFP4 else f"{self.bits}-bit g{self.group_size}"

    @classmethod
    def from_dict(cls, d: Any, where: str, version: int = FORMAT_VERSION) -> "QuantSpec":
        """Parse one quantisation entry of a `version` manifest; FormatError naming the field when it is not a
        format that version has (groups of 16 need GROUP16_VERSION)."""
        bits = _field(d, "bits", int, where)
        group_size = _field(d, "group_size", int, where)
        fmt = d.get("format", AFFINE) if isinstance(d, dict) else AFFINE  # version 1 has no key: affine
        if fmt == MXFP4:
            if (bits, group_size) != (4, MXFP4_BLOCK):
                raise FormatError(f"{where}: mxfp4 has bits 4 and group_size {MXFP4_BLOCK}, got {bits} and "
                                  f"{group_size}")
            return cls(bits, group_size, MXFP4)
        if fmt != AFFINE:
            raise FormatError(f"{where}.format = {fmt!r} is not one of {[AFFINE, MXFP4]}")
        if bits not in BITS:
            raise FormatError(f"{where}.bits = {bits} is not one of {BITS}")
        if group_size not in FORMAT_GROUP_SIZES:
            raise FormatError(f"{where}.group_size = {group_size} is not one of {FORMAT_GROUP_SIZES}")
        if group_size == 16 and version < GROUP16_VERSION:
            raise FormatError(f"{where}.group_size = 16 needs format_version {GROUP16_VERSION}, the manifest says "
                              f"{version} (docs/formats.md): a damaged or hand-edited manifest")
        return cls(bits, group_size)


@dataclass(frozen=True)
class ExpertComponent:
    """One array inside an expert: `name` (`gate_proj.weight`, `gate_proj.scales`, ...), byte `offset` from the
    start of the expert, `dtype` (a DTYPES name) and row-major `shape`."""

    name: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        # math.prod of Python ints, not np.prod: read for every component of every expert view, each token
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "offset": self.offset, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "ExpertComponent":
        dtype = _field(d, "dtype", str, where)
        if dtype not in DTYPES:
            raise FormatError(f"{where}.dtype = {dtype!r} is not one of {sorted(DTYPES)}")
        shape = _field(d, "shape", list, where)
        if not all(isinstance(s, int) and s > 0 for s in shape):
            raise FormatError(f"{where}.shape = {shape} must be positive integers")
        return cls(_field(d, "name", str, where), _field(d, "offset", int, where), dtype, tuple(shape))


@dataclass(frozen=True)
class ExpertLayout:
    """Where one expert's components lie inside its `nbytes`-byte block; blocks repeat every `stride` bytes.

    `quantization` maps each quantised projection (`gate_proj`, ...) to its QuantSpec; a projection absent from
    it is stored as a float `X.weight` [out, in]. Components per projection: `X.weight`, `X.scales`, `X.biases`
    (affine), `X.blocks`, `X.scales` (mxfp4) or `X.weight` (float); `X.bias` [out] when the experts have
    biases (gpt-oss).
    """

    stride: int
    nbytes: int
    components: tuple[ExpertComponent, ...]
    quantization: Mapping[str, QuantSpec] = field(default_factory=dict)

    @classmethod
    def plan(cls, parts: Mapping[str, ExpertPart]) -> "ExpertLayout":
        """Layout for experts shaped like `parts` (proj -> QuantizedTensor, Mxfp4Tensor or float [out, in]
        array of ONE expert, and `{proj}.bias` -> float [out] where the experts have biases): components in
        EXPERT_PROJS order, each projection's arrays then its bias, each at a multiple of 64 bytes;
        stride = nbytes rounded up to 4096."""
        comps, quant, offset = [], {}, 0
        for proj in EXPERT_PROJS:
            part = parts[proj]
            if isinstance(part, QuantizedTensor):
                quant[proj] = QuantSpec(part.bits, part.group_size)
            elif isinstance(part, Mxfp4Tensor):
                quant[proj] = QuantSpec(4, MXFP4_BLOCK, MXFP4)
            arrays = {f"{proj}.{kind}": a for kind, a in component_arrays(part).items()}
            if f"{proj}.bias" in parts:
                arrays[f"{proj}.bias"] = parts[f"{proj}.bias"]
            for name, a in arrays.items():
                offset = _round_up(offset, COMPONENT_ALIGN)
                comps.append(ExpertComponent(name, offset, dtype_name(a.dtype), tuple(a.shape)))
                offset += a.nbytes
        return cls(_round_up(offset, ALIGN), offset, tuple(comps), quant)

    def pack(self, parts: Mapping[str, ExpertPart], out: np.ndarray) -> None:
        """Write one expert's `parts` (as given to plan) into `out` (uint8, >= nbytes; all other bytes zeroed)."""
        out[:] = 0
        for c in self.components:
            proj, kind = c.name.split(".")
            a = parts[c.name] if kind == "bias" else component_arrays(parts[proj])[kind]
            if tuple(a.shape) != c.shape or dtype_name(a.dtype) != c.dtype:
                raise FormatError(f"expert component {c.name}: got {a.dtype} {tuple(a.shape)}, layout has "
                                  f"{c.dtype} {list(c.shape)}")
            out[c.offset : c.offset + c.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)

    def view(self, buf: np.ndarray) -> dict[str, ExpertPart]:
        """Zero-copy views of one expert inside `buf` (uint8, >= nbytes, e.g. a pread buffer):
        {'gate_proj', 'up_proj', 'down_proj'} -> QuantizedTensor, Mxfp4Tensor, or a float [out, in] array when
        unquantised, and '{proj}.bias' -> float [out] where the layout has biases."""
        arrays = {c.name: buf[c.offset : c.offset + c.nbytes].view(DTYPES[c.dtype]).reshape(c.shape)
                  for c in self.components}
        out: dict[str, ExpertPart] = {n: a for n, a in arrays.items() if n.endswith(".bias")}
        for proj in EXPERT_PROJS:
            q = self.quantization.get(proj)
            if q is None:
                out[proj] = arrays[f"{proj}.weight"]
            elif q.format == MXFP4:
                out[proj] = Mxfp4Tensor(arrays[f"{proj}.blocks"], arrays[f"{proj}.scales"])
            else:
                out[proj] = QuantizedTensor(arrays[f"{proj}.weight"], arrays[f"{proj}.scales"],
                                            arrays[f"{proj}.biases"], q.bits, q.group_size)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "stride": self.stride,
            "nbytes": self.nbytes,
            "quantization": {p: q.to_dict() for p, q in self.quantization.items()},
            "components": [c.to_dict() for c in self.components],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str, version: int = FORMAT_VERSION) -> "ExpertLayout":
        quant = {}
        for proj, q in _field(d, "quantization", dict, where).items():
            if proj not in EXPERT_PROJS:
                raise FormatError(f"{where}.quantization has unknown projection {proj!r}")
            quant[proj] = QuantSpec.from_dict(q, f"{where}.quantization.{proj}", version)
        comps = tuple(ExpertComponent.from_dict(c, f"{where}.components[{i}]")
                      for i, c in enumerate(_field(d, "components", list, where)))
        return cls(_field(d, "stride", int, where), _field(d, "nbytes", int, where), comps, quant)


@dataclass(frozen=True)
class ExpertFile:
    """The routed experts of one MoE decoder layer: `path` (relative to the model directory)."""

    layer: int
    path: str
    num_experts: int
    layout: ExpertLayout

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "path": self.path, "num_experts": self.num_experts, **self.layout.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, where: str, version: int = FORMAT_VERSION) -> "ExpertFile":
        return cls(_field(d, "layer", int, where), _field(d, "path", str, where),
                   _field(d, "num_experts", int, where), ExpertLayout.from_dict(d, where, version))


@dataclass(frozen=True)
class FileEntry:
    """Size in bytes and SHA-256 (lowercase hex) of one file of the directory."""

    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass
class Manifest:
    """flashmoe.json. `quantization` covers resident tensors (key: `X.weight`); expert quantisation is in
    each ExpertFile's layout. `files` covers every file except flashmoe.json itself."""

    model_type: str
    source: dict[str, Any]
    quantization: dict[str, QuantSpec]
    experts: list[ExpertFile]
    files: dict[str, FileEntry]
    format_version: int = FORMAT_VERSION
    flashmoe_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "flashmoe_version": self.flashmoe_version,
            "model_type": self.model_type,
            "source": self.source,
            "quantization": {k: v.to_dict() for k, v in sorted(self.quantization.items())},
            "experts": [e.to_dict() for e in self.experts],
            "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def weight_files(self) -> set[str]:
        """Paths of the weight files (resident.safetensors and the expert files), which readers address by
        offset: they must keep the size and checksum written. The other files (config.json, generation_config.json,
        tokenizer files) are settings that users may edit."""
        return {RESIDENT} | {e.path for e in self.experts}

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST) -> "Manifest":
        """Parse and type-check a manifest dict; FormatError naming the field on any problem."""
        if not isinstance(d, dict):
            raise FormatError(f"{where}: not a JSON object")
        version = _field(d, "format_version", int, where)
        if version not in READABLE_VERSIONS:
            remedy = ("it was written by a newer flashmoe: upgrade flashmoe" if version > FORMAT_VERSION
                      else "convert the model again")
            raise FormatError(f"{where}: format_version {version} is not supported (this flashmoe reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}); {remedy}")
        quant = {k: QuantSpec.from_dict(v, f"{where}: quantization[{k!r}]", version)
                 for k, v in _field(d, "quantization", dict, where).items()}
        experts = [ExpertFile.from_dict(e, f"{where}: experts[{i}]", version)
                   for i, e in enumerate(_field(d, "experts", list, where))]
        files = {}
        for k, v in _field(d, "files", dict, where).items():
            fw = f"{where}: files[{k!r}]"
            files[k] = FileEntry(_field(v, "size", int, fw), _field(v, "sha256", str, fw))
        return cls(
            model_type=_field(d, "model_type", str, where),
            source=_field(d, "source", dict, where),
            quantization=quant,
            experts=experts,
            files=files,
            format_version=version,
            flashmoe_version=str(d.get("flashmoe_version", "")),
        )

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> "Manifest":
        try:
            return cls.from_dict(json.loads(text), where)
        except ValueError as e:
            if isinstance(e, FlashMoeError):
                raise
            raise FormatError(f"{where}: not valid JSON: {e}") from None


def version_for(specs: Iterable[QuantSpec]) -> int:
    """The lowest format_version that holds quantised tensors of these specs: GROUP16_VERSION when one has
    affine groups of 16 (which version-2 readers refuse), else 2."""
    return GROUP16_VERSION if any(s.group_size == 16 for s in specs) else 2


def component_arrays(part: ExpertPart) -> dict[str, np.ndarray]:
    """The stored arrays of one expert projection by component kind (`weight`, `scales`, ...)."""
    if isinstance(part, QuantizedTensor):
        return {"weight": part.weight, "scales": part.scales, "biases": part.biases}
    if isinstance(part, Mxfp4Tensor):
        return {"blocks": part.blocks, "scales": part.scales}
    return {"weight": part}


def _field(d: Any, key: str, typ: type, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise FormatError(f"{where}: missing field {key!r}")
    v = d[key]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise FormatError(f"{where}.{key} must be an integer, got {v!r}")
    if not isinstance(v, typ):
        raise FormatError(f"{where}.{key} must be {typ.__name__}, got {type(v).__name__}")
    return v


def sha256_file(path: str | Path, chunk: int = 1 << 20, progress: Callable[[int], None] | None = None) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks; progress (if given) is called with the bytes of
    each chunk hashed."""
    h = hashlib.sha256()
    buf = bytearray(chunk)  # one reused buffer: hashing a 200 GB model allocates 1 MiB
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress:
                progress(n)
    return h.hexdigest()
