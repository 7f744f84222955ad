"""Two ways to run a causal LM on given token ids: PyTorch (HF model) and the runtime (GGUF through
llama-cpp-python). Both expose the same small interface, so perplexity, KL divergence and generation
code never asks which one it holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from slim_edge.errors import SlimEdgeError


class TorchLM:
    """An HF causal LM and its tokenizer, float32 on CPU unless the model says otherwise."""

    kind = "torch"

    def __init__(self, model, tokenizer, name: str = "torch"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.n_vocab = int(model.get_output_embeddings().weight.shape[0])
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        with_special = tokenizer.encode("a", add_special_tokens=True)
        self.add_bos = self.bos_id is not None and len(with_special) > 1 and with_special[0] == self.bos_id
        import inspect

        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def tokenize(self, text: str) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None) or getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "encode"):
            return list(backend.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def logits(self, tokens, first: int = 0) -> np.ndarray:
        """float32 [len(tokens) - first, n_vocab]: the logits at positions first .. len(tokens) - 1."""
        import torch

        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None].to(self.model.device)
        # only the kept positions go through the LM head (halves the memory for scoring)
        keep = {"logits_to_keep": len(tokens) - first} if self._keeps_logits else {}
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=False, **keep)
        return out.logits[0, -(len(tokens) - first) :].float().cpu().numpy()

    def greedy(self, prompt: list[int], n_new: int, stop_at_eos: bool = True) -> list[int]:
        import inspect

        import torch

        # transformers 5.x renamed past_key_values to cache
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        out, kv = [], {}
        ids = torch.as_tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            for _ in range(n_new):
                r = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kv)
                kv = {key: getattr(r, key)}
                tok = int(torch.argmax(r.logits[0, -1]))
                out.append(tok)
                if stop_at_eos and tok == self.eos_id:
                    break
                ids = torch.tensor([[tok]])
        return out


KV_CACHE_TYPES = {"f16": 1, "f32": 0}  # GGML type ids of llama.cpp's K and V cache (-ctk / -ctv)


def kv_cache_type(name: str) -> int:
    """The GGML type id of a KV cache type name, or a clear error."""
    if name not in KV_CACHE_TYPES:
        raise SlimEdgeError(f"KV cache type {name!r} is not one of {', '.join(KV_CACHE_TYPES)}")
    return KV_CACHE_TYPES[name]


class LlamaCppLM:
    """A GGUF file run by the pinned llama.cpp through llama-cpp-python, all logits kept."""

    kind = "gguf"

    def __init__(
        self, path: str | Path, n_ctx: int = 512, n_threads: int = 2, name: str | None = None, kv_cache: str = "f16"
    ):
        path = Path(path)
        if not path.is_file():
            raise SlimEdgeError(f"GGUF file {path} does not exist; pass a .gguf written by slim-edge export")
        kv_type = kv_cache_type(kv_cache)
        llama_cpp = bindings()
        self.path = path
        self.name = name or path.name
        try:
            self.llm = llama_cpp.Llama(
                str(path),
                logits_all=True,
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
                type_k=kv_type,
                type_v=kv_type,
            )
        except (ValueError, RuntimeError) as e:
            raise SlimEdgeError(
                f"llama.cpp could not load {path} ({e}); check that the runtime was built with "
                f"the patches for its tensor types (slim-edge runtime build)"
            ) from None
        self.n_ctx = n_ctx
        self.n_vocab = int(self.llm.n_vocab())
        self.bos_id = int(self.llm.token_bos())
        self.eos_id = int(self.llm.token_eos())
        self.add_bos = bool(self.llm._model.add_bos_token())

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def detokenize(self, ids) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def logits(self, tokens, first: int = 0) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.n_ctx:
            raise SlimEdgeError(f"{len(tokens)} tokens do not fit the runtime context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[first : len(tokens)], dtype=np.float32)

    def greedy(self, prompt: list[int], n_new: int, stop_at_eos: bool = True) -> list[int]:
        if len(prompt) + n_new > self.n_ctx:
            raise SlimEdgeError(f"prompt ({len(prompt)}) + {n_new} new tokens exceed the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(prompt))
        out = []
        for _ in range(n_new):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            if stop_at_eos and tok == self.eos_id:
                break
            self.llm.eval([tok])
        return out


_BINDINGS = None


def bindings():
    """llama_cpp bound to slim-edge's patched runtime; without a built runtime, the bindings' own
    stock library (which loads stock tensor types only) with a note on stderr."""
    global _BINDINGS
    if _BINDINGS is not None:
        return _BINDINGS
    try:
        from slim_edge.runtime_patches.runtime import load_bindings

        _BINDINGS = load_bindings()
    except SlimEdgeError as e:
        if "runtime built" not in str(e) and "no llama.cpp runtime" not in str(e):
            raise
        try:
            import llama_cpp
        except ImportError:
            raise SlimEdgeError(
                f"{e}; the Python bindings are not installed either: pip install 'slim-edge[runtime]'"
            ) from None
        except OSError:  # `make setup` installs them without a library of their own (LLAMA_BUILD=OFF)
            raise SlimEdgeError(
                f"{e} (llama-cpp-python has no library of its own to fall back on: it binds "
                f"the patched runtime once that is built)"
            ) from None
        print(
            f"slim-edge: {e}. Using llama-cpp-python's own stock library meanwhile "
            f"(slim-edge's custom tensor types will not load).",
            file=sys.stderr,
        )
        _BINDINGS = llama_cpp
    return _BINDINGS


def ort_reason(e: Exception) -> str:
    """onnxruntime's error without the C++ signature it puts between "failed:" and the reason
    ("...model.cc:202 onnxruntime::Model::Model(onnx::ModelProto&&, ...) Unsupported model IR version: 14")."""
    msg = " ".join(str(e).split())
    head, sep, tail = msg.partition(" failed:")
    if sep and ") " in tail:
        msg = f"{head} failed: {tail.rsplit(') ', 1)[1]}"
    return msg if len(msg) <= 400 else msg[:150] + " ... " + msg[-250:]


def export_info(folder: Path) -> dict:
    """An ONNX export's slim_edge_onnx.json ({} when it has none or it is unreadable)."""
    from slim_edge.converters.onnx_export import MARKER

    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def gqa_positions(folder: Path) -> int | None:
    """The positions an ONNX export's GroupQueryAttention holds RoPE caches for (onnxruntime refuses past
    them), from its slim_edge_onnx.json; None for a plain-attention export, which has no limit."""
    return export_info(folder).get("max_positions")


