"""The allocator setting: a large tensor allocated again after being freed no longer page-faults."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from mixturelm.runtime import steady_allocator


def _faults_of_fresh_64mb_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20)  # 64 MiB, over glibc's largest mmap threshold
    t.fill_(1.0)  # touch every page
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_steady_allocator_reuses_large_blocks():
    assert steady_allocator()
    _faults_of_fresh_64mb_tensor()  # the first time the heap grows and faults
    pages = (64 << 20) // resource.getpagesize()
    # glibc's default mmaps such a block afresh each time: 6 cycles fault 6 x pages. Kept in the heap,
    # freed blocks are reused (glibc still returns some of them: about half the cycles fault here).
    faults = sum(_faults_of_fresh_64mb_tensor() for _ in range(6))
    assert faults < 0.75 * 6 * pages, (faults, pages)
