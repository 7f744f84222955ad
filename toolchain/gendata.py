"""Training tokens: text sources and text sampled from the full-precision model itself.

`--calib` takes comma-separated sources: a UTF-8 file, a built-in corpus (wiki, lee, pydoc, pydocs), or
`teacher[:N][:temp=T][:top_p=P][:prompt=K][:batch=B][:cache=0]`, N tokens (suffix k or M) that the full-precision model
writes itself. That is LLM-QAT's data-free distillation: the student learns the teacher's distribution on
the teacher's own samples, so a user needs no corpus, and the amount of training text is bounded by
compute, not by what is on disk. By default each sequence starts from one token drawn from the text
sources' unigram distribution (uniform over the non-special vocabulary when there is no text), takes the
teacher's argmax for the next GREEDY_PREFIX tokens (LLM-QAT found fully random starts drift
off-distribution), then samples at temperature 1. `prompt=K` opens each sequence with K consecutive
tokens of the text sources instead (a random window: the samples continue real text), `temp` and
`top_p` sample from a sharper, truncated distribution (temp=0 is greedy). Llama-family teachers decode
through KVDecoder (a key/value cache allocated once, written in place); other models through transformers' cache.

Samples are kept in the cache (`samples/` under `slim_edge.fsutil.cache_dir`, or $SLIM_EDGE_SAMPLES), keyed by
the model's weights, the text that opens them, the sampling options, the seed and the sequence length, so that a second
run (another scheme, another --bits) trains on the same draw without sampling again (`cache=0` turns that
off). Before they are used or kept, sequences that share a DEDUP_NGRAM-token span with an evaluation text
(DEDUP_AGAINST: the held-out splits slim-edge reports on) are dropped: a model can have memorised its
benchmark, and its samples would then carry the held-out text into training.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .distributed import World, broadcast, gather
from .errors import SlimEdgeError
from .fsutil import atomic_path, cache_dir, env_folder
from .train import calibration_tokens

TEACHER = re.compile(r"teacher(?::(\d+(?:\.\d+)?)([kKmM]?))?((?::[a-z_]+=[^:,]*)*)$")
DEFAULT_TEACHER_TOKENS = 100_000
GREEDY_PREFIX = 3
NUCLEUS_K = 256  # top tokens that top-p sampling looks for the nucleus among first (see nucleus)
# peak GPU memory of sampling / the bf16 KV cache's size: the cache grows by concatenation (old and new copy
# live at once) and the logits come on top; measured 2.2 on the H200 (SmolLM2, 50.0 GiB at 2048 x 512)
KV_OVERHEAD = 2.25
LOGIT_COPIES = 6  # float32 [vocab] rows per sequence a KVDecoder sampling step holds at once (logits, softmax, ...)
SAMPLES_VERSION = 2  # part of the cache key: bump it when teacher_tokens draws differently (2: KVDecoder)
DEDUP_NGRAM = 13  # the span GPT-3's contamination check used
DEDUP_AGAINST = (("lee", "eval"), ("wiki", "eval"))


@dataclass(frozen=True)
class Sampling:
    """How `teacher:N` samples: N tokens, at `temperature` (0 = greedy), from the top-p nucleus, each
    sequence opening with `prompt` tokens of the text sources (0: one unigram token, then greedy), `batch`
    sequences at once (None: sampling_batch of the free GPU memory; give it when runs share a GPU), `cache`
    whether the draw is kept in and read from the samples cache."""

    tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    prompt: int = 0
    batch: int | None = None
    cache: bool = True


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


_SAMPLING_KEYS = {
    "temp": ("temperature", float),
    "top_p": ("top_p", float),
    "prompt": ("prompt", int),
    "batch": ("batch", int),
    "cache": ("cache", _flag),
}


def _sampling(spec: str, item: str, n: int, options: str) -> Sampling:
    kw = {}
    for opt in filter(None, options.split(":")):
        key, _, value = opt.partition("=")
        if key not in _SAMPLING_KEYS:
            raise SlimEdgeError(
                f"--calib {spec!r}: unknown teacher option {key!r} in {item!r}; the options are "
                f"{', '.join(_SAMPLING_KEYS)} (e.g. teacher:4M:temp=0.7:top_p=0.9:prompt=16)"
            )
        field, kind = _SAMPLING_KEYS[key]
        try:
            kw[field] = kind(value)
        except ValueError:
            what = "0 or 1" if kind is _flag else "a number"
            raise SlimEdgeError(f"--calib {spec!r}: {key}={value!r} in {item!r} is not {what}") from None
    s = Sampling(n, **kw)
    if not (s.temperature >= 0 and 0 < s.top_p <= 1 and s.prompt >= 0 and (s.batch is None or s.batch >= 1)):
        raise SlimEdgeError(
            f"--calib {spec!r}: {item!r} needs temp >= 0, 0 < top_p <= 1, prompt >= 0 and "
            f"batch >= 1 (got temp={s.temperature}, top_p={s.top_p}, prompt={s.prompt}, "
            f"batch={s.batch})"
        )
    return s


def parse_calib(spec: str) -> list[tuple[str, Sampling | None]]:
    """[(text source, None) | ("teacher", Sampling)] from a --calib value."""
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in items):
        raise SlimEdgeError(f"--calib {spec!r}: empty source; give e.g. wiki, corpus.txt or wiki,teacher:1M")
    out = []
    for item in items:
        if item.startswith("teacher"):
            m = TEACHER.match(item)
            if not m:
                raise SlimEdgeError(
                    f"--calib {spec!r}: cannot read {item!r}; write teacher or teacher:N with N "
                    f"tokens, e.g. teacher:500k or teacher:2M:temp=0.7"
                )
            n = (
                DEFAULT_TEACHER_TOKENS
                if m.group(1) is None
                else int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()])
            )
            if n < 1:
                raise SlimEdgeError(f"--calib {spec!r}: {item} asks for no tokens; give N >= 1")
            out.append(("teacher", _sampling(spec, item, n, m.group(3))))
        else:
            out.append((item, None))
    return out


@torch.no_grad()
def teacher_tokens(
    model,
    n_tokens: int,
    seq_len: int,
    starts: torch.Tensor,
    *,
    device: str,
    seed: int,
    batch: int | None = None,
    progress: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prompt: int = 0,
    engine: str = "auto",
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """ceil(n_tokens / seq_len) sequences of seq_len tokens sampled from `model`, flattened (int64, CPU).

    starts: a token stream. prompt = 0: each sequence opens with one of its tokens, drawn uniformly (the
    stream's unigram distribution), then GREEDY_PREFIX greedy tokens; prompt = K: with K consecutive tokens
    of it from a uniformly drawn offset. Then samples at `temperature` (0: argmax) from the top-p nucleus.
    engine: "kv" (KVDecoder), "transformers" (the model's forward with its own cache) or "auto" (KVDecoder
    where the model has its structure and its logits agree with the model's forward, see decoding_engine).
    The sequences come in sampling batches of `batch`, batch k drawn with a generator of its own (batch_seed):
    shard (rank, ranks) draws batches rank, rank + ranks, ... only, and interleave_batches joins the ranks'
    shards into the one-process draw."""
    if prompt >= seq_len or (prompt and len(starts) < prompt):
        raise SlimEdgeError(
            f"teacher prompt={prompt} needs fewer than --seq-len {seq_len} tokens and a text "
            f"source of at least {prompt} tokens (it has {len(starts)})"
        )
    from tqdm.auto import tqdm

    n_seq = math.ceil(n_tokens / seq_len)
    was_training = model.training
    model.eval()
    kv = decoding_engine(model, seq_len, device, engine) == "kv"
    if batch is None:
        batch = default_batch(model, seq_len, device, kv)
    rank, ranks = shard
    mine = range(rank, math.ceil(n_seq / batch), ranks)
    # transformers 5.2x calls the KV cache `cache`; earlier releases (the GPU machine's 5.17) `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    starts = starts.to(device)
    seqs = []
    bar = tqdm(
        total=sum(min(batch, n_seq - k * batch) for k in mine) * seq_len,
        disable=not progress,
        unit="tok",
        unit_scale=True,
        file=sys.stderr,
        desc="sampling training text from the FP model",
        dynamic_ncols=True,
    )
    width = max(prompt, 1)  # the tokens each sequence opens with
    dec = None
    try:
        if kv:
            dec = KVDecoder(model, min(batch, n_seq), seq_len, device)
        for k in mine:
            nb = min(batch, n_seq - k * batch)
            gen = torch.Generator(device=device).manual_seed(batch_seed(seed, k))
            pick = torch.randint(len(starts) - width + 1, (nb,), generator=gen, device=device)
            tok = starts[pick[:, None] + torch.arange(width, device=device)]
            out, past = [tok], None
            bar.update(nb * (width - 1))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                for t in range(width - 1, seq_len - 1):
                    if dec is not None:  # the whole opening at the first step, then one token
                        logits = dec.step(tok, t + 1 - tok.shape[1]).float()
                    else:
                        res = model(input_ids=tok, use_cache=True, **{key: past})
                        past = res[key]
                        logits = res.logits[:, -1].float()
                    if (not prompt and t < GREEDY_PREFIX) or temperature == 0:
                        tok = logits.argmax(-1, keepdim=True)
                    else:
                        tok = _sample(logits / temperature, top_p, gen)
                    out.append(tok)
                    bar.update(nb)
            bar.update(nb)
            seqs.append(torch.cat(out, 1).cpu())
    finally:
        bar.close()
        del dec
        model.train(was_training)
        if device.startswith("cuda"):  # the KV caches' blocks would stay reserved and starve a second run
            torch.cuda.empty_cache()
    return torch.cat(seqs).flatten() if seqs else torch.zeros(0, dtype=torch.long)


def default_batch(model, seq_len: int, device: str, kv: bool) -> int:
    """teacher_tokens' sampling batch when none is given: sampling_batch of the free GPU memory, 16 elsewhere."""
    if not device.startswith("cuda"):
        return 16
    return sampling_batch(model.config, seq_len, torch.cuda.mem_get_info(device)[0], kv=kv)


def batch_seed(seed: int, k: int) -> int:
    """The seed of sampling batch k of a draw seeded `seed`: distinct for every (seed, k)."""
    return int.from_bytes(hashlib.sha256(f"teacher {seed} {k}".encode()).digest()[:8], "little") >> 1


def interleave_batches(shards: list[torch.Tensor], n_seq: int, seq_len: int, batch: int) -> torch.Tensor:
    """The one-process draw from the ranks' teacher_tokens(shard=(rank, len(shards))): batch k is shard k % ranks'."""
    ranks, rows = len(shards), [s.view(-1, seq_len) for s in shards]
    taken, out = [0] * ranks, []
    for k in range(math.ceil(n_seq / batch)):
        nb = min(batch, n_seq - k * batch)
        r = k % ranks
        out.append(rows[r][taken[r] : taken[r] + nb])
        taken[r] += nb
    if taken != [len(r) for r in rows]:
        raise ValueError(
            f"shards of {[len(r) for r in rows]} sequences are not a draw of {n_seq} in batches of {batch}"
        )
    return torch.cat(out).flatten()


def decoding_engine(model, seq_len: int, device: str, engine: str = "auto") -> str:
    """ "kv" or "transformers" for teacher_tokens: what `engine` asks, "auto" resolved (KVDecoder where
    KVDecoder.supported and its logits agree with the model's forward to SELF_CHECK_TOL, else transformers)."""
    if engine not in ("auto", "kv", "transformers"):
        raise SlimEdgeError(f"teacher sampling engine {engine!r}: give auto, kv or transformers")
    if engine != "auto":
        return engine
    if not KVDecoder.supported(model, seq_len):
        return "transformers"
    err = KVDecoder.agrees(model, device)
    if err > SELF_CHECK_TOL:
        print(
            f"slim-edge: note: {type(model).__name__} decoded through a preallocated KV cache differs from its "
            f"forward by {err:.3g} of the largest logit; sampling through transformers' cache (slower)",
            file=sys.stderr,
        )
        return "transformers"
    return "kv"


# the children a decoder layer and its attention may have for KVDecoder to run it (Llama, SmolLM2, Qwen2, Qwen3 with
# its head norms before the rotary embedding, HunYuan dense with them after it, Mistral): anything else (other norms,
# a gate on the attention, a layer of its own) is left to transformers
DECODER_LAYER = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
DECODER_ATTENTION = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "query_layernorm", "key_layernorm", "rotary_emb"}
)
SELF_CHECK_TOKENS = 8
SELF_CHECK_TOL = 0.02  # decoded vs full-forward logits, largest difference over the largest logit (bf16: ~3e-3)


