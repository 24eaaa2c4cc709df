"""flashmoe.convert.gguf reads what the `gguf` package writes, and refuses damaged headers with one line."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from flashmoe.convert.gguf import GGML_TYPES, GGUFFile, GGUFModel
from flashmoe.errors import CheckpointError

gguf = pytest.importorskip("gguf", reason="the gguf package writes the test files")


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, int | None]], split_max_tensors: int = 0,
           **metadata) -> Path:
    w = gguf.GGUFWriter(path, "qwen3moe", split_max_tensors=split_max_tensors)
    for key, value in metadata.items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype is None else gguf.GGMLQuantizationType(qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sample(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return _write(tmp_path / "m.gguf", {"a.weight": (rng.standard_normal((3, 5)).astype(np.float32), None),
                                        "b.weight": (q8, 8)},
                  **{"x.count": 7, "x.name": "tiny", "x.list": ["a", "bc"], "x.ints": [1, 2, 3]})


def test_type_table_matches_gguf_package():
    for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
        assert (GGML_TYPES[int(qtype)].block_size, GGML_TYPES[int(qtype)].type_size) == (block, size), qtype.name
        assert GGML_TYPES[int(qtype)].name == qtype.name


def test_reads_metadata_shapes_and_bytes_as_gguf_reader_does(tmp_path):
    path = _sample(tmp_path)
    f = GGUFFile(path)
    assert f.metadata["general.architecture"] == "qwen3moe"
    assert (f.metadata["x.count"], f.metadata["x.name"]) == (7, "tiny")
    assert (f.metadata["x.list"], f.metadata["x.ints"]) == (["a", "bc"], [1, 2, 3])
    ref = gguf.GGUFReader(path)
    for t in ref.tensors:
        ours = f.tensors[t.name]
        assert ours.shape == tuple(int(d) for d in reversed(t.shape))
        assert ours.type_id == int(t.tensor_type)
        assert np.array_equal(f.raw(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


def _cut_at(path: Path, cut: str) -> int:
    f = GGUFFile(path)
    return f.data_start - 40 if cut == "header" else max(t.offset + t.nbytes for t in f.tensors.values()) - 1


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_file_is_one_error_naming_it(tmp_path, cut):
    path = _sample(tmp_path)
    data = path.read_bytes()
    end = _cut_at(path, cut)
    path.write_bytes(data[:end])
    with pytest.raises(CheckpointError, match="truncated" if cut == "header" else "'b.weight'.*past the end") as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def _patch_tensor_info(path: Path, name: str, field: str, value: int) -> None:
    """Overwrite tensor `name`'s type or offset in the header."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    at += 4 + 8 * n_dims
    if field == "offset":
        at += 4
    struct.pack_into("<I" if field == "type" else "<Q", data, at, value)
    path.write_bytes(bytes(data))


def test_unknown_type_and_misaligned_or_overlapping_offsets_are_refused(tmp_path):
    path = _sample(tmp_path)
    _patch_tensor_info(path, "b.weight", "type", 77)
    with pytest.raises(CheckpointError, match="'b.weight': unknown GGML type 77"):
        GGUFFile(path)
    path = _sample(tmp_path)
    _patch_tensor_info(path, "b.weight", "offset", 3)
    with pytest.raises(CheckpointError, match="'b.weight': offset 3 is not a multiple"):
        GGUFFile(path)
    path = _sample(tmp_path)
    _patch_tensor_info(path, "b.weight", "offset", 0)
    with pytest.raises(CheckpointError, match="overlap"):
        GGUFFile(path)
    path = _sample(tmp_path)
    _patch_tensor_info(path, "b.weight", "offset", 1 << 40)
    with pytest.raises(CheckpointError, match="past the end"):
        GGUFFile(path)


def test_duplicated_name_and_bad_magic_are_refused(tmp_path):
    path = _sample(tmp_path)
    data = path.read_bytes().replace(b"b.weight", b"a.weight")
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="'a.weight' appears twice"):
        GGUFFile(path)
    path.write_bytes(b"GGML" + data[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFFile(path)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        GGUFModel(tmp_path / "absent.gguf")


def test_splits_are_read_together_and_a_missing_split_is_named(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"t{i}.weight": (rng.standard_normal((2, 8)).astype(np.float32), None) for i in range(3)}
    _write(tmp_path / "m.gguf", tensors, split_max_tensors=1)
    first = tmp_path / "m-00001-of-00003.gguf"
    with GGUFModel(first) as m:
        assert m.architecture == "qwen3moe"
        assert sorted(m.tensors) == sorted(tensors)
        for name, (data, _) in tensors.items():
            assert np.array_equal(m.raw(name).view(np.float32), data)
    (tmp_path / "m-00003-of-00003.gguf").unlink()
    with pytest.raises(CheckpointError, match="m-00003-of-00003.gguf: split missing"):
        GGUFModel(first)
