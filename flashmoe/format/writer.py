"""The one writer of flashmoe model directories (docs/formats.md), used by every producer: `flashmoe convert`
(flashmoe.convert.checkpoint), `flashmoe synth` (flashmoe.convert.synth) and importers of other formats.

A producer opens `write_model_dir(dst, ...)` and hands over canonical tensors (float arrays, which its
QuantPolicy quantises or keeps float, or QuantizedTensors, which pass through untouched), routed experts and
side files such as config.json. The writer owns the rest: resident.safetensors, experts/layer_NNN.bin (stride a
multiple of manifest.ALIGN), each file's size and SHA-256, flashmoe.json, and atomicity: everything is written
into a temporary directory beside dst that takes dst's place only once complete (atomic.atomic_dir).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import flashmoe
from flashmoe.arch.tensors import EXPERT_PROJS
from flashmoe.errors import CheckpointError, FormatError
from flashmoe.format.atomic import atomic_dir
from flashmoe.format.manifest import (DTYPES, MANIFEST, RESIDENT, ExpertFile, ExpertLayout, ExpertPart, FileEntry,
                                      Manifest, QuantSpec, component_arrays, expert_file_name, sha256_file,
                                      version_for)
from flashmoe.format.policy import QuantPolicy
from flashmoe.format.quant import QuantizedTensor
from flashmoe.format.safetensors_io import SafetensorsWriter

# Streamed expert bytes are synced and dropped from the page cache this often, so writing a model of hundreds
# of GB does not evict everyone else's pages.
_FLUSH_BYTES = 512 << 20


@contextmanager
def write_model_dir(dst: str | Path, model_type: str, source: dict[str, Any], policy: QuantPolicy,
                    metadata: dict[str, str] | None = None) -> Iterator[ModelDirWriter]:
    """Yield a ModelDirWriter for the model directory `dst`; on normal exit write flashmoe.json and put the
    directory in dst's place, on an exception remove everything written (dst stays as it was).

    Check dst first with atomic.check_output_dir (before any slow work). model_type and source go to the
    manifest; metadata is added to resident.safetensors' `__metadata__` (which always has format=flashmoe).
    Raises FlashMoeError naming the file under dst for an OSError while writing (a full disk above all).
    """
    with atomic_dir(dst) as tmp:
        writer = ModelDirWriter(tmp, model_type, source, policy, metadata)
        try:
            yield writer
            writer.finish()
        except BaseException:
            writer.abort()
            raise


class ModelDirWriter:
    """A model directory being written into `root` (write_model_dir's temporary directory).

    Side files that a library writes into a folder (a tokenizer) may go straight into `root`: every file there is
    listed in the manifest with its size and SHA-256.
    """

    def __init__(self, root: Path, model_type: str, source: dict[str, Any], policy: QuantPolicy,
                 metadata: dict[str, str] | None = None):
        self.root, self.policy = Path(root), policy
        self._model_type, self._source = model_type, source
        self._quantization: dict[str, QuantSpec] = {}
        self._experts: dict[int, ExpertFileWriter] = {}
        (self.root / "experts").mkdir()
        self._resident = SafetensorsWriter(self.root / RESIDENT, {"format": "flashmoe", **(metadata or {})})

    def add_resident(self, name: str, tensor: QuantizedTensor | np.ndarray) -> None:
        """Append resident tensor `name` (canonical) to resident.safetensors: a float array as the policy says
        (quantised, or as it is in its own dtype), a QuantizedTensor untouched as `X.weight`/`X.scales`/
        `X.biases`. Raises FormatError for a quantised tensor whose name is not `X.weight`."""
        if not isinstance(tensor, QuantizedTensor):
            tensor = self.policy.apply(self.policy.resident(name, tuple(tensor.shape)), tensor)
        if not isinstance(tensor, QuantizedTensor):
            self._resident.add(name, tensor)
            return
        if not name.endswith(".weight"):
            raise FormatError(f"quantised resident tensor {name!r}: only 'X.weight' tensors may be quantised")
        base = name[: -len("weight")]
        for kind in ("weight", "scales", "biases"):
            self._resident.add(base + kind, getattr(tensor, kind))
        self._quantization[name] = QuantSpec(tensor.bits, tensor.group_size)

    def expert_part(self, w: np.ndarray) -> QuantizedTensor | np.ndarray:
        """One float routed-expert projection `w` [out, in] in its stored form under the policy."""
        return self.policy.apply(self.policy.expert(tuple(w.shape)), w)

    def open_experts(self, layer: int, layout: ExpertLayout, num_experts: int) -> ExpertFileWriter:
        """Create experts/layer_NNN.bin of MoE layer `layer` for `num_experts` experts laid out by `layout`
        (ExpertLayout.plan of one expert's stored parts); it enters the manifest when the directory is done."""
        if layer in self._experts:
            raise FormatError(f"{expert_file_name(layer)}: written twice")
        writer = self._experts[layer] = ExpertFileWriter(self.root / expert_file_name(layer), layout, num_experts)
        return writer

    def add_file(self, name: str, content: str | bytes | Path) -> None:
        """Side file `name` (config.json, tokenizer files; a relative path, its folders made): text (UTF-8), bytes,
        or a copy of the file at a Path."""
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, self.root / name)
        elif isinstance(content, str):
            (self.root / name).write_text(content, encoding="utf-8")
        else:
            (self.root / name).write_bytes(content)

    def finish(self) -> Manifest:
        """Close every file, hash what was not hashed while written, and write flashmoe.json."""
        self._resident.close()
        files = {expert_file_name(layer): w.close() for layer, w in self._experts.items()}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and rel not in files:
                files[rel] = FileEntry(path.stat().st_size, sha256_file(path))
        experts = [ExpertFile(layer, expert_file_name(layer), w.num_experts, w.layout)
                   for layer, w in sorted(self._experts.items())]
        specs = [*self._quantization.values(), *(q for e in experts for q in e.layout.quantization.values())]
        manifest = Manifest(model_type=self._model_type, source=self._source, quantization=self._quantization,
                            experts=experts, files=files, format_version=version_for(specs),
                            flashmoe_version=flashmoe.__version__)
        (self.root / MANIFEST).write_text(manifest.to_json())
        return manifest

    def abort(self) -> None:
        """Close and drop everything (write_model_dir then removes the directory)."""
        self._resident.abort()
        for w in self._experts.values():
            w.abort()


class ExpertFileWriter:
    """experts/layer_NNN.bin of one MoE layer: expert e at bytes [e*stride, e*stride + nbytes), zeros between.

    Two ways in, for the two ways producers hold experts (do not mix them within one file):
    - write(e, proj, part): one projection of one expert, in any order (pwrite at its offset), so a checkpoint
      with one tensor per expert streams tensor by tensor; the file is pre-sized, unwritten bytes read as zeros;
    - write_experts(first, block): whole experts in order, packed by ExpertLayout.pack, written by a background
      thread that hashes as it writes and keeps the page cache clean while the caller fills the next block.
    close() gives the file's size and SHA-256, hashed while writing when every byte came in order, else read back.
    """

    def __init__(self, path: Path, layout: ExpertLayout, num_experts: int):
        self.path, self.layout, self.num_experts = path, layout, num_experts
        # what write() takes: each projection, and each bias the layout has (gpt-oss)
        self._keys = [*EXPERT_PROJS, *(c.name for c in layout.components if c.name.endswith(".bias"))]
        self._done = np.zeros((num_experts, len(self._keys)), bool)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask, like any file
        os.ftruncate(self._fd, num_experts * layout.stride)
        self._hash = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in _hash; -1 once a write came out of order
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._unsynced = 0
        self._entry: FileEntry | None = None

    def write(self, e: int, key: str, part: ExpertPart, where: str = "") -> None:
        """Store projection `key` of expert e (`gate_proj`, ...: its stored form) or its bias (`gate_proj.bias`:
        a float [out] array). Raises CheckpointError naming `where` (the source tensor) when it does not fit the
        layout planned from the layer's first expert (another format, dtype or shape)."""
        self._wait()
        bias = key.endswith(".bias")
        for c in self.layout.components:
            proj, kind = c.name.split(".")
            if (c.name != key) if bias else (proj != key or kind == "bias"):
                continue
            a = part if bias else component_arrays(part).get(kind)
            if a is None or tuple(a.shape) != c.shape or a.dtype != DTYPES[c.dtype]:
                got = f"{a.dtype} {list(a.shape)}" if a is not None else f"a {type(part).__name__}"
                raise CheckpointError(f"{where}: expert {e} {c.name} is {got}, unlike expert 0 of the layer "
                                      f"({c.dtype} {list(c.shape)})")
            self._write(np.ascontiguousarray(a).reshape(-1).view(np.uint8), e * self.layout.stride + c.offset)
        self._done[e, self._keys.index(key)] = True

    def write_experts(self, first: int, block: np.ndarray) -> None:
        """Queue experts first, first+1, ... packed by ExpertLayout.pack into `block` (uint8, whole strides) for
        writing. Returns once the previous block is written, so a caller alternates two buffers: `block` must
        stay untouched until the next call or close()."""
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-write")
        self._pending = self._pool.submit(self._write_block, block, first * self.layout.stride)
        self._done[first : first + len(block) // self.layout.stride] = True

    def first_missing(self) -> tuple[int, str] | None:
        """(expert, canonical suffix: `gate_proj.weight`, `gate_proj.bias`, ...) of the first part never
        written, None when the file is complete."""
        missing = np.argwhere(~self._done)
        if not len(missing):
            return None
        key = self._keys[missing[0][1]]
        return int(missing[0][0]), key if key.endswith(".bias") else f"{key}.weight"

    def close(self) -> FileEntry:
        """Finish writing; the file's size and SHA-256 (the same entry again on a second call)."""
        if self._entry is None:
            self._wait()
            if self._pool is not None:
                self._pool.shutdown()
                self._drop()
            os.close(self._fd)
            self._fd = -1
            size = self.num_experts * self.layout.stride
            digest = self._hash.hexdigest() if self._hashed == size else sha256_file(self.path)
            self._entry = FileEntry(size, digest)
        return self._entry

    def abort(self) -> None:
        """Stop writing and close the file (it is removed with the directory)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _write(self, data: np.ndarray, offset: int) -> None:
        _write_at(self._fd, data, offset, self.path)
        if offset == self._hashed:
            self._hash.update(memoryview(data))
            self._hashed += len(data)
        else:
            self._hashed = -1

    def _write_block(self, block: np.ndarray, offset: int) -> None:
        self._write(block, offset)
        self._unsynced += len(block)
        if self._unsynced >= _FLUSH_BYTES:
            self._drop()

    def _drop(self) -> None:
        os.fdatasync(self._fd)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._unsynced = 0


def _write_at(fd: int, data: np.ndarray, offset: int, path: Path) -> None:
    """pwrite all of `data` at `offset`; the single place expert bytes reach the disk (tests simulate ENOSPC
    here). OSError carries `path` so the error line names the file."""
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