class KVDecoder:
    """One token per sequence per call for `batch` sequences of up to `seq_len` tokens of a Llama-family
    causal LM, through the model's own modules, against a key/value cache allocated once.

    transformers' cache grows by concatenation: every generated token copies the whole cache of every layer (and
    peaks at twice its size); here each token's keys and values are written in place and attention reads the
    filled part. The numbers are the model's own (its norms, projections, MLP and rotary embedding), so a draw
    differs from transformers' only by the rounding of the cache (bf16 on CUDA, as there). `supported` says
    whether a model has the structure this assumes; `agrees` checks it numerically before a draw trusts it."""

    def __init__(self, model, batch: int, seq_len: int, device: str):
        inner, cfg = model.model, model.config
        self.model, self.inner = model, inner
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        dtype = torch.bfloat16 if device.startswith("cuda") else next(model.parameters()).dtype
        shape = (len(inner.layers), batch, self.kv_heads, seq_len, self.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        probe = torch.zeros(1, dtype=torch.float32, device=device)
        self.cos, self.sin = inner.rotary_emb(probe, torch.arange(seq_len, device=device)[None])  # [1, T, hd]

    @staticmethod
    def supported(model, seq_len: int) -> bool:
        inner, cfg = getattr(model, "model", None), getattr(model, "config", None)
        layers = getattr(inner, "layers", None)
        if (
            not all(
                hasattr(o, a)
                for o, a in ((inner, "embed_tokens"), (inner, "norm"), (inner, "rotary_emb"), (model, "lm_head"))
            )
            or not layers
        ):
            return False
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and window < seq_len:
            return False
        return all(
            {n for n, _ in layer.named_children()} == DECODER_LAYER
            and {n for n, _ in layer.self_attn.named_children()} <= DECODER_ATTENTION
            and {"q_proj", "k_proj", "v_proj", "o_proj"} <= {n for n, _ in layer.self_attn.named_children()}
            and hasattr(layer.self_attn, "scaling")
            for layer in layers
        )

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:  # x [B, h, T, hd], rotate-half convention
        cos, sin = self.cos[:, None, pos : pos + x.shape[2]], self.sin[:, None, pos : pos + x.shape[2]]
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [B, vocab] of the last position after feeding tok [B, T] at positions pos..pos+T-1 (every
        earlier position fed before); T > 1 (an opening text) only at pos 0."""
        b, n = tok.shape
        if n > 1 and pos:
            raise ValueError(f"KVDecoder.step: {n} tokens at position {pos}; several tokens only at position 0")
        x = self.inner.embed_tokens(tok)
        for i, layer in enumerate(self.inner.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q = att.q_proj(h).view(b, n, self.heads, self.head_dim)
            k = att.k_proj(h).view(b, n, self.kv_heads, self.head_dim)
            if hasattr(att, "q_norm"):
                q, k = att.q_norm(q), att.k_norm(k)
            q, k = self._rope(q.transpose(1, 2), pos), self._rope(k.transpose(1, 2), pos)
            if hasattr(att, "query_layernorm"):
                q, k = att.query_layernorm(q), att.key_layernorm(k)
            self.k[i, :b, :, pos : pos + n] = k
            self.v[i, :b, :, pos : pos + n] = att.v_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.to(self.k.dtype),
                self.k[i, :b, :, : pos + n],
                self.v[i, :b, :, : pos + n],
                is_causal=n > 1,
                scale=att.scaling,
                enable_gqa=self.kv_heads != self.heads,
            )
            x = x + att.o_proj(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.inner.norm(x[:, -1]))

    @staticmethod
    @torch.no_grad()
    def agrees(model, device: str) -> float:
        """Largest |decoded - full-forward| logit over the largest |logit|, on SELF_CHECK_TOKENS tokens (the first
        two fed at once, as an opening text is, then one at a time)."""
        n = SELF_CHECK_TOKENS
        ids = (torch.arange(n, device=device) * 7919 + 11)[None] % model.config.vocab_size
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            want = model(input_ids=ids).logits[0, 1:].float()
            dec = KVDecoder(model, 1, n, device)
            got = torch.stack(
                [dec.step(ids[:, :2], 0)[0].float()] + [dec.step(ids[:, t : t + 1], t)[0].float() for t in range(2, n)]
            )
        return float((got - want).abs().max() / want.abs().max())


def _sample(logits: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits), restricted to the smallest set of top tokens whose
    probability reaches top_p (the most likely token always stays)."""
    probs = torch.softmax(logits, -1)
    if top_p < 1:
        probs = nucleus(probs, top_p)
    return torch.multinomial(probs, 1, generator=gen)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs with every token outside each row's top-p nucleus set to 0.

    The nucleus is looked for among each row's NUCLEUS_K most likely tokens (a top-k, far cheaper than
    sorting a 49 k vocabulary per generated token); rows whose top NUCLEUS_K hold less than top_p, so that
    their nucleus reaches further, are sorted in full: the result is the full sort's in every case."""
    k = min(NUCLEUS_K, probs.shape[-1])
    p, idx = probs.topk(k, -1)
    wide = p.sum(-1) < top_p
    out = keep_nucleus(probs, p, idx, top_p)
    if bool(wide.any()):
        out[wide] = keep_nucleus(probs[wide], *probs[wide].sort(-1, descending=True), top_p)
    return out


