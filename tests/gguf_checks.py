"""A GGUF export holds exactly a checkpoint's trained codes: the check shared by the export and API tests."""

from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from slim_edge.checkpoint import dequantized_weights, read_meta
from slim_edge.converters.gguf_read import read_tensor_table
from slim_edge.converters.gguf_types import tensor_bytes, tensor_values
from slim_edge.formats import get_format

GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def _gguf_name(hf: str, kind: str = "weight") -> str:
    parts = hf.split(".")
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[-1]]}.{kind}"


def check_bit_exact(ckpt: Path, out: Path, torch_weights: dict | None = None) -> int:
    """Every quantized linear of the checkpoint is in the GGUF bit for bit (rows possibly in rope order):
    the same blocks, and their dequantized values equal the checkpoint's weights and, when given, the
    PyTorch quantized weights (and biases). Returns the number of tensors checked."""
    meta = read_meta(ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    deq = dequantized_weights(meta, tensors)
    table = read_tensor_table(out)
    checked = 0
    for e in meta["plan"]:
        if e["mode"] == "keep":
            continue
        fmt = get_format(e["format"])
        type_id, shape, raw = tensor_bytes(out, _gguf_name(e["name"]), table)
        assert type_id == fmt.type_id and shape == (e["shape"][1], e["shape"][0])
        ours = tensors[e["name"] + ".qweight"].numpy()
        got = raw.reshape(ours.shape)
        # match every GGUF row to a checkpoint row, bit for bit
        rows = {r.tobytes(): i for i, r in enumerate(ours)}
        order = [rows[r.tobytes()] for r in got]
        assert sorted(order) == list(range(len(ours)))
        values = fmt.dequantize(got, e["shape"][1])
        assert np.array_equal(values, deq[e["name"]].numpy()[order])
        if torch_weights is not None:
            w, b = torch_weights[e["name"]]
            assert np.array_equal(values, w[order]), e["name"]
            if b is not None:
                assert np.array_equal(tensor_values(out, _gguf_name(e["name"], "bias"), table), b[order]), e["name"]
        checked += 1
    return checked
