"""The flashmoe model directory (docs/formats.md): the validated reader.

A model directory holds config.json, flashmoe.json (the manifest, flashmoe.format.manifest),
resident.safetensors (every non-expert tensor under its canonical name, quantised ones as
`X.weight`/`X.scales`/`X.biases`) and one `experts/layer_NNN.bin` per MoE layer, where expert e occupies bytes
[e*stride, e*stride + nbytes) and its components sit at the manifest's offsets. `ModelDir.open` checks every
size and offset against the files before anything is read, so later code can trust them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.tensors import resident_shapes
from flashmoe.errors import CheckpointError, FormatError
from flashmoe.format.manifest import (ALIGN, COMPONENT_ALIGN, DTYPES, MANIFEST, MXFP4, RESIDENT, ExpertComponent,
                                      ExpertFile, ExpertLayout, ExpertPart, Manifest, QuantSpec, sha256_file)
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.quant import QuantizedTensor
from flashmoe.format.safetensors_io import SafetensorsFile

# JSON side files up to this size are parsed on open; larger ones (a tokenizer.json of 15 MB takes longer to
# parse than opening the model) are left to their readers, which report a broken file themselves.
_SMALL_JSON = 1 << 20


class ModelDir:
    """A validated flashmoe model directory; also a WeightSource (canonical names, float32 arrays).

    Open with ModelDir.open(path). Expert reads use os.pread on descriptors opened on first use.
    """

    def __init__(self, path: Path, config: ModelConfig, manifest: Manifest, resident: SafetensorsFile,
                 logical: dict[str, tuple[str, ...]]):
        self.path = path
        self.config = config
        self.manifest = manifest
        self._resident = resident
        self._logical = logical  # logical name -> stored names (weight[, scales, biases])
        self._experts = {e.layer: e for e in manifest.experts}
        self._fds: dict[int, int] = {}

    # -- opening and validation --

    @classmethod
    def open(cls, path: str | Path) -> "ModelDir":
        """Open and validate `path`: manifest fields, file sizes, every resident tensor's byte range and
        quantised shapes, every expert file's stride, component offsets/shapes and total size.

        Raises FormatError naming the file and field (ConfigError for a bad config.json).
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            hint = (f"a GGUF file is read after `flashmoe convert {path} DIR`"
                    if path.suffix.lower() == ".gguf" else "give a model directory made by `flashmoe convert` "
                    "(or `flashmoe synth`)")
            raise FormatError(f"{path}: {'not a directory' if path.exists() else 'does not exist'} ({hint})")
        try:
            manifest = Manifest.from_json(mpath.read_text(), str(mpath))
        except FileNotFoundError:
            raise FormatError(f"{mpath}: missing (not a flashmoe model directory; run `flashmoe convert`)") from None
        config = ModelConfig.from_file(path / "config.json")
        if manifest.model_type != config.model_type:
            raise FormatError(f"{mpath}: model_type {manifest.model_type!r} disagrees with "
                              f"{path / 'config.json'} model_type {config.model_type!r}")
        for ef in manifest.experts:
            _check_inside(ef.path, f"{mpath}: experts[layer {ef.layer}].path")
        for rel in manifest.files:
            _check_inside(rel, f"{mpath}: files key")
        _check_files(manifest, path)
        try:
            resident = SafetensorsFile(path / RESIDENT)
        except CheckpointError as e:
            raise FormatError(str(e)) from None
        logical = _check_resident(resident, manifest, path / RESIDENT)
        _check_resident_shapes(resident, manifest, logical, config, path / RESIDENT)
        _check_experts(manifest, config, path)
        return cls(path, config, manifest, resident, logical)

    # -- properties the engine uses --

    @property
    def moe_layers(self) -> list[int]:
        """Decoder layers with routed experts, ascending."""
        return sorted(self._experts)

    def expert_path(self, layer: int) -> Path:
        """Absolute path of the expert file of MoE layer `layer`."""
        return self.path / self._expert_file(layer).path

    def num_experts(self, layer: int) -> int:
        return self._expert_file(layer).num_experts

    def layer_layout(self, layer: int) -> ExpertLayout:
        """The expert layout of MoE layer `layer` (layers may differ in a mixed-precision checkpoint)."""
        return self._expert_file(layer).layout

    @property
    def layout(self) -> ExpertLayout:
        """The expert layout shared by every MoE layer; FormatError when layers differ (use layer_layout)."""
        first = self.manifest.experts[0].layout
        if any(e.layout != first for e in self.manifest.experts):
            raise FormatError(f"{self.path}: MoE layers have different expert layouts; use layer_layout(layer)")
        return first

    @property
    def resident_nbytes(self) -> int:
        """Bytes of all resident tensors (as stored)."""
        return sum(self._stored_nbytes(n) for n in self._logical)

    def resident_names(self) -> list[str]:
        """Canonical names of the resident tensors (a quantised tensor counts once, as `X.weight`)."""
        return list(self._logical)

    def quantization(self, name: str) -> QuantSpec | None:
        """QuantSpec of resident tensor `name`, None when it is stored as float."""
        return self.manifest.quantization.get(name)

    def stored(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        """(dtype, shape) of `name` as resident.safetensors stores it (a quantised tensor's parts by their own
        names: `X.weight`, `X.scales`, `X.biases`), read from its header without touching the data."""
        return self._resident.dtype(name), self._resident.shape(name)

    def raw(self, name: str) -> QuantizedTensor | np.ndarray:
        """Resident tensor `name` as stored: a QuantizedTensor or a float array, read-only views of the file
        (copies when a view would be misaligned for its dtype).
        Raises CheckpointError naming the tensor when absent."""
        if name not in self._logical:
            raise CheckpointError(f"{self.path / RESIDENT}: no tensor {name!r}")
        q = self.manifest.quantization.get(name)
        if q is None:
            return self._get(name)
        base = name[: -len("weight")]
        return QuantizedTensor(self._get(name), self._get(base + "scales"), self._get(base + "biases"),
                               q.bits, q.group_size)

    def _get(self, stored: str) -> np.ndarray:
        # safetensors packs tensors back to back, so a view may sit at an odd address; hand out an aligned
        # copy then (kernels may assume natural alignment), else the zero-copy view.
        a = self._resident.get(stored)
        return a.copy() if a.ctypes.data % a.dtype.alignment else a

    # -- WeightSource --

    def tensor(self, name: str) -> np.ndarray:
        """Resident tensor `name` as float32 (dequantised when stored quantised)."""
        return _to_float32(self.raw(name))

    def has(self, name: str) -> bool:
        return name in self._logical

    def expert(self, layer: int, e: int) -> dict[str, np.ndarray]:
        """Routed expert e of `layer`, read with one pread: {'gate_proj' [I, H], 'up_proj' [I, H],
        'down_proj' [H, I]} float32, and their biases '{proj}.bias' where the experts have them."""
        buf = self.read_expert(layer, e)
        return {k: _to_float32(v) for k, v in self.layer_layout(layer).view(buf).items()}

    def read_expert(self, layer: int, e: int) -> np.ndarray:
        """The raw `nbytes` bytes of expert e of `layer` (uint8), read with os.pread."""
        ef = self._expert_file(layer)
        if not 0 <= e < ef.num_experts:
            raise CheckpointError(f"{self.expert_path(layer)}: expert {e} is outside 0..{ef.num_experts - 1}")
        fd = self._fds.get(layer)
        if fd is None:
            fd = self._fds[layer] = os.open(self.expert_path(layer), os.O_RDONLY)
        data = os.pread(fd, ef.layout.nbytes, e * ef.layout.stride)
        if len(data) != ef.layout.nbytes:
            raise FormatError(f"{self.expert_path(layer)}: short read of expert {e} (file changed since open?)")
        return np.frombuffer(data, dtype=np.uint8)

    # -- maintenance --

    def verify_checksums(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Recompute every file's SHA-256 and compare with the manifest (reads the whole model: the sum of
        `manifest.files` sizes). progress (if given) is called with the bytes hashed, 1 MiB at a time.

        Returns the settings files (Manifest.weight_files: not weights) whose contents changed since the model
        was written, which users may edit. Raises FormatError naming the first weight file whose digest differs."""
        changed, weights = [], self.manifest.weight_files()
        for rel, entry in self.manifest.files.items():
            digest = sha256_file(self.path / rel, progress=progress)
            if digest == entry.sha256:
                continue
            if rel not in weights:
                changed.append(rel)
                continue
            raise FormatError(f"{self.path / rel}: sha256 {digest} does not match {MANIFEST} ({entry.sha256})")
        return changed

    def close(self) -> None:
        """Close the expert file descriptors."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ModelDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    def _expert_file(self, layer: int) -> ExpertFile:
        try:
            return self._experts[layer]
        except KeyError:
            raise CheckpointError(f"{self.path}: layer {layer} has no routed experts "
                                  f"(MoE layers: {self.moe_layers})") from None

    def _stored_nbytes(self, name: str) -> int:
        return sum(int(np.prod(self._resident.shape(s), dtype=np.int64)) * self._resident.dtype(s).itemsize
                   for s in self._logical[name])


def _to_float32(a: ExpertPart) -> np.ndarray:
    if isinstance(a, (QuantizedTensor, Mxfp4Tensor)):
        return a.dequantize(np.float32)
    return np.asarray(a, dtype=np.float32)


def _check_quantized_shapes(where: str, w_shape, s_shape, b_shape, w_dtype, s_dtype, b_dtype,
                            q: QuantSpec) -> None:
    """A quantised triple agrees with itself and with q (shapes [.., out, in*bits/32] / [.., out, in/gs])."""
    if w_dtype != np.dtype("<u4"):
        raise FormatError(f"{where}: weight dtype {w_dtype}, quantised weights are uint32")
    if s_dtype != b_dtype or s_dtype not in (np.dtype("<f4"), np.dtype("<f2"), np.dtype(ml_dtypes.bfloat16)):
        raise FormatError(f"{where}: scales/biases dtypes {s_dtype}/{b_dtype} must be one float dtype")
    if tuple(s_shape) != tuple(b_shape) or tuple(w_shape[:-1]) != tuple(s_shape[:-1]):
        raise FormatError(f"{where}: weight {list(w_shape)}, scales {list(s_shape)}, biases {list(b_shape)} "
                          "disagree")
    if w_shape[-1] * 32 != s_shape[-1] * q.group_size * q.bits:
        raise FormatError(f"{where}: weight {list(w_shape)} and scales {list(s_shape)} do not fit bits "
                          f"{q.bits}, group_size {q.group_size}")


def _check_resident(resident: SafetensorsFile, manifest: Manifest, where: Path) -> dict[str, tuple[str, ...]]:
    """Every quantised tensor has its scales and biases with consistent shapes; no stray uint32 tensor."""
    names = set(resident.names())
    logical: dict[str, tuple[str, ...]] = {}
    for name, q in manifest.quantization.items():
        if not name.endswith(".weight"):
            raise FormatError(f"{where}: quantization entry {name!r} is not a '.weight' tensor")
        if q.format == MXFP4:
            raise FormatError(f"{where}: quantization entry {name!r} is mxfp4, which only routed experts use")
        base = name[: -len("weight")]
        parts = (name, base + "scales", base + "biases")
        for p in parts:
            if p not in names:
                raise FormatError(f"{where}: quantised tensor {name!r} lacks {p!r}")
        _check_quantized_shapes(f"{where}: {name!r}", *(resident.shape(p) for p in parts),
                                *(resident.dtype(p) for p in parts), q)
        logical[name] = parts
    claimed = {p for parts in logical.values() for p in parts}
    for name in resident.names():
        if name in claimed:
            continue
        if resident.dtype(name) not in (np.dtype("<f4"), np.dtype("<f2"), np.dtype(ml_dtypes.bfloat16)):
            raise FormatError(f"{where}: tensor {name!r} has dtype {resident.dtype(name)} but no quantization "
                              f"entry in {MANIFEST}")
        logical[name] = (name,)
    return dict(sorted(logical.items()))


def _check_resident_shapes(resident: SafetensorsFile, manifest: Manifest, logical: dict[str, tuple[str, ...]],
                           config: ModelConfig, where: Path) -> None:
    """The resident tensors are exactly those config.json implies, with its shapes."""
    expected = resident_shapes(config)
    for name, shape in expected.items():
        if name not in logical:
            raise FormatError(f"{where}: missing tensor {name!r}")
        q = manifest.quantization.get(name)
        s = resident.shape(logical[name][1]) if q else None
        got = s[:-1] + (s[-1] * q.group_size,) if q else resident.shape(name)
        if tuple(got) != shape:
            raise FormatError(f"{where}: tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}")
    extra = sorted(set(logical) - set(expected))
    if extra:
        raise FormatError(f"{where}: unexpected tensor {extra[0]!r} for this config.json")


def _check_files(manifest: Manifest, path: Path) -> None:
    """Every listed file exists; weight files have the size the manifest records (another size means they
    changed after writing); small JSON settings files parse, at any size (users edit
    generation_config.json and config.json, as they do in Hugging Face models)."""
    weights = manifest.weight_files()
    for rel, entry in manifest.files.items():
        f = path / rel
        if not f.is_file():
            raise FormatError(f"{f}: listed in {MANIFEST} but missing")
        size = f.stat().st_size
        if rel in weights and size != entry.size:
            raise FormatError(f"{f}: {size} bytes, {MANIFEST} files[{rel!r}].size says {entry.size}: the weight "
                              "file changed after the model was written (restore it, or convert again)")
        if rel not in weights and rel.endswith(".json") and size <= _SMALL_JSON:
            try:
                json.loads(f.read_bytes())
            except ValueError as e:
                raise FormatError(f"{f}: not valid JSON ({e}); fix the edit or restore the file") from None


def _check_inside(rel: str, where: str) -> None:
    """FormatError unless `rel` is a relative path that stays inside the model directory.

    Checked lexically (not with resolve()) so a model directory may still hold symlinks to another disk;
    what a manifest must not do is make flashmoe read an arbitrary file such as ../../etc/passwd.
    """
    if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == os.pardir:
        raise FormatError(f"{where} = {rel!r} is outside the model directory (must be a relative path inside it)")


def _check_experts(manifest: Manifest, config: ModelConfig, path: Path) -> None:
    """Expert files cover exactly config.moe_layers; each layout is self-consistent and fits the config."""
    layers = [e.layer for e in manifest.experts]
    if sorted(layers) != config.moe_layers:
        raise FormatError(f"{path / MANIFEST}: experts cover layers {sorted(layers)}, config.json's MoE layers "
                          f"are {config.moe_layers}")
    h, inter = config.hidden_size, config.moe_intermediate_size
    logical = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    for ef in manifest.experts:
        where = f"{path / MANIFEST}: experts[layer {ef.layer}]"
        lay = ef.layout
        if ef.num_experts != config.num_experts:
            raise FormatError(f"{where}.num_experts = {ef.num_experts}, config.json num_experts = {config.num_experts}")
        if lay.stride <= 0 or lay.stride % ALIGN:
            raise FormatError(f"{where}.stride = {lay.stride} is not a positive multiple of {ALIGN}")
        if not 0 < lay.nbytes <= lay.stride:
            raise FormatError(f"{where}.nbytes = {lay.nbytes} is not in 1..stride ({lay.stride})")
        comps = {c.name: c for c in lay.components}
        if len(comps) != len(lay.components):
            raise FormatError(f"{where}: duplicate component names")
        spans = []
        for c in lay.components:
            if c.offset < 0 or c.offset % COMPONENT_ALIGN or c.offset + c.nbytes > lay.nbytes:
                raise FormatError(f"{where}: component {c.name} at offset {c.offset} (+{c.nbytes} bytes) is not "
                                  f"{COMPONENT_ALIGN}-aligned inside nbytes {lay.nbytes}")
            spans.append((c.offset, c.offset + c.nbytes, c.name))
        spans.sort()
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise FormatError(f"{where}: components {n0} and {n1} overlap")
        known = set()
        for proj, (out_dim, in_dim) in logical.items():
            known |= _check_expert_projection(where, comps, proj, (out_dim, in_dim), lay.quantization.get(proj),
                                              config.has_expert_biases)
        extra = set(comps) - known
        if extra:
            raise FormatError(f"{where}: unknown component {sorted(extra)[0]}")
        f = path / ef.path
        if not f.is_file():
            raise FormatError(f"{f}: expert file missing")
        size, expected = f.stat().st_size, ef.num_experts * lay.stride
        if size != expected:
            raise FormatError(f"{f}: {size} bytes, expected num_experts {ef.num_experts} x stride {lay.stride} "
                              f"= {expected}")


def _check_expert_projection(where: str, comps: dict[str, ExpertComponent], proj: str, shape: tuple[int, int],
                             q: QuantSpec | None, bias: bool) -> set[str]:
    """Check one projection's components (float, affine or mxfp4, and its bias when the family has expert
    biases) against its logical [out, in] `shape`; return their names. FormatError naming the component."""
    out_dim, in_dim = shape
    kinds = ("weight",) if q is None else ("blocks", "scales") if q.format == MXFP4 else ("weight", "scales", "biases")
    need = [f"{proj}.{k}" for k in kinds] + ([f"{proj}.bias"] if bias else [])
    missing = [n for n in need if n not in comps]
    if missing:
        raise FormatError(f"{where}: missing component {missing[0]}")
    w = comps[need[0]]
    if q is None:
        if w.shape != (out_dim, in_dim) or w.dtype in ("uint32", "uint8"):
            raise FormatError(f"{where}: component {w.name} is {w.dtype} {list(w.shape)}, expected a "
                              f"float [{out_dim}, {in_dim}]")
    elif q.format == MXFP4:
        s = comps[need[1]]
        if (w.dtype, w.shape, s.dtype, s.shape) != ("uint8", (out_dim, in_dim // 2), "uint8",
                                                    (out_dim, in_dim // q.group_size)):
            raise FormatError(f"{where}: components {w.name} {w.dtype} {list(w.shape)} and {s.name} {s.dtype} "
                              f"{list(s.shape)} do not hold mxfp4 [{out_dim}, {in_dim}] (uint8 "
                              f"[{out_dim}, {in_dim // 2}] and [{out_dim}, {in_dim // q.group_size}])")
    else:
        s, b = comps[need[1]], comps[need[2]]
        _check_quantized_shapes(f"{where}: {proj}", w.shape, s.shape, b.shape, DTYPES[w.dtype],
                                DTYPES[s.dtype], DTYPES[b.dtype], q)
        if s.shape != (out_dim, in_dim // q.group_size):
            raise FormatError(f"{where}: component {s.name} shape {list(s.shape)} does not fit "
                              f"[{out_dim}, {in_dim}] at group_size {q.group_size}")
    if bias and (comps[need[-1]].shape != (out_dim,) or comps[need[-1]].dtype in ("uint32", "uint8")):
        raise FormatError(f"{where}: component {need[-1]} is {comps[need[-1]].dtype} "
                          f"{list(comps[need[-1]].shape)}, expected a float [{out_dim}]")
    return set(need)

