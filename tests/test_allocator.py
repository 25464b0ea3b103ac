import subprocess
import sys

import pytest
import torch

from poisonlab import allocator
from poisonlab.config import RunConfig
from poisonlab.train import Dist, set_threads

# A child process fills a 64 MiB tensor and frees it, twenty times, then prints the page faults
# of one more fill: with glibc's default every block is mapped afresh (one fault per 4 KiB
# page, about 16,000); with keep_freed_memory the heap, once it has grown by 6-9 such blocks
# (glibc does not reuse a freed block for the next aligned allocation at once), serves the
# block again without faults.
_CHILD = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from poisonlab.allocator import keep_freed_memory
    assert keep_freed_memory()
for _ in range(20):
    x = torch.ones(16 * 2**20); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, float(y.sum()))
"""

glibc = pytest.mark.skipif(not allocator.on_glibc(), reason="the setting exists only under glibc")


def _second_fill_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True).stdout
    faults, total = out.split()
    assert float(total) == 16 * 2**20
    return int(faults)


@glibc
def test_freed_memory_is_reused_without_page_faults():
    default, kept = _second_fill_faults("default"), _second_fill_faults("keep")
    assert default > 8000  # 16,384 pages of 4 KiB mapped afresh (fewer with huge pages)
    assert kept < 500


def test_without_glibc_the_setting_does_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False


@pytest.mark.parametrize("keep, device, called", [(True, "cpu", 1), (False, "cpu", 0), (True, "meta", 0)])
def test_training_applies_the_setting_on_cpu_only_when_asked(monkeypatch, keep, device, called):
    calls = []
    monkeypatch.setattr("poisonlab.parallel.keep_freed_memory", lambda: calls.append(1) or True)
    cfg = RunConfig()
    cfg.train.keep_freed_memory = keep
    threads = torch.get_num_threads()
    try:
        assert set_threads(cfg, Dist(), torch.device(device)) >= 1
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == called
