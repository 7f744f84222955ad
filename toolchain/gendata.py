"""Training tokens: text sources and text sampled from the full-precision model itself.

`--calib` takes comma-separated sources: a UTF-8 file, a built-in corpus (wiki, lee, pydoc, pydocs), or
`teacher[:N]`, N tokens (suffix k or M) that the full-precision model writes itself. That is LLM-QAT's
data-free distillation: the student learns the teacher's distribution on the teacher's own samples, so a
user needs no corpus, and the amount of training text is bounded by compute, not by what is on disk.
Each sequence starts from one token drawn from the text sources' unigram distribution (uniform over the
non-special vocabulary when there is no text), takes the teacher's argmax for the next GREEDY_PREFIX
tokens (LLM-QAT found fully random starts drift off-distribution), then samples at temperature 1.
"""
from __future__ import annotations

import inspect
import math
import re
import sys

import torch

from .errors import SlimEdgeError
from .train import calibration_tokens

TEACHER = re.compile(r"teacher(?::(\d+(?:\.\d+)?)([kKmM]?))?$")
DEFAULT_TEACHER_TOKENS = 100_000
GREEDY_PREFIX = 3


def parse_calib(spec: str) -> list[tuple[str, int | None]]:
    """[(text source, None) | ("teacher", n_tokens)] from a --calib value."""
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in items):
        raise SlimEdgeError(f"--calib {spec!r}: empty source; give e.g. wiki, corpus.txt or wiki,teacher:1M")
    out = []
    for item in items:
        if item.startswith("teacher"):
            m = TEACHER.match(item)
            if not m:
                raise SlimEdgeError(f"--calib {spec!r}: cannot read {item!r}; write teacher or teacher:N with N "
                                    f"tokens, e.g. teacher:500k or teacher:2M")
            n = DEFAULT_TEACHER_TOKENS if m.group(1) is None else \
                int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()])
            if n < 1:
                raise SlimEdgeError(f"--calib {spec!r}: {item} asks for no tokens; give N >= 1")
            out.append(("teacher", n))
        else:
            out.append((item, None))
    return out


@torch.no_grad()
def teacher_tokens(model, n_tokens: int, seq_len: int, starts: torch.Tensor, *, device: str, seed: int,
                   batch: int | None = None, progress: bool = True) -> torch.Tensor:
    """ceil(n_tokens / seq_len) sequences of seq_len tokens sampled from `model`, flattened (int64, CPU).

    starts: candidate first tokens, drawn uniformly (so a token stream gives its unigram distribution)."""
    from tqdm.auto import tqdm

    n_seq = math.ceil(n_tokens / seq_len)
    batch = batch or (512 if device.startswith("cuda") else 16)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    # transformers 5.2x calls the KV cache `cache`; earlier releases (the GPU machine's 5.17) `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    starts = starts.to(device)
    seqs = []
    bar = tqdm(total=n_seq * seq_len, disable=not progress, unit="tok", unit_scale=True, file=sys.stderr,
               desc="sampling training text from the FP model", dynamic_ncols=True)
    try:
        for b0 in range(0, n_seq, batch):
            nb = min(batch, n_seq - b0)
            pick = torch.randint(len(starts), (nb,), generator=gen, device=device)
            tok = starts[pick][:, None]
            out, past = [tok], None
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                for t in range(seq_len - 1):
                    res = model(input_ids=tok, use_cache=True, **{key: past})
                    past = res[key]
                    logits = res.logits[:, -1].float()
                    if t < GREEDY_PREFIX:
                        tok = logits.argmax(-1, keepdim=True)
                    else:
                        tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
                    out.append(tok)
                    bar.update(nb)
            bar.update(nb)
            seqs.append(torch.cat(out, 1).cpu())
    finally:
        bar.close()
        model.train(was_training)
        if device.startswith("cuda"):  # the KV caches' blocks would stay reserved and starve a second run
            torch.cuda.empty_cache()
    return torch.cat(seqs).flatten()


def training_tokens(model, tokenizer, calib: str, seq_len: int, *, device: str, seed: int,
                    progress: bool = True) -> tuple[torch.Tensor, str]:
    """Token ids of every --calib source, concatenated (EOS between sources), and a description."""
    sources = parse_calib(calib)
    texts = [calibration_tokens(tokenizer, name) for name, n in sources if n is None]
    if texts:
        starts = torch.cat([ids for ids, _ in texts])
    else:
        special = set(tokenizer.all_special_ids)
        starts = torch.tensor([i for i in range(model.config.vocab_size) if i not in special])
    parts, names, it = [], [], iter(texts)
    for k, (name, n) in enumerate(sources):
        if n is None:
            ids, source = next(it)
        else:
            ids = teacher_tokens(model, n, seq_len, starts, device=device, seed=seed + k, progress=progress)
            source = f"{len(ids):,} tokens sampled from the FP model (seed {seed + k})"
        parts.append(ids)
        names.append(source)
    eos = tokenizer.eos_token_id
    if eos is not None and len(parts) > 1:
        parts = [p for part in parts for p in (part, torch.tensor([eos]))][:-1]
    return torch.cat(parts), " + ".join(names)
