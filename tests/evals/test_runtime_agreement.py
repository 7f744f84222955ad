"""PyTorch and the runtime agree on SmolLM2-135M: same tokens, same perplexity, near-zero KL divergence.

The F16 GGUF is written by the pinned tree's own convert_hf_to_gguf.py (an independent exporter) from
the dequantized HF folder, and cached. Differences come from F16 weights, the runtime's F16 KV cache
and its F16 activations in F16 matmuls. Measured on 3 chunks of lee:eval (765 scored tokens):
PPL 26.9828 (torch, f32) vs 26.9833 (runtime, F16), relative 2e-5; mean KLD 3.8e-6; same top-1 99.74 %.
"""

import subprocess
import sys

import pytest

from slim_edge.evals.eval_cmd import evaluate

pytestmark = [pytest.mark.slow, pytest.mark.runtime]


@pytest.fixture(scope="module")
def smollm2_f16(tmp_path_factory):
    from slim_edge.errors import SlimEdgeError
    from slim_edge.evals.backends import bindings
    from slim_edge.fsutil import cache_dir
    from slim_edge.models import resolve
    from slim_edge.runtime_patches import runtime

    try:
        bindings()  # slim-edge's runtime; never import llama_cpp directly (the library is chosen at import)
    except SlimEdgeError as e:
        pytest.skip(str(e))
    out = cache_dir("evals", "smollm2-135m-f16.gguf")
    if not out.is_file():
        folder = resolve("smollm2-135m")
        tree = runtime.extract_tree(tmp_path_factory.mktemp("tree") / "llama.cpp")
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(out.name + ".part")
        subprocess.run(
            [
                sys.executable,
                str(tree / "convert_hf_to_gguf.py"),
                str(folder),
                "--outtype",
                "f16",
                "--outfile",
                str(part),
            ],
            check=True,
            capture_output=True,
        )
        part.replace(out)
    return out


def test_torch_and_runtime_agree_on_f16(smollm2_f16):
    r = evaluate([str(smollm2_f16)], reference="smollm2-135m", corpus="lee", max_chunks=3, gen_tokens=0, progress=False)
    assert (r["chunks"], r["scored_tokens"]) == (3, 3 * 255)
    ref, gguf = r["models"]
    assert (ref["backend"], gguf["backend"]) == ("torch", "gguf")
    assert gguf["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    assert gguf["ppl_base"] == pytest.approx(ref["ppl"], rel=1e-12)
    assert gguf["mean_kld"] < 1e-4 and gguf["p99_kld"] < 1e-3
    assert gguf["same_top_pct"] >= 99.0
    assert 20 < ref["ppl"] < 35  # SmolLM2-135M (dequantized Q4_1) on held-out news text
