"""kernel_bench's models: llama-quantize through the converters' one helper (tests/converters/test_export.py),
embedding and head pinned."""

import pytest

from slim_edge.errors import SlimEdgeError
from slim_edge.evals.lab import kernel_bench


def test_embedding_type_falls_back_to_q8_0_where_rows_are_not_256_blocks():
    assert kernel_bench.embedding_type(2048) == "q6_K"
    assert kernel_bench.embedding_type(kernel_bench.SHAPES["smollm2-135m"]["hidden"]) == "q8_0"  # 576 = 2.25 * 256


@pytest.mark.runtime
def test_quantize_pins_embedding_and_output_to_q6_k(tmp_path):
    """A foreign build is reached through --bin-dir (here: the host runtime's own bin folder)."""
    from slim_edge.converters.gguf_read import read_tensor_table
    from slim_edge.runtime_patches.runtime import ensure_runtime

    bin_dir = ensure_runtime("host").bin_dir
    f16 = kernel_bench.write_random_f16(
        tmp_path / "f16.gguf", hidden=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn=512, vocab=512
    )
    assert kernel_bench.quantize(bin_dir, f16, "F16", tmp_path / "f16-again.gguf") == f16
    out = kernel_bench.quantize(bin_dir, f16, "Q4_0", tmp_path / "q4_0.gguf")
    types = {t.name: t.type_id for t in read_tensor_table(out).tensors}
    q4_0, q6_k, f32 = 2, 14, 0  # ggml type ids
    assert types["token_embd.weight"] == types["output.weight"] == q6_k
    assert {
        types[f"blk.0.{n}.weight"]
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    } == {q4_0}
    assert types["blk.0.attn_norm.weight"] == f32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f16.gguf", "q4_0.gguf"]  # no .tmp left behind
    stamp = out.stat().st_mtime_ns
    assert kernel_bench.quantize(bin_dir, f16, "Q4_0", out) == out and out.stat().st_mtime_ns == stamp  # reused
    with pytest.raises(SlimEdgeError, match="llama-quantize NOT_A_TYPE of .*f16.gguf failed"):
        kernel_bench.quantize(bin_dir, f16, "NOT_A_TYPE", tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.tmp").exists()
    # --head-type: only the output head changes
    head = kernel_bench.quantize(bin_dir, f16, "Q4_0", tmp_path / "q4_0-head-q4_0.gguf", head="q4_0")
    types = {t.name: t.type_id for t in read_tensor_table(head).tensors}
    assert types["output.weight"] == q4_0 and types["token_embd.weight"] == q6_k
