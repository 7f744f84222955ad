"""`slim-edge gguf retag`: STQ1_0 tensors stored under type 42 (older AngelSlim files) become 43."""

import struct

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from slim_edge.cli import gguf_app
from slim_edge.converters.gguf_read import read_tensor_table
from slim_edge.converters.gguf_retag import plan_retag, retag
from slim_edge.errors import SlimEdgeError
from slim_edge.formats import get_format

STQ, Q2 = get_format("stq1_0"), get_format("q2_0")
PLACEHOLDER = gguf.GGMLQuantizationType.TQ2_0  # any stock id: gguf 0.19.0 knows neither 42 nor 43


def _type_pos(data: bytes, name: str, n_dims: int) -> int:
    """Position of a tensor's u32 type field, found from its name (independently of the parser)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    assert data.count(key) == 1
    return data.index(key) + len(key) + 4 + 8 * n_dims


def write_angelslim_like(path, rng=np.random.default_rng(0)):
    """A GGUF as an old AngelSlim exporter wrote it: STQ1_0 bytes and genuine Q2_0 bytes, both typed 42.

    gguf-py writes the raw bytes under a stock placeholder type; the type fields are then set to 42.
    """
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "hello", "world"])  # exercise string arrays
    w.add_array("test.floats", [1.0, 2.0, 3.0])
    w.add_float32("test.scale", 0.5)
    stq = {"blk.0.ffn_down.weight": (4, 512), "blk.0.attn_k.weight": (1, 256)}
    q2 = {"blk.0.attn_q.weight": (3, 256), "blk.0.attn_v.weight": (2, 64)}
    for name, (rows, n) in stq.items():
        raw = STQ.quantize(rng.standard_normal((rows, n)).astype(np.float32))
        w.add_tensor(name, raw.view(np.int8), raw_shape=(rows, n), raw_dtype=PLACEHOLDER)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float32))
    for name, (rows, n) in q2.items():
        raw = Q2.quantize(rng.standard_normal((rows, n)).astype(np.float32))
        w.add_tensor(name, raw.view(np.int8), raw_shape=(rows, n), raw_dtype=PLACEHOLDER)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    for name in [*stq, *q2]:
        pos = _type_pos(data, name, 2)
        assert struct.unpack_from("<I", data, pos)[0] == PLACEHOLDER
        struct.pack_into("<I", data, pos, 42)
    path.write_bytes(bytes(data))
    return bytes(data), list(stq), list(q2)


@pytest.fixture
def old_file(tmp_path):
    path = tmp_path / "old.gguf"
    data, stq, q2 = write_angelslim_like(path)
    return path, data, stq, q2


def test_table_matches_writer(old_file):
    path, data, stq, q2 = old_file
    table = read_tensor_table(path)
    assert table.version == 3 and table.alignment == 32
    by_name = {t.name: t for t in table.tensors}
    assert by_name["blk.0.ffn_down.weight"].shape == (512, 4)  # ggml order
    assert by_name["token_embd.weight"].type_id == gguf.GGMLQuantizationType.F32
    for name in stq + q2:
        assert by_name[name].type_id == 42
        assert by_name[name].type_pos == _type_pos(data, name, 2)


def test_retag_changes_exactly_the_stq1_0_type_fields(old_file, tmp_path):
    path, data, stq, q2 = old_file
    out = tmp_path / "new.gguf"
    plan, written = retag(path, out)
    assert written == out
    assert sorted(t.name for t in plan.retag) == sorted(stq)
    assert sorted(t.name for t in plan.keep) == sorted(q2)
    expected = bytearray(data)
    for name in stq:
        struct.pack_into("<I", expected, _type_pos(data, name, 2), 43)
    assert out.read_bytes() == bytes(expected)
    assert path.read_bytes() == data  # the input is untouched
    assert not list(tmp_path.glob(".*retag-tmp"))
    # a second pass finds nothing left to do
    plan2, written2 = retag(out, tmp_path / "again.gguf")
    assert plan2.retag == [] and written2 is None and not (tmp_path / "again.gguf").exists()


def test_never_overwrites_without_force(old_file, tmp_path):
    path, data, stq, _ = old_file
    out = tmp_path / "new.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(SlimEdgeError, match="exists; pass --force"):
        retag(path, out)
    assert out.read_bytes() == b"precious"
    retag(path, out, force=True)
    assert out.read_bytes() != b"precious"
    with pytest.raises(SlimEdgeError, match="use --in-place"):
        retag(path, path)


def test_in_place_and_dry_run(old_file):
    path, data, stq, _ = old_file
    plan, written = retag(path, dry_run=True)
    assert written is None and len(plan.retag) == len(stq)
    assert path.read_bytes() == data
    assert not path.with_name("old-retag.gguf").exists()
    retag(path, in_place=True)
    table = {t.name: t.type_id for t in read_tensor_table(path).tensors}
    assert all(table[n] == 43 for n in stq)


def test_default_output_name(old_file):
    path, *_ = old_file
    _, written = retag(path)
    assert written == path.with_name("old-retag.gguf")


def test_unrecognised_layout_is_refused(tmp_path):
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("w", np.zeros(100, np.int8), raw_shape=(1, 256), raw_dtype=PLACEHOLDER)  # 100 B: neither
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, _type_pos(data, "w", 2), 42)
    path.write_bytes(bytes(data))
    with pytest.raises(SlimEdgeError, match=r"'w'.*spans 128 bytes.*fits neither"):
        plan_retag(path)


def test_bad_inputs(tmp_path, old_file):
    path, *_ = old_file
    with pytest.raises(SlimEdgeError, match="--to 77"):
        plan_retag(path, 42, 77)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(SlimEdgeError, match="not a GGUF file"):
        read_tensor_table(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SlimEdgeError, match="truncated"):
        read_tensor_table(cut)


def test_cli(old_file, tmp_path):
    path, data, stq, _ = old_file
    runner = CliRunner()
    r = runner.invoke(gguf_app, ["retag", str(path), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert "would retag 2" in r.output
    out = tmp_path / "cli.gguf"
    r = runner.invoke(gguf_app, ["retag", str(path), "--from", "42", "--to", "43", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert {t.name for t in read_tensor_table(out).tensors if t.type_id == 43} == set(stq)
    r = runner.invoke(gguf_app, ["retag", str(path), "-o", str(out)])
    assert r.exit_code != 0 and isinstance(r.exception, SlimEdgeError)