def keep_nucleus(like: torch.Tensor, p: torch.Tensor, idx: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zeros shaped like `like` but for each row's nucleus: p holds the row's largest probabilities sorted
    descending (all of them, or the top k when they reach top_p), idx their token ids."""
    return torch.zeros_like(like).scatter_(-1, idx, p.masked_fill(p.cumsum(-1) - p >= top_p, 0))


def sampling_batch(config, seq_len: int, free_bytes: int, kv: bool = False) -> int:
    """Sequences sampled at once on a GPU: the largest power of two (16..4096) whose memory fits in 70 % of
    `free_bytes`. transformers' cache (kv False) peaks at KV_OVERHEAD times the bf16 cache's size; KVDecoder's
    (kv True) is allocated once, at its size, and the float32 logits and their copies (LOGIT_COPIES) come on top.
    Larger batches are what makes sampling fast (H200, SmolLM2, 512-token sequences, transformers' cache: 8.5 k
    tokens/s at 512 sequences, 35 k at 2048, 45 k at 4096)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cache = 2 * config.num_hidden_layers * kv_heads * head_dim * seq_len * 2  # k and v, bf16
    per_seq = cache + LOGIT_COPIES * 4 * config.vocab_size if kv else cache * KV_OVERHEAD
    fit = int(0.7 * free_bytes / per_seq)
    return max(16, min(4096, 1 << max(0, fit.bit_length() - 1)))


def training_tokens(
    model,
    tokenizer,
    calib: str,
    seq_len: int,
    *,
    device: str,
    seed: int,
    progress: bool = True,
    world: World = World(),
) -> tuple[torch.Tensor, str]:
    """Token ids of every --calib source, concatenated (EOS between sources), and a description. Under torchrun
    every rank draws its share of the teacher's samples (cached_samples); the result is rank 0's."""
    sources = parse_calib(calib)
    texts = [calibration_tokens(tokenizer, name) for name, n in sources if n is None]
    if texts:
        starts = torch.cat([ids for ids, _ in texts])
    else:
        special = set(tokenizer.all_special_ids)
        starts = torch.tensor([i for i in range(model.config.vocab_size) if i not in special])
    parts, names, it = [], [], iter(texts)
    for k, (name, s) in enumerate(sources):
        if s is None:
            ids, source = next(it)
        else:
            if s.prompt and not texts:
                raise SlimEdgeError(
                    f"--calib {calib!r}: prompt={s.prompt} opens the samples with text, but "
                    f"there is no text source; add one (e.g. wiki,teacher:2M:prompt=16)"
                )
            ids, dropped = cached_samples(
                model, tokenizer, s, seq_len, starts, device=device, seed=seed + k, progress=progress, world=world
            )
            plain = Sampling(s.tokens, batch=s.batch, cache=s.cache)
            how = "" if s == plain else f", temp {s.temperature:g}, top-p {s.top_p:g}"
            how += f", {s.prompt}-token text prompts" if s.prompt else ""
            how += f", {s.batch} at once" if s.batch else ""
            source = f"{len(ids):,} tokens sampled from the FP model (seed {seed + k}{how})"
            if dropped:
                source += (
                    f"; {dropped} of {dropped + len(ids) // seq_len} sequences dropped, sharing a "
                    f"{DEDUP_NGRAM}-token span with {_against()}"
                )
        parts.append(ids)
        names.append(source)
    eos = tokenizer.eos_token_id
    if eos is not None and len(parts) > 1:
        parts = [p for part in parts for p in (part, torch.tensor([eos]))][:-1]
    return torch.cat(parts), " + ".join(names)


def _against() -> str:
    return " or ".join(f"{name}:{split}" for name, split in DEDUP_AGAINST)


def ngram_keys(ids: torch.Tensor, n: int = DEDUP_NGRAM) -> torch.Tensor:
    """A 62-bit key of every n-token window in each row of `ids` (int64 [rows, length] -> [rows, length - n + 1]):
    two polynomial hashes modulo 2^31 - 1 side by side; every step stays below 2^62, so int64 never overflows.
    Two windows that differ get the same key with a probability of about 2^-62."""
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.shape[-1] < n:
        return ids.new_empty(ids.shape[0], 0)
    m = (1 << 31) - 1
    w = ids.unfold(-1, n, 1) % m
    h1 = torch.zeros(w.shape[:-1], dtype=torch.int64)
    h2 = torch.zeros_like(h1)
    for j in range(n):
        h1 = (h1 * 1_000_003 + w[..., j]) % m
        h2 = (h2 * 911_382_323 + w[..., j]) % m
    return h1 * (1 << 31) + h2


def drop_overlapping(
    seqs: torch.Tensor, banned: torch.Tensor, n: int = DEDUP_NGRAM, chunk: int = 1024
) -> tuple[torch.Tensor, int]:
    """The rows of `seqs` ([rows, length]) that share no n-token window with the text whose ngram_keys are
    `banned`, and how many rows were dropped."""
    if not len(banned) or not len(seqs):
        return seqs, 0
    hit = torch.cat(
        [torch.isin(ngram_keys(seqs[i : i + chunk], n), banned).any(-1) for i in range(0, len(seqs), chunk)]
    )
    return seqs[~hit], int(hit.sum())


_EVAL_KEYS: dict[tuple, torch.Tensor | None] = {}


def eval_ngram_keys(tokenizer) -> torch.Tensor | None:
    """ngram_keys of the DEDUP_AGAINST texts under `tokenizer` (each text's own windows, sorted, unique);
    None, with a warning, when one of them cannot be read (offline without the corpora cache)."""
    name = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), DEDUP_NGRAM)
    if name not in _EVAL_KEYS:
        from .corpora import get_text
        from .memory import tokenize_in_pieces

        keys = []
        try:
            for corpus, split in DEDUP_AGAINST:
                text = get_text(corpus, split).text
                ids = tokenize_in_pieces(lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], text)
                keys.append(ngram_keys(torch.from_numpy(ids.astype("int64"))).flatten())
            _EVAL_KEYS[name] = torch.unique(torch.cat(keys))
        except SlimEdgeError as e:
            print(
                f"slim-edge: warning: the teacher's samples are not checked against {_against()} (not kept in "
                f"the cache either): {e}",
                file=sys.stderr,
            )
            return None
    return _EVAL_KEYS[name]


