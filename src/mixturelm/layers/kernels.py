"""A fused CPU kernel for PEER's gather-and-dot, out_tj = table[ids_tj] . x_t, compiled on first use.

PyTorch has no fused op for it: index_select + bmm writes every gathered row to memory and reads it
again, and a batched (1 x d)(d x 1) product runs at a fraction of the memory bandwidth. This loop
reads each row once, prefetching rows a few pairs ahead (the gather is latency bound: rows are 1 KB
apart at random in a table of gigabytes), and parallelises over tokens with OpenMP.

It is plain C called through ctypes, so it needs only a C compiler (`cc`, found on first use and
built into $MIXTURELM_CACHE/kernels, ~1 s); where there is none, or on CUDA, or with
MIXTURELM_PEER_KERNEL=0, PEER uses the PyTorch ops instead (same results, tested both ways).
The library links libgomp by its soname, so it joins the OpenMP runtime that torch has loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>

#define GATHER_DOT(NAME, T)                                                                           \
void NAME(const T* table, const int64_t* ids, const T* x, T* out, int64_t n_tok, int64_t J,        \
          int64_t D, int n_threads) {                                                              \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                            \
    for (int64_t t = 0; t < n_tok; ++t) {                                                          \
        const T* xt = x + t * D;                                                                   \
        const int64_t* it = ids + t * J;                                                           \
        for (int64_t j = 0; j < J; ++j) {                                                          \
            if (j + 3 < J) {                                                                       \
                const char* ahead = (const char*)(table + it[j + 3] * D);                          \
                for (int64_t b = 0; b < D * (int64_t)sizeof(T); b += 64)                           \
                    __builtin_prefetch(ahead + b, 0, 0);                                           \
            }                                                                                      \
            const T* row = table + it[j] * D;                                                      \
            T s = 0;                                                                               \
            _Pragma("omp simd reduction(+:s)")                                                     \
            for (int64_t d = 0; d < D; ++d) s += row[d] * xt[d];                                   \
            out[t * J + j] = s;                                                                    \
        }                                                                                          \
    }                                                                                              \
}

GATHER_DOT(gather_dot_f32, float)
GATHER_DOT(gather_dot_f64, double)
"""

_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("MIXTURELM_CACHE", Path.home() / ".cache" / "mixturelm")) / "kernels"


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
    key = hashlib.sha256((SOURCE + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    path = _cache_dir() / f"peer_{key}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "peer.c", Path(tmp) / "peer.so"
            src.write_text(SOURCE)
            proc = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                warnings.warn(f"PEER kernel did not compile, using PyTorch ops: {proc.stderr[-500:]}")
                return None
            os.replace(out, path)  # atomic: a concurrent build finds a whole library or none
    lib = ctypes.CDLL(str(path))
    for name in ("gather_dot_f32", "gather_dot_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be had (then the caller uses PyTorch ops)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MIXTURELM_PEER_KERNEL", "1") != "0":
            try:
                _lib = _build()
            except OSError as e:
                warnings.warn(f"PEER kernel unavailable, using PyTorch ops: {e}")
    return _lib


def usable(*tensors: torch.Tensor) -> bool:
    return (all(t.device.type == "cpu" for t in tensors) and tensors[0].dtype in (torch.float32, torch.float64)
            and library() is not None)


def gather_dot(table_ND: torch.Tensor, ids_TJ: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
    """out_tj = table[ids_tj] . x_t for contiguous CPU float32/float64 tensors (ids int64, in range)."""
    table_ND, ids_TJ = table_ND.contiguous(), ids_TJ.contiguous()
    x_TD = x_TD.to(table_ND.dtype).contiguous()
    T, J = ids_TJ.shape
    out = torch.empty(T, J, dtype=table_ND.dtype)
    fn = library().gather_dot_f32 if table_ND.dtype == torch.float32 else library().gather_dot_f64
    fn(table_ND.data_ptr(), ids_TJ.data_ptr(), x_TD.data_ptr(), out.data_ptr(), T, J, table_ND.shape[1],
       torch.get_num_threads())
    return out
