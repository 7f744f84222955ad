"""The host device's measured run."""

import sys

import numpy as np

from slim_edge.devices.host import run_with_rusage


def test_peak_memory_is_the_childs_own_not_the_large_parents():
    """From a parent holding 1.5 GB, a child that allocates ~200 MB must report ~200 MB: wait4's ru_maxrss
    would report the parent's 1.5 GB (Linux carries it through fork and exec)."""
    ballast = np.ones(1_500 * 2**20 // 8)  # touched: resident in this process
    child = [sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(0.3)"]
    res = run_with_rusage(child)
    assert res.returncode == 0 and res.peak_rss_method == "VmHWM"
    assert 200_000 < res.peak_rss_kb < 400_000, res.peak_rss_kb
    assert ballast.sum() > 0


def test_isa_picks_the_host_build(monkeypatch):
    """`slim-edge bench --isa avx512` runs the AVX-512 build: the host device asks find_runtime for that ISA (the
    default stays the AVX2 build)."""
    from slim_edge.devices import base, get_device

    asked = []
    monkeypatch.setattr(
        base,
        "find_runtime",
        lambda target, tools=None, isa="avx2": (
            asked.append((target, isa)) or type("Rt", (), {"bin_dir": f"/{isa}/bin", "lib_dir": f"/{isa}/lib"})()
        ),
    )
    assert get_device("host", isa="avx512").runtime_dirs(("llama-bench",)) == ("/avx512/bin", "/avx512/lib")
    assert get_device("host").runtime_dirs() == ("/avx2/bin", "/avx2/lib")
    assert asked == [("host", "avx512"), ("host", "avx2")]