class OnnxLM:
    """A model written by `slim-edge export --onnx`, run by onnxruntime's CPU execution provider with its
    KV cache (past_key_values.{i}.key|value in, present.{i}.key|value out)."""

    kind = "onnx"

    def __init__(self, path: str | Path, n_threads: int = 2, name: str | None = None):
        from slim_edge.converters.onnx_export import require_onnx, version_tuple

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        path = folder / "model.onnx" if path.is_dir() else path
        if not path.is_file():
            raise SlimEdgeError(
                f"ONNX model {path} does not exist; pass a folder or model.onnx written by slim-edge export --onnx"
            )
        _, ort = require_onnx()
        need = export_info(folder).get("min_onnxruntime")
        if need and version_tuple(ort.__version__) < version_tuple(need):
            raise SlimEdgeError(
                f"{path}: onnxruntime {ort.__version__} is older than {need}, the first that runs "
                f"this export's 2-bit MatMulNBits / GatherBlockQuantized (older ones refuse it or "
                f"fail in it); pip install -U 'onnxruntime>={need}'"
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = n_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types
            raise SlimEdgeError(
                f"onnxruntime {ort.__version__} could not load {path} ({ort_reason(e)}); "
                f"re-export it with this slim-edge, or pip install -U onnxruntime"
            ) from None
        self.path, self.name = path, name or folder.name
        self.past = [(i.name, i.shape) for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.n_vocab = int(self.session.get_outputs()[0].shape[-1])
        self.max_positions = gqa_positions(folder)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.bos_id = self.tokenizer.bos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        with_special = self.tokenizer.encode("a", add_special_tokens=True)
        self.add_bos = self.bos_id is not None and len(with_special) > 1 and with_special[0] == self.bos_id

    tokenize = TorchLM.tokenize
    detokenize = TorchLM.detokenize

    def empty_cache(self, batch: int = 1) -> dict:
        return {name: np.zeros((batch, shape[1], 0, shape[3]), np.float32) for name, shape in self.past}

    def step(self, tokens, cache: dict, start: int) -> tuple[np.ndarray, dict]:
        """Logits [len(tokens), vocab] of `tokens` at positions start.., and the cache extended by them."""
        ids = np.asarray(tokens, np.int64)[None]
        if self.max_positions is not None and start + ids.shape[1] > self.max_positions:
            raise SlimEdgeError(
                f"{self.name}: {ids.shape[1]} token(s) at position {start} reach position "
                f"{start + ids.shape[1] - 1}, past the {self.max_positions} positions of its gqa "
                f"graph (max_position_embeddings: the RoPE caches of GroupQueryAttention); use a "
                f"shorter context, or export with --onnx-attention plain"
            )
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, start + ids.shape[1]), np.int64),
            "position_ids": np.arange(start, start + ids.shape[1], dtype=np.int64)[None],
            **cache,
        }
        try:
            out = dict(zip(self.outputs, self.session.run(None, feed)))
        except Exception as e:  # onnxruntime's own error types
            import onnxruntime as ort

            raise SlimEdgeError(f"onnxruntime {ort.__version__} failed to run {self.path} ({ort_reason(e)})") from None
        return out["logits"][0], {name: out[name.replace("past_key_values.", "present.")] for name, _ in self.past}

    def logits(self, tokens, first: int = 0) -> np.ndarray:
        return self.step(tokens, self.empty_cache(), 0)[0][first:]

    def greedy(self, prompt: list[int], n_new: int, stop_at_eos: bool = True) -> list[int]:
        logits, cache = self.step(prompt, self.empty_cache(), 0)
        out, pos = [], len(prompt)
        for _ in range(n_new):
            tok = int(np.argmax(logits[-1]))
            out.append(tok)
            if stop_at_eos and tok == self.eos_id:
                break
            logits, cache = self.step([tok], cache, pos)
            pos += 1
        return out
