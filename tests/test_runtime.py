"""The allocator setting: a large tensor allocated again after being freed no longer page-faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Run in a fresh interpreter, as the trainer applies the setting at the start of its process: in the test
# session's own process, the heap left by hundreds of earlier tests decides where a 64 MiB block lands (once
# every cycle faulted afresh there), which is not what the setting does for a process that starts with it.
MEASURE = r"""
import json, resource
import torch
from mixturelm.runtime import steady_allocator

def faults_of_fresh_64mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20)  # 64 MiB, over glibc's largest mmap threshold
    t.fill_(1.0)  # touch every page
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = steady_allocator()
faults_of_fresh_64mb_tensor()  # the first time the heap grows and faults
print(json.dumps({"applied": applied, "pages": (64 << 20) // resource.getpagesize(),
                  "faults": sum(faults_of_fresh_64mb_tensor() for _ in range(6))}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_steady_allocator_reuses_large_blocks():
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True, timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["applied"]
    faults, pages = r["faults"], r["pages"]
    # glibc's default mmaps such a block afresh each time: 6 cycles fault 6 x pages. Kept in the heap,
    # freed blocks are reused (glibc still returns some of them: about half the cycles fault here).
    assert faults < 0.75 * 6 * pages, (faults, pages)
