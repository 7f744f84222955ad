"""PNG plots of a benchmark (matplotlib, Agg backend): TTFT against prompt length, decode bars.

Emulated results carry the label in the title and across the plot area.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from slim_edge.devices.qemu_arm64 import EMULATED_LABEL  # noqa: E402


def _title(result, what: str) -> str:
    d = result.device
    t = f"{what} — {d.device}: {d.soc}"
    return t + f"\n{EMULATED_LABEL}" if result.emulated else t


def _stamp(ax, result) -> None:
    if result.emulated:
        ax.text(
            0.5,
            0.5,
            EMULATED_LABEL,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=18,
            color="red",
            alpha=0.25,
            rotation=20,
        )


def _save(fig, path: Path, result) -> None:
    """Write via a temporary name; the PNG's Description text chunk carries the emulated label."""
    tmp = Path(path).with_suffix(".tmp.png")
    meta = {"Software": "slim-edge bench", "Description": EMULATED_LABEL if result.emulated else "measured"}
    fig.savefig(tmp, dpi=120, metadata=meta)
    plt.close(fig)
    tmp.replace(path)


def plot_ttft(result, path: Path) -> Path:
    """One line per model and thread count: TTFT (ms) against prompt length, with ±std bars."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in result.models:
        for t in sorted({e["n_threads"] for e in m.prefill}):
            es = [e for e in m.prefill if e["n_threads"] == t]
            ax.errorbar(
                [e["n_prompt"] for e in es],
                [e["ttft_ms_mean"] for e in es],
                yerr=[e["ttft_ms_std"] for e in es],
                marker="o",
                capsize=3,
                label=f"{m.name} · {t}t",
            )
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    return _finish(fig, ax, result, "Time to first token", path)


def plot_decode(result, path: Path) -> Path:
    """Grouped bars: decode tokens/s per model, one bar per thread count, with ±std."""
    fig, ax = plt.subplots(figsize=(8, 5))
    threads = sorted({e["n_threads"] for m in result.models for e in m.decode})
    width = 0.8 / max(len(threads), 1)
    for j, t in enumerate(threads):
        xs, ys, errs = [], [], []
        for i, m in enumerate(result.models):
            e = next((e for e in m.decode if e["n_threads"] == t), None)
            if e:
                xs.append(i + (j - (len(threads) - 1) / 2) * width)
                ys.append(e["tps_mean"])
                errs.append(e["tps_std"])
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=f"{t} thread{'s' if t > 1 else ''}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(result.models)), [m.name for m in result.models], rotation=15, fontsize=8)
    n_gen = next((e["n_gen"] for m in result.models for e in m.decode), "")
    ax.set_ylabel(f"decode tokens/s (tg{n_gen})")
    ax.grid(True, axis="y", alpha=0.3)
    return _finish(fig, ax, result, "Decode speed", path)


def _finish(fig, ax, result, title: str, path: Path) -> Path:
    """Legend, titled and stamped (emulated runs say so), laid out and saved."""
    ax.legend(fontsize=8)
    ax.set_title(_title(result, title), fontsize=10)
    _stamp(ax, result)
    fig.tight_layout()
    _save(fig, path, result)
    return path