def samples_key(model, s: Sampling, seq_len: int, starts: torch.Tensor, *, device: str, seed: int) -> str:
    """What a draw of teacher_tokens depends on, hashed: the model (its config and a float64 sum and absolute
    sum of every tensor), the opening text, the sampling options, seed, sequence length, device kind (CUDA's
    generator draws differently from the CPU's), the deduplication rule and SAMPLES_VERSION."""
    h = hashlib.sha256()
    what = {
        "version": SAMPLES_VERSION,
        **asdict(s),
        "seq_len": seq_len,
        "seed": seed,
        "device": device.split(":")[0],
        "dedup": [DEDUP_NGRAM, DEDUP_AGAINST],
    }
    what.pop("cache")
    h.update(json.dumps(what, sort_keys=True).encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t = t.detach().double()
            h.update(f"{name} {tuple(t.shape)} {t.sum().item():.9g} {t.abs().sum().item():.9g}\n".encode())
    h.update(starts.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()


def samples_dir() -> Path:
    """Where teacher samples are kept: $SLIM_EDGE_SAMPLES, else samples/ under the cache (fsutil.cache_dir)."""
    return env_folder("SLIM_EDGE_SAMPLES", "samples/ under the cache") or cache_dir("samples")


def cached_samples(
    model,
    tokenizer,
    s: Sampling,
    seq_len: int,
    starts: torch.Tensor,
    *,
    device: str,
    seed: int,
    progress: bool = True,
    world: World = World(),
) -> tuple[torch.Tensor, int]:
    """teacher_tokens' draw for `s`, without the sequences that overlap an evaluation text, and how many were
    dropped; read from the samples cache when the same draw was made before (s.cache), else drawn and kept.
    Under torchrun every rank draws its share of the sampling batches (the same draw as one process's at that
    batch: rank 0's batch size, teacher_tokens' shard) and rank 0 joins, checks and keeps them; the result is rank
    0's (the other ranks get an empty draw: the caller hands rank 0's to them)."""
    path = (  # rank 0 reads and keeps the draw: the key hashes every weight, the other ranks need none
        samples_dir() / (samples_key(model, s, seq_len, starts, device=device, seed=seed)[:32] + ".pt")
        if s.cache and world.main
        else None
    )
    kept = None
    if path is not None and path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            print(f"slim-edge: teacher samples read from the cache: {path} (cache=0 samples anew)", file=sys.stderr)
            kept = blob["ids"].to(torch.int64), int(blob["dropped"])
        except Exception as e:  # a damaged cache file is sampled anew and replaced
            print(f"slim-edge: warning: cannot read {path} ({e}); sampling anew", file=sys.stderr)
    if broadcast(world, kept is not None):
        return kept if world.main else (torch.zeros(0, dtype=torch.long), 0)
    engine, batch = "auto", s.batch
    if world.size > 1:  # the draw follows the engine and the batch size: every rank takes rank 0's
        if world.main:
            engine = decoding_engine(model, seq_len, device)
            batch = batch or default_batch(model, seq_len, device, engine == "kv")
        engine, batch = broadcast(world, (engine, batch))
    ids = teacher_tokens(
        model,
        s.tokens,
        seq_len,
        starts,
        device=device,
        seed=seed,
        batch=batch,
        progress=progress,
        temperature=s.temperature,
        top_p=s.top_p,
        prompt=s.prompt,
        engine=engine,
        shard=(world.rank, world.size),
    )
    if world.size > 1:
        shards = gather(world, ids)
        if not world.main:
            return torch.zeros(0, dtype=torch.long), 0
        ids = interleave_batches(shards, math.ceil(s.tokens / seq_len), seq_len, batch)
    banned = eval_ngram_keys(tokenizer)
    seqs, dropped = drop_overlapping(ids.view(-1, seq_len), banned if banned is not None else ids[:0])
    if not len(seqs):
        raise SlimEdgeError(
            f"all {dropped} sequences sampled from the FP model share a {DEDUP_NGRAM}-token span "
            f"with {_against()}: the text that opens them (prompt={s.prompt}) is evaluation "
            f"text; give other --calib text"
        )
    ids = seqs.flatten()
    if path is not None and banned is not None:
        small = torch.int32 if model.config.vocab_size < 2**31 else torch.int64
        with atomic_path(path) as tmp:
            torch.save({"ids": ids.to(small), "dropped": dropped}, tmp)
    return ids, dropped
