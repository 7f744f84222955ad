"""The torch model of the runtime's activation rounding: bytes equal to gguf-py / the C reference / the
built library, and the simulation hooks leave the model as they found it."""

import ctypes

import numpy as np
import pytest
import torch

from slim_edge.errors import SlimEdgeError
from slim_edge.runtime_patches.runtime_sim import (
    fake_activation,
    ggml_rope_cos_sin,
    q8_0_bytes,
    q8_k_bytes,
    q8_k_reference,
    quantize_q8_0,
    quantize_q8_k,
    simulate,
    vec_dot_types,
)


def activation_rows(n: int = 1024) -> np.ndarray:
    """Gaussian rows with heavy tails, plus the cases where the variants part: ties, zeros, tiny scales."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, n)).astype(np.float32) * rng.uniform(0.01, 30, (24, 1)).astype(np.float32)
    x[:, ::29] *= 8
    edge = np.zeros((8, n), np.float32)
    edge[1] = np.tile(np.float32([127, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5]), n // 8)  # id = 1: ties
    edge[2] = np.where(np.arange(n) % 7 == 0, -2.0, 2.0)  # |x| ties of both signs (Q8_K takes the first)
    edge[3, 3] = -4.0
    edge[3, 7] = 4.0
    edge[4] = rng.standard_normal(n).astype(np.float32) * 1e-7  # fp16-subnormal Q8_0 scales
    edge[5] = np.round(rng.standard_normal(n) * 20).astype(np.float32)  # many exact halves of d
    edge[6] = 3e3 * rng.standard_normal(n).astype(np.float32)  # large, still finite in fp16
    edge[7, 100] = 1.0  # a lone value in an otherwise zero row
    return np.concatenate([x, edge])


def test_q8_0_reference_rounding_equals_gguf_py():
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    x = activation_rows()
    q, d = quantize_q8_0(torch.from_numpy(x), rounding="ref")
    assert q8_0_bytes(q, d) == quantize(x, GGMLQuantizationType.Q8_0).tobytes()


def test_q8_0_x86_rounding_equals_its_definition():
    """AVX2 quantize_row_q8_0: id = 127/amax in f32, round half to even; it parts from the reference."""
    x = activation_rows()
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    want_q = np.round(b * inv[:, None]).astype(np.int8)  # numpy rounds half to even
    want_d = (amax / np.float32(127)).astype(np.float16)
    q, d = quantize_q8_0(torch.from_numpy(x), rounding="x86")
    assert np.array_equal(q.numpy(), want_q) and np.array_equal(d.numpy().view(np.uint16), want_d.view(np.uint16))
    ref_q, _ = quantize_q8_0(torch.from_numpy(x), rounding="ref")
    assert not torch.equal(q, ref_q)  # the ties row: 2.5 -> 2 here, 3 in the reference


def test_q8_k_equals_numpy_reference():
    x = activation_rows()
    q, d = quantize_q8_k(torch.from_numpy(x))
    assert q8_k_bytes(q, d) == q8_k_reference(x)
    # the first of equal |x| sets the sign of the scale: d = 1 / (-127 / m), q(m) = -127
    row = x[26].reshape(-1, 256)[0]
    assert row[0] == -2.0 and float(d.reshape(x.shape[0], -1)[26, 0]) == pytest.approx(2.0 / 127, rel=1e-6)
    assert q.reshape(x.shape[0], -1)[26, 0] == -127


@pytest.mark.parametrize("kind", ["q8_0", "q8_k", "f16", "bf16", "f32"])
def test_fake_activation_is_the_dequantized_blocks(kind):
    x = torch.from_numpy(activation_rows()).reshape(4, 8, 1024)
    y = fake_activation(x, kind)
    assert y.shape == x.shape and y.dtype == x.dtype
    if kind == "q8_0":
        q, d = quantize_q8_0(x)
        assert torch.equal(y.reshape(-1, 32), q.float() * d.float()[:, None])
    elif kind == "q8_k":
        q, d = quantize_q8_k(x)
        assert torch.equal(y.reshape(-1, 256), q.float() * d[:, None])
    rel = ((y - x).norm() / x.norm()).item()
    assert rel < {"q8_0": 0.01, "q8_k": 0.02, "f16": 1e-3, "bf16": 1e-2, "f32": 1e-12}[kind]


@pytest.mark.parametrize("kind", ["q8_0", "q8_k", "f16"])
def test_fake_activation_stays_on_the_inputs_device(kind):
    # `--act-quant` trains on CUDA; a constant made on the CPU failed there. The meta device shows the same
    # mismatch without a GPU.
    y = fake_activation(torch.empty(3, 512, device="meta"), kind)
    assert y.device.type == "meta" and tuple(y.shape) == (3, 512)


def test_simulate_hooks_and_restores(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.arange(40)[None] % 256
    with torch.no_grad():
        base = model(ids).logits
        types = {n: 8 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        with simulate(model, {}, activations=False, kv_f16=True):
            kv = model(ids).logits
        with simulate(model, types, activations=True, kv_f16=False):
            act = model(ids).logits
        after = model(ids).logits
    assert torch.equal(after, base)
    assert 0 < (kv - base).abs().max() < 1e-2  # f16 rounding of q, k, v and the probabilities
    assert (act - base).abs().max() > (kv - base).abs().max()


def test_rope_angles_are_ggmls():
    """theta = p, then theta *= powf(base, -2/dim) per pair, in float32; cos/sin of that, rotate-half layout."""
    pos = torch.arange(0, 600, 7)
    cos, sin = ggml_rope_cos_sin(pos[None], 64, 100000.0)
    scale = np.float32(np.power(np.float64(np.float32(100000.0)), np.float64(np.float32(-2.0 / 64))))
    theta = pos.numpy().astype(np.float32)
    for i in range(32):
        assert np.array_equal(cos[0, :, i].numpy(), np.cos(theta.astype(np.float64)).astype(np.float32)), i
        assert np.array_equal(sin[0, :, 32 + i].numpy(), np.sin(theta.astype(np.float64)).astype(np.float32)), i
        theta = (theta * scale).astype(np.float32)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cos, hf_sin = LlamaRotaryEmbedding(
        LlamaConfig(head_dim=64, hidden_size=576, num_attention_heads=9, rope_theta=100000.0)
    )(torch.zeros(1), pos[None])
    assert 0 < (cos - hf_cos).abs().max() < 1e-4 and 0 < (sin - hf_sin).abs().max() < 1e-4


def test_jitter_is_seeded(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.arange(40)[None] % 256
    types = {n: 8 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        runs = []
        for seed in (0, 0, 1):
            with simulate(model, types, rope=True, jitter=1e-7, seed=seed):
                runs.append(model(ids).logits)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.runtime
def test_torch_quantizers_equal_the_runtime_library():
    """from_float and vec_dot_type of the built patched libggml-cpu, called through ctypes."""
    from slim_edge.runtime_patches.runtime import ensure_runtime

    lib = ctypes.CDLL(str(ensure_runtime("host").lib_dir / "libggml-cpu.so"))

    class Traits(ctypes.Structure):
        _fields_ = [
            ("from_float", ctypes.c_void_p),
            ("vec_dot", ctypes.c_void_p),
            ("vec_dot_type", ctypes.c_int),
            ("nrows", ctypes.c_int64),
        ]

    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_cpu_init()
    names = {8: "q8_0", 15: "q8_k", 1: "f16", 30: "bf16", 0: "f32", 9: "q8_1"}
    for type_id, kind in vec_dot_types().items():
        assert names[lib.ggml_get_type_traits_cpu(type_id).contents.vec_dot_type] == kind, type_id

    x = activation_rows()
    from_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    for type_id, size, ours in (
        (8, 34 * 32, q8_0_bytes(*quantize_q8_0(torch.from_numpy(x), "x86"))),
        (15, 292 * 4, q8_k_bytes(*quantize_q8_k(torch.from_numpy(x)))),
    ):
        out = ctypes.create_string_buffer(size * x.shape[0])
        fn = from_float(lib.ggml_get_type_traits_cpu(type_id).contents.from_float)
        for r in range(x.shape[0]):
            fn(x[r].ctypes.data, ctypes.addressof(out) + r * size, x.shape[1])
        assert out.raw == ours, type_id


def test_f16_kv_attention_keeps_small_gradients():
    """--runtime-attention trains through the half roundings straight-through: values bit for bit the
    runtime's, gradients in float32. A plain cast rounds gradients to half, where these underflow to 0."""
    from slim_edge.runtime_patches.runtime_sim import f16_kv_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16, 8, generator=gen) for _ in range(3))
    with torch.no_grad():
        exact, _ = f16_kv_attention(None, q, k, v, None, 0.35)
    grads = []
    for scale in (1.0, 1e-9):
        qq = q.clone().requires_grad_(True)
        out, _ = f16_kv_attention(None, qq, k, v, None, 0.35)
        assert torch.equal(out.detach(), exact)
        (out * scale).sum().backward()
        grads.append(qq.grad)
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0] * 1e-9, rtol=1e-4, atol=0)


def test_runtime_attention_refuses_a_rope_it_does_not_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    from slim_edge.runtime_patches.runtime_sim import use_runtime_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(SlimEdgeError, match="train without --runtime-attention"):
        use_runtime_attention(model)
    assert model.config._attn_implementation != "slim_edge_f16kv"
