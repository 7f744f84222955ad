"""slim-edge's own GGUF reader: every KV value type, custom tensor type ids, and clean errors on bad files."""

import struct

import gguf
import numpy as np
import pytest

from slim_edge.converters.gguf_read import read_metadata, read_tensor_table
from slim_edge.converters.gguf_types import tensor_values
from slim_edge.converters.inspect import format_report, inspect_gguf
from slim_edge.errors import SlimEdgeError
from slim_edge.formats import get_format

PLACEHOLDER = gguf.GGMLQuantizationType.TQ2_0  # a stock id gguf-py accepts; patched to the real id afterwards
WRITTEN = {  # key -> (writer method, value, type name the reader reports)
    "t.u8": ("add_uint8", 255, "uint8"),
    "t.i8": ("add_int8", -128, "int8"),
    "t.u16": ("add_uint16", 65535, "uint16"),
    "t.i16": ("add_int16", -32768, "int16"),
    "t.u32": ("add_uint32", 2**32 - 1, "uint32"),
    "t.i32": ("add_int32", -(2**31), "int32"),
    "t.u64": ("add_uint64", 2**64 - 1, "uint64"),
    "t.i64": ("add_int64", -(2**63), "int64"),
    "t.f32": ("add_float32", 0.1, "float32"),
    "t.f64": ("add_float64", 0.1, "float64"),
    "t.bool": ("add_bool", True, "bool"),
    "t.str": ("add_string", "héllo ✓", "string"),
    "t.ints": ("add_array", [3, -1, 7], "array[int32]"),
    "t.floats": ("add_array", [0.5, -2.25], "array[float32]"),
    "t.bools": ("add_array", [True, False, True], "array[bool]"),
    "t.strs": ("add_array", ["<s>", "Ġthe", "✓", ""], "array[string]"),
    "t.nested": ("add_array", [[1, 2], [3, 4, 5]], "array[array[int32]]"),
}


def write_gguf(path, fmt: str = "stq1_0", patch: bool = True, rng=np.random.default_rng(0), type_id=None):
    """A small GGUF with every KV value type and one `fmt` tensor, typed with its real id when `patch`
    (gguf-py 0.19.0 writes it under a stock placeholder id)."""
    fmt = get_format(fmt)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny test")
    for key, (method, value, _) in WRITTEN.items():
        getattr(w, method)(key, value)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 32)).astype(np.float32))
    x = rng.standard_normal((2, 512)).astype(np.float32)
    raw = fmt.quantize(x)
    if patch:
        w.add_tensor("blk.0.ffn_down.weight", raw.view(np.int8), raw_shape=(2, 512), raw_dtype=PLACEHOLDER)
    else:  # a file gguf-py reads whole
        w.add_tensor("blk.0.ffn_down.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if patch:
        data = bytearray(path.read_bytes())
        key = struct.pack("<Q", len("blk.0.ffn_down.weight")) + b"blk.0.ffn_down.weight"
        pos = data.index(key) + len(key) + 4 + 2 * 8
        assert struct.unpack_from("<I", data, pos)[0] == PLACEHOLDER
        struct.pack_into("<I", data, pos, fmt.type_id if type_id is None else type_id)
        path.write_bytes(bytes(data))
    return raw


def test_every_value_type_reads_back_as_written(tmp_path):
    path = tmp_path / "all.gguf"
    raw = write_gguf(path)
    with pytest.raises(Exception):  # the reason this reader exists
        gguf.GGUFReader(path)
    table = read_tensor_table(path, metadata=True)
    meta = table.metadata
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny test"
    for key, (_, value, type_name) in WRITTEN.items():
        want = float(np.float32(value)) if type_name == "float32" else value
        assert meta[key] == want, key
        assert type(meta[key]) is type(want), key
        assert table.kv_types[key] == type_name, key
    assert meta["t.floats"] == [0.5, -2.25]
    assert list(meta)[:3] == ["general.architecture", "general.name", "t.u8"]  # file order
    assert read_metadata(path) == meta
    by_name = {t.name: t for t in table.tensors}
    assert by_name["blk.0.ffn_down.weight"].type_id == 43 and by_name["blk.0.ffn_down.weight"].shape == (512, 2)
    assert np.array_equal(tensor_values(path, "blk.0.ffn_down.weight"), get_format("stq1_0").dequantize(raw, 512))
    assert tensor_values(path, "token_embd.weight").shape == (4, 32)
    # without metadata=True the values are skipped, the table is the same
    assert read_tensor_table(path).tensors == table.tensors and read_tensor_table(path).metadata == {}


def test_agrees_with_gguf_py_on_a_stock_file(tmp_path):
    path = tmp_path / "stock.gguf"
    write_gguf(path, patch=False)
    theirs = gguf.GGUFReader(path)
    ours = read_metadata(path)
    for f in theirs.fields.values():
        if f.name.startswith("GGUF.") or f.name == "t.nested":  # gguf-py flattens nested arrays
            continue
        assert ours[f.name] == f.contents(), f.name
    assert set(ours) == {f.name for f in theirs.fields.values() if not f.name.startswith("GGUF.")}


@pytest.mark.parametrize("fmt", ["q2_0", "stq1_0", "q2_0c", "q2_0c_64", "stq1_0_64"])  # ids 42 to 46
def test_inspect_shows_metadata_of_custom_ids(tmp_path, fmt):
    path = tmp_path / "custom.gguf"
    write_gguf(path, fmt)
    with pytest.raises(Exception):
        gguf.GGUFReader(path)
    r = inspect_gguf(path, "patched")
    assert r["tensors"][1]["type"] == fmt.upper() and r["loads"]
    assert r["metadata"]["general.name"] == "tiny test" and r["metadata"]["t.strs"] == ["<s>", "Ġthe", "✓", ""]
    assert inspect_gguf(path, "stock")["loads"] is (fmt == "q2_0")
    assert "general.name: tiny test" in format_report(r)


def test_inspect_flags_legacy_type_42_instead_of_truncation(tmp_path):
    """STQ1_0 bytes under type 42 (old AngelSlim files) are fewer than Q2_0 needs: retag advice, no error."""
    path = tmp_path / "old.gguf"
    write_gguf(path, "stq1_0", type_id=42)
    r = inspect_gguf(path, "patched")
    assert not r["loads"] and any("gguf retag" in a for a in r["advice"])


@pytest.mark.parametrize("cut", [3, 10, 30, 60, 200, 700, -40])
def test_truncated_file_is_named(tmp_path, cut):
    path = tmp_path / "whole.gguf"
    write_gguf(path)
    data = path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(SlimEdgeError) as e:
        inspect_gguf(bad)
    msg = str(e.value)
    assert str(bad) in msg and ("truncated" in msg or (cut < 4 and "not a GGUF file" in msg)), msg


def test_header_cuts_say_where(tmp_path):
    path = tmp_path / "whole.gguf"
    write_gguf(path)
    data = path.read_bytes()
    strs = data.index(b"t.strs")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: strs + 20])  # inside the string array's header
    with pytest.raises(SlimEdgeError, match=r"cut\.gguf: truncated or corrupt GGUF: .*'t\.strs'.*file ends at"):
        read_metadata(bad)


