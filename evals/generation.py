"""Generation check: greedy continuations of a few fixed prompts, and how much they repeat.

Broken low-bit models often keep a fine perplexity yet fall into loops when they generate. Two numbers:
- repeat rate: of the n-grams (n = 4) of the generated tokens, the fraction that already occurred
  earlier in the same continuation (0 for text that never repeats itself, → 1 for a loop);
- tail loop: the smallest period p ≤ 32 such that the last max(3·p, 16) tokens repeat with period p
  (0 when the tail is not a loop).
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPTS = (
    "The history of the city begins in the twelfth century, when",
    "To make a good cup of tea, you should",
    "The main difference between a virus and a bacterium is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
)


def repeat_rate(tokens, n: int = 4) -> float:
    """Fraction of the n-grams of `tokens` that occurred earlier in `tokens` (0.0 when there are none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen, repeated = set(), 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams)


def tail_loop_period(tokens, max_period: int = 32, min_repeats: int = 3, min_len: int = 16) -> int:
    """Smallest p ≤ max_period such that the last max(min_repeats·p, min_len) tokens have period p; else 0."""
    t = list(tokens)
    for p in range(1, max_period + 1):
        m = max(min_repeats * p, min_len)
        if len(t) < m:
            break
        tail = t[-m:]
        if all(tail[i] == tail[i + p] for i in range(m - p)):
            return p
    return 0


@dataclass
class Continuation:
    prompt: str
    text: str
    tokens: list[int]
    repeat_rate: float
    loop_period: int


def generation_check(lm, n_new: int = 64, prompts=PROMPTS, progress: bool = True) -> dict:
    """Greedy continuations of `prompts` by one backend (TorchLM or LlamaCppLM), with loop measures."""
    from tqdm.auto import tqdm

    outs = []
    for p in tqdm(prompts, desc=f"generate {lm.name}", unit="prompt", disable=not progress):
        ids = ([lm.bos_id] if lm.add_bos else []) + lm.tokenize(p)
        new = lm.greedy(ids, n_new)
        outs.append(Continuation(p, lm.detokenize(new), new, repeat_rate(new), tail_loop_period(new)))
    return {
        "n_new": n_new,
        "repeat_rate": sum(c.repeat_rate for c in outs) / len(outs),
        "loops": sum(c.loop_period > 0 for c in outs),
        "continuations": [c.__dict__ for c in outs],
    }
