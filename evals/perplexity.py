"""Perplexity the way `llama-perplexity` computes it (tools/perplexity/perplexity.cpp, pinned tree).

The text is tokenized once, as a whole (a BOS in front only when the tokenizer adds one). It is cut
into n_chunk = len(tokens) // ctx chunks of ctx tokens; at least 2·ctx tokens are needed. Each chunk
is evaluated from an empty context; if the model adds BOS, the chunk's first token is replaced by BOS.
Only the second half is scored: the logits at positions first = ctx/2 .. ctx−2 predict tokens
first+1 .. ctx−1, so each chunk scores ctx − 1 − ctx/2 tokens (255 for ctx = 512).
PPL = exp(mean NLL); its error is PPL·sqrt((E[nll²] − E[nll]²)/(n − 1)), as llama-perplexity prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from slim_edge.errors import SlimEdgeError
from slim_edge.evals.kld import log_softmax


@dataclass(frozen=True)
class Chunks:
    """The evaluation tokens cut into chunks, ready for any backend."""

    tokens: np.ndarray  # int32 [n_chunk, ctx], BOS already placed when add_bos
    targets: np.ndarray  # int32 [n_chunk, ctx - 1 - first]: the scored tokens
    ctx: int
    add_bos: bool
    n_text_tokens: int  # tokens in the whole text (including a leading BOS)

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def n_chunk(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_scored(self) -> int:
        return self.targets.size


def make_chunks(
    text_tokens, ctx: int = 512, max_chunks: int | None = None, add_bos: bool = False, bos_id: int | None = None
) -> Chunks:
    """Chunks of `ctx` tokens from the token ids of the whole text (without BOS)."""
    if ctx < 4 or ctx % 2:
        raise SlimEdgeError(f"context {ctx} is not usable; pass an even context of at least 4, e.g. 512")
    if add_bos and bos_id is None:
        raise SlimEdgeError("the tokenizer adds BOS but has no BOS token id; fix the tokenizer config")
    toks = ([bos_id] if add_bos else []) + [int(t) for t in text_tokens]
    if len(toks) < 2 * ctx:
        raise SlimEdgeError(
            f"the text tokenizes to only {len(toks)} tokens; a context of {ctx} needs at least "
            f"{2 * ctx}: use a longer text or a smaller --ctx"
        )
    n_chunk = len(toks) // ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise SlimEdgeError(f"max_chunks must be at least 1; got {max_chunks}")
        n_chunk = min(n_chunk, max_chunks)
    arr = np.asarray(toks[: n_chunk * ctx], dtype=np.int32).reshape(n_chunk, ctx)
    first = ctx // 2
    targets = arr[:, first + 1 :].copy()
    if add_bos:
        arr = arr.copy()
        arr[:, 0] = bos_id
    return Chunks(arr, targets, ctx, add_bos, len(toks))


def chunk_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float64 negative log-likelihood of each target under the [n, vocab] logits that predict it."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), np.asarray(targets, dtype=np.int64)]


def scored_logits(lm, chunk_tokens: np.ndarray, first: int) -> np.ndarray:
    """The logits at positions first .. ctx−2 (the ones that predict the scored tokens)."""
    return lm.logits(chunk_tokens, first)[:-1]


def ppl_from_nll(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, its standard error) as llama-perplexity's final estimate."""
    nll = np.asarray(nll, dtype=np.float64)
    n = nll.size
    if n == 0:
        raise SlimEdgeError("no scored tokens: the evaluation text is too short")
    mean = nll.sum() / n
    var = (nll * nll).sum() / n - mean * mean
    ppl = math.exp(mean)
    return ppl, (ppl * math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0)


def perplexity(lm, chunks: Chunks, progress: bool = True) -> dict:
    """PPL of one backend (TorchLM or LlamaCppLM) over the chunks; returns the per-token NLL too."""
    from tqdm.auto import tqdm

    parts = []
    for i in tqdm(range(chunks.n_chunk), desc=f"ppl {lm.name}", unit="chunk", disable=not progress):
        parts.append(chunk_nll(scored_logits(lm, chunks.tokens[i], chunks.first), chunks.targets[i]))
    nll = np.concatenate(parts)
    ppl, err = ppl_from_nll(nll)
    return {"ppl": ppl, "ppl_err": err, "tokens": int(nll.size), "nll": nll}
