"""Process-level settings that make CPU training and benchmarks fast and steady."""

from __future__ import annotations


def steady_allocator() -> bool:
    """glibc malloc: serve every block from the heap and keep freed memory for reuse (no mmap, trim
    threshold 2 GiB). By default each block over 32 MiB is mmapped fresh and page-faulted 4 KiB at a
    time on every step: up to a third of a CPU training step, 325k faults in a fine-grained MoE step.
    The price: memory freed by the process is not returned to the system. Process-wide, so every
    contender of a benchmark gets it alike. Returns False where it could not be set (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, and M_MMAP_MAX = 0: blocks over the largest threshold
        # glibc allows (32 MiB) would be mmapped fresh, and page-faulted, on every allocation.
        # mallopt takes a C int: 2**31 - 1 is the largest trim threshold it can be given.
        settings = ((-3, 32 << 20), (-1, 2**31 - 1), (-4, 0))
        return all(libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) for option, value in settings)
    except (OSError, AttributeError):
        return False


def memory_bytes(device: str = "cpu") -> int:
    """The memory a run can use on device: the machine's RAM, or the GPU's."""
    import os

    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(needed: float, what: str, fix: str, device: str = "cpu") -> None:
    """Refuse, before allocating anything, what cannot fit in memory on device."""
    from .errors import UsageError

    have = memory_bytes(device)
    if needed > have:
        raise UsageError(f"{what} needs about {_gb(needed)} of memory, more than the {_gb(have)} of this "
                         f"{'GPU' if str(device).startswith('cuda') else 'machine'}; {fix}")


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GB" if n < 2**60 else f"{n:.2g} bytes"
