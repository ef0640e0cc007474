"""Benchmark fixtures: models built once, devices, and peak-memory measurement.

Run: ``python -m pytest bench --benchmark-json=bench/results/<name>.json`` then
``python bench/report.py bench/results/<name>.json``.
"""
import os
import threading
import time

import pytest
import torch


def devices():
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


def batch_sizes(device):
    """Batch 64 first on CUDA: the speed goals are set there, and a run cut short keeps it."""
    return (64, 8, 1) if device == "cuda" else (1, 8)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or on CPU the peak resident set size
    above the level at entry (sampled every millisecond)."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self._stop = _rss_bytes(), threading.Event()
            self.peak_rss = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak_rss, _rss_bytes()) - self.base


@pytest.fixture(scope="session")
def model_cache():
    return {}


def pytest_runtest_setup(item):
    """With ``RELPROP_BENCH_DEADLINE`` (Unix seconds) set, cases not yet started when it has
    passed are skipped, so a run against a deadline still ends normally and writes its JSON."""
    deadline = os.environ.get("RELPROP_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("RELPROP_BENCH_DEADLINE has passed")
