"""The format registry: a format registered in one call shows up wherever a format fact is read, and a
name, type id or llama_ftype that is already taken is refused."""

import gguf
import numpy as np
import pytest
import torch

from slim_edge.converters.gguf_types import file_type, patch_types, raw_tensor, tensor_values
from slim_edge.converters.inspect import inspect_gguf
from slim_edge.errors import SlimEdgeError
from slim_edge.formats import FORMATS, get_format, register, unregister
from slim_edge.formats.base import Format, fp16_bytes, fp16_from
from slim_edge.qlinear import activation_type, fake_quant
from slim_edge.quantize import QuantConfig
from slim_edge.runtime_patches.runtime_sim import vec_dot_types
from slim_edge.schemes import get_scheme


class T8_32(Format):
    """A dummy ternary type: | d: fp16 | qs[32]: int8 in {-1, 0, 1} |, 34 bytes per 32 weights."""

    def encode(self, values, d):
        return np.concatenate([fp16_bytes(d), values.astype(np.int8).view(np.uint8)], axis=1)

    def decode(self, raw):
        return raw[:, 2:].view(np.int8), fp16_from(raw[:, :2])


DUMMY = T8_32(
    "t8_32",
    type_id=99,
    block_size=32,
    type_size=2 + 32,
    levels=(-1, 0, 1),
    stock=False,
    file_type=98,
    vec_dot="q8_0",
    holds=("ternary",),
)


@pytest.fixture
def dummy():
    register(DUMMY)
    yield DUMMY
    unregister(DUMMY.name)


def _one_tensor_gguf(path, fmt, x):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_down.weight", raw_tensor(fmt.name, fmt.quantize(x)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    patch_types(path, {"blk.0.ffn_down.weight": (fmt.type_id, x.shape[1])})


def test_a_registered_format_is_read_everywhere(dummy, tmp_path):
    assert get_format("T8_32") is dummy
    assert file_type("t8_32") == 98
    assert vec_dot_types()[99] == "q8_0" and activation_type(99) == "q8_0"
    assert get_scheme("ternary").targets() == ("tq2_0", "q2_0", "tq1_0", "t8_32")
    assert QuantConfig(scheme="ternary", target="t8_32").formats == ("t8_32", "tq2_0", "q2_0")
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    _one_tensor_gguf(tmp_path / "t.gguf", dummy, x)
    (t,) = inspect_gguf(tmp_path / "t.gguf", runtime="patched")["tensors"]
    # 2 rows x 2 blocks x 34 bytes = 136, padded to the 32-byte alignment
    assert (t["type"], t["type_id"], t["bpw"], t["bytes"]) == ("T8_32", 99, 8.5, 160)
    values = tensor_values(tmp_path / "t.gguf", "blk.0.ffn_down.weight")
    assert np.array_equal(values, dummy.dequantize(dummy.quantize(x), 64))
    # the torch grid of the ternary scheme on it is its exported bytes
    w = torch.from_numpy(x)
    d = torch.from_numpy(np.abs(x).reshape(2, 2, 32).max(-1)).float()
    q, v = fake_quant(w, d, dummy, "ternary", return_values=True)
    packed = dummy.pack(v.to(torch.int8).numpy(), d.to(torch.float16).numpy())
    assert np.array_equal(q.numpy(), dummy.dequantize(packed, 64))


def test_an_unregistered_format_is_gone(dummy):
    unregister(dummy.name)
    try:
        assert "t8_32" not in FORMATS and 99 not in vec_dot_types() and file_type("t8_32") == 0
        assert "t8_32" not in get_scheme("ternary").targets()
        with pytest.raises(SlimEdgeError, match="unknown format .t8_32."):
            QuantConfig(scheme="ternary", target="t8_32")
    finally:
        register(dummy)


@pytest.mark.parametrize(
    "clash, what",
    [
        (dict(type_id=43), "GGML type id 43, which format 'stq1_0'"),
        (dict(name="q2_0c"), "name 'q2_0c', which format 'q2_0c'"),
        (dict(file_type=7), "llama_ftype 7, which format 'q8_0'"),
    ],
)
def test_a_taken_name_id_or_ftype_is_refused(clash, what):
    fields = (
        dict(name="t8_32", type_id=99, block_size=32, type_size=34, levels=(-1, 0, 1), file_type=98, vec_dot="q8_0")
        | clash
    )
    before = (dict(FORMATS), len(vec_dot_types()))
    with pytest.raises(SlimEdgeError) as e:
        register(T8_32(**fields))
    assert f"format {fields['name']!r} has {what} already has" in str(e.value)
    assert (dict(FORMATS), len(vec_dot_types())) == before


def test_a_format_without_its_runtime_facts_is_refused():
    with pytest.raises(SlimEdgeError, match="'t8_32': file_type -1 / vec_dot '' are not set"):
        register(T8_32("t8_32", type_id=99, block_size=32, type_size=34, levels=(-1, 0, 1)))
    assert "t8_32" not in FORMATS
