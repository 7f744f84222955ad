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
