"""The run's own peak memory, not the process's lifetime maximum (issue 9)."""

from __future__ import annotations

import resource
import time

import numpy as np

from core.peak_memory import PeakMemory, rss_mb


def test_peak_is_the_runs_own_not_the_processes():
    big = np.ones(400 * 2**20 // 8)  # 400 MiB touched, then freed: the lifetime peak now includes it
    big[::512] = 2.0
    del big
    lifetime_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with PeakMemory(interval_s=0.01) as mem:
        work = np.ones(100 * 2**20 // 8)  # 100 MiB during the "run"
        work[::512] = 3.0
        time.sleep(0.05)  # give the sampler its turn while the memory is held
        del work
    assert mem.peak_mb - mem.start_mb > 80, (mem.start_mb, mem.peak_mb)
    assert mem.peak_mb < lifetime_mb - 200, (mem.peak_mb, lifetime_mb)
    assert abs(rss_mb() - mem.start_mb) < 150