def test_wrong_magic_and_other_faults(tmp_path):
    path = tmp_path / "whole.gguf"
    write_gguf(path)
    data = bytearray(path.read_bytes())
    cases = {
        "magic": (b"GGML" + data[4:], r"magic\.gguf: not a GGUF file \(it starts with b'GGML'"),
        "empty": (b"", r"empty\.gguf: not a GGUF file"),
        "version": (data[:4] + struct.pack("<I", 1) + data[8:], r"version\.gguf: GGUF version 1; .*versions 2, 3"),
        "bigendian": (data[:4] + struct.pack(">I", 3) + data[8:], r"bigendian\.gguf: big-endian GGUF"),
    }
    # a string length far beyond the file: an error, not a huge allocation
    key = b"t.str"
    pos = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4
    cases["strlen"] = (data[:pos] + struct.pack("<Q", 2**60) + data[pos + 8 :], r"strlen\.gguf: truncated or corrupt")
    pos = data.index(struct.pack("<Q", 4) + b"t.u8") + 8 + 4
    cases["vtype"] = (
        data[:pos] + struct.pack("<I", 77) + data[pos + 4 :],
        r"vtype\.gguf: .*unknown GGUF value type 77",
    )
    for name, (content, pattern) in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(bytes(content))
        with pytest.raises(SlimEdgeError, match=pattern):
            read_metadata(bad)
    with pytest.raises(SlimEdgeError, match="no such file"):
        read_metadata(tmp_path / "absent.gguf")


def test_tensor_values_of_other_stock_types_go_through_gguf_py(tmp_path):
    from gguf.quants import dequantize, quantize

    x = np.random.default_rng(3).standard_normal((4, 512)).astype(np.float32)
    path = tmp_path / "stock.gguf"
    w = gguf.GGUFWriter(path, "llama")
    q41 = quantize(x, gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("q4_1", q41, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("bf16", quantize(x, gguf.GGMLQuantizationType.BF16), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert np.array_equal(tensor_values(path, "q4_1"), dequantize(q41, gguf.GGMLQuantizationType.Q4_1))
    assert np.abs(tensor_values(path, "bf16") - x).max() < 0.02
