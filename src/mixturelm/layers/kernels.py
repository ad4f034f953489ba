"""Fused CPU kernels, compiled on first use. For PEER: the gather-and-dot out_tj = table[ids_tj] . x_t,
the product-key top-k (each half's top-k, then the top-k of the k x k sums, in one pass), the grouping of
pairs by table row, the touched rows of a table's gradient and their lazy Adam step. For Mixture-of-Depths:
decoding attention over a ragged cache, each entering row against its own cached tokens where they lie.

PyTorch has no fused op for these: index_select + bmm writes every gathered row to memory and reads it
again, and a batched (1 x d)(d x 1) product runs at a fraction of the memory bandwidth. The gather loop
reads each row once, prefetching rows a few pairs ahead (the gather is latency bound: rows are 1 KB
apart at random in a table of gigabytes), and parallelises over tokens with OpenMP. The top-k keeps
k values per row in a sorted array (one comparison for most scores), where torch.topk partially
sorts each row and the candidate stage would take ten more ops. The ragged attention replaces one
scaled_dot_product_attention call per entering row (slicing, a kernel launch and its buffers each) by one
call for all of them.

It is plain C called through ctypes (each function registered as a custom op, mixturelm::*, so that
torch.compile keeps it whole), so it needs only a C compiler (`cc`, found on first use and
built into $MIXTURELM_CACHE/kernels, ~1 s); where there is none, or on CUDA, or with
MIXTURELM_KERNELS=0 (the older name MIXTURELM_PEER_KERNEL=0 still works), the layers use PyTorch ops
instead (same results, tested both ways).
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
from torch.utils._python_dispatch import _get_current_dispatch_mode

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#define PF 4  /* rows prefetched ahead */

#define GATHER_DOT(NAME, T)                                                                           \
void NAME(const T* table, const int64_t* ids, const T* x, T* out, int64_t n_tok, int64_t J,        \
          int64_t D, int n_threads) {                                                              \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                            \
    for (int64_t t = 0; t < n_tok; ++t) {                                                          \
        const T* xt = x + t * D;                                                                   \
        const int64_t* it = ids + t * J;                                                           \
        for (int64_t j = 0; j < J; ++j) {                                                          \
            if (j + PF < J) {                                                                      \
                const char* ahead = (const char*)(table + it[j + PF] * D);                         \
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

/* keep the k largest of a stream, sorted descending; on ties the earlier one stays first */
#define TOPK_INSERT(T)                                                                             \
static inline void topk_insert_##T(T* val, int64_t* idx, int64_t k, T v, int64_t i) {              \
    if (!(v > val[k - 1])) return;                                                                 \
    int64_t p = k - 1;                                                                             \
    while (p > 0 && v > val[p - 1]) { val[p] = val[p - 1]; idx[p] = idx[p - 1]; --p; }              \
    val[p] = v; idx[p] = i;                                                                        \
}
TOPK_INSERT(float)
TOPK_INSERT(double)

/* Product-key top-k. scores: (2, H, n_tok, S), the two halves' sub-key scores of each head's query.
   For each (token, head): the top-k of each half, then the top-k of the k*k sums, best first.
   Writes the sub-key ids a, b: (n_tok, H, k). k <= 64. */
#define PK_TOPK(NAME, T)                                                                           \
void NAME(const T* scores, int64_t* a_out, int64_t* b_out, int64_t n_tok, int64_t H, int64_t S,    \
          int64_t k, int n_threads) {                                                              \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                            \
    for (int64_t th = 0; th < n_tok * H; ++th) {                                                   \
        int64_t t = th / H, h = th % H;                                                            \
        T v1[64], v2[64], vc[64]; int64_t i1[64], i2[64], ic[64];                                  \
        for (int64_t p = 0; p < k; ++p) { v1[p] = v2[p] = vc[p] = -(T)INFINITY; i1[p] = i2[p] = ic[p] = -1; } \
        const T* r1 = scores + (h * n_tok + t) * S;                                                \
        const T* r2 = scores + ((H + h) * n_tok + t) * S;                                          \
        for (int64_t s = 0; s < S; ++s) { topk_insert_##T(v1, i1, k, r1[s], s);                     \
                                          topk_insert_##T(v2, i2, k, r2[s], s); }                  \
        for (int64_t p = 0; p < k; ++p) {                                                          \
            if (!(v1[p] + v2[0] > vc[k - 1])) break;  /* rows sorted: nothing further can enter */  \
            for (int64_t q = 0; q < k; ++q) {                                                      \
                T v = v1[p] + v2[q];                                                               \
                if (!(v > vc[k - 1])) break;                                                       \
                topk_insert_##T(vc, ic, k, v, p * k + q);                                          \
            }                                                                                      \
        }                                                                                          \
        for (int64_t p = 0; p < k; ++p) {                                                          \
            a_out[th * k + p] = i1[ic[p] / k];                                                     \
            b_out[th * k + p] = i2[ic[p] % k];                                                     \
        }                                                                                          \
    }                                                                                              \
}
PK_TOPK(pk_topk_f32, float)
PK_TOPK(pk_topk_f64, double)

/* Table-gradient rows: out[r] = sum over the pairs p of row r (in grouped order) of w[order[p]] * src[token[p]].
   Rows in parallel; each is written once, so there is no race and no zero-fill of the output. */
#define ROW_GRAD(NAME, T)                                                                          \
void NAME(const T* src, const T* w, const int64_t* order, const int64_t* token,                    \
          const int64_t* offsets, T* out, int64_t R, int64_t n, int64_t D, int n_threads) {         \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                            \
    for (int64_t r = 0; r < R; ++r) {                                                              \
        T* o = out + r * D;                                                                        \
        int64_t end = r + 1 < R ? offsets[r + 1] : n;                                              \
        for (int64_t d = 0; d < D; ++d) o[d] = 0;                                                  \
        for (int64_t p = offsets[r]; p < end; ++p) {                                               \
            const T* s = src + token[p] * D;                                                       \
            T wp = w[order[p]];                                                                    \
            _Pragma("omp simd")                                                                    \
            for (int64_t d = 0; d < D; ++d) o[d] += wp * s[d];                                     \
        }                                                                                          \
    }                                                                                              \
}
ROW_GRAD(row_grad_f32, float)
ROW_GRAD(row_grad_f64, double)

/* Lazy Adam on the rows a row-sparse gradient touches (torch.optim.SparseAdam's arithmetic), one pass:
   each touched row of the parameter and its two moments is read and written once. rows: distinct ids. */
#define ROW_ADAM(NAME, T)                                                                          \
void NAME(T* p, T* m, T* v, const int64_t* rows, const T* g, int64_t R, int64_t D, double b1,      \
          double b2, double eps, double step_size, double decay, int n_threads) {                  \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                            \
    for (int64_t r = 0; r < R; ++r) {                                                              \
        T* pr = p + rows[r] * D; T* mr = m + rows[r] * D; T* vr = v + rows[r] * D;                 \
        const T* gr = g + r * D;                                                                   \
        _Pragma("omp simd")                                                                        \
        for (int64_t d = 0; d < D; ++d) {                                                          \
            T gd = gr[d];                                                                          \
            T md = mr[d] + (gd - mr[d]) * (T)(1 - b1);                                             \
            T vd = vr[d] + (gd * gd - vr[d]) * (T)(1 - b2);                                        \
            mr[d] = md; vr[d] = vd;                                                                \
            pr[d] = pr[d] * (T)decay - (T)step_size * (md / (sqrtf_##T(vd) + (T)eps));              \
        }                                                                                          \
    }                                                                                              \
}
static inline float sqrtf_float(float x) { return sqrtf(x); }
static inline double sqrtf_double(double x) { return sqrt(x); }
ROW_ADAM(row_adam_f32, float)
ROW_ADAM(row_adam_f64, double)

/* Group the n pairs by row id (a stable counting sort; ids in [0, n_rows), count zeroed, n_rows + 1
   long): order (pairs by row), token (= order / J), the distinct rows ascending and where each
   row's pairs start. Returns the number of distinct rows. */
int64_t group_rows(const int64_t* ids, int64_t n, int64_t n_rows, int64_t J, int64_t* count,
                   int64_t* order, int64_t* token, int64_t* rows, int64_t* offsets) {
    for (int64_t p = 0; p < n; ++p) count[ids[p] + 1]++;
    int64_t R = 0;
    for (int64_t r = 0; r < n_rows; ++r) {
        if (count[r + 1]) { rows[R] = r; offsets[R] = count[r]; ++R; }
        count[r + 1] += count[r];
    }
    for (int64_t p = 0; p < n; ++p) {
        int64_t dst = count[ids[p]]++;
        order[dst] = p;
        token[dst] = p / J;
    }
    return R;
}

/* One decoding step of a ragged cache (Mixture-of-Depths' routed blocks). Call row r is batch row rows[r]:
   its new key and value (G, K) are written at slot length[rows[r]] of that row, the length grows by one, and
   its one query per head attends to the row's cached tokens, its own included.
   q, out: (R, H, K); knew, vnew: (R, G, K); k, v: (B, L, G, K); head h reads kv head h / (H / G).
   Checked before anything is written: rows in [0, B) and distinct (-2 otherwise), every row with a free slot
   (else the number of full rows), memory for the scores (-1 otherwise); returns 0 when done. Rows in
   parallel; each row's keys, then its values, are read once, front to back (all heads of a token lie
   together): the scores of every head first, then their softmax, then the weighted sum of the values. */
static int64_t ragged_rows_check(const int64_t* rows, const int64_t* length, int64_t R, int64_t B, int64_t L,
                                 int64_t* longest) {
    int64_t full = 0;
    char* seen = (char*)calloc(B > 0 ? B : 1, 1);
    if (!seen) return -1;
    *longest = 0;
    for (int64_t r = 0; r < R; ++r) {
        int64_t b = rows[r];
        if (b < 0 || b >= B || seen[b]) { free(seen); return -2; }
        seen[b] = 1;
        full += length[b] >= L;
        if (length[b] + 1 > *longest) *longest = length[b] + 1;
    }
    free(seen);
    return full;
}

#define RAGGED_DECODE(NAME, T, EXP)                                                                \
int64_t NAME(const T* q, const T* knew, const T* vnew, T* k, T* v, int64_t* length,                 \
             const int64_t* rows, T* out, int64_t R, int64_t B, int64_t H, int64_t G, int64_t L,    \
             int64_t K, double scale, int n_threads) {                                             \
    int64_t rep = H / G, longest = 0;                                                              \
    int64_t full = ragged_rows_check(rows, length, R, B, L, &longest);                             \
    if (full) return full;                                                                         \
    int64_t stride = (longest + 2) * H;  /* per thread: scores (n, H), then max and sum per head */ \
    T* scratch = (T*)malloc((size_t)(n_threads * stride) * sizeof(T));                             \
    if (!scratch) return -1;                                                                       \
    _Pragma("omp parallel for num_threads(n_threads) schedule(dynamic, 1)")                        \
    for (int64_t r = 0; r < R; ++r) {                                                              \
        int64_t b = rows[r], n = length[b] + 1;                                                    \
        T* kb = k + b * L * G * K;                                                                 \
        T* vb = v + b * L * G * K;                                                                 \
        for (int64_t i = 0; i < G * K; ++i) {                                                      \
            kb[(n - 1) * G * K + i] = knew[r * G * K + i];                                         \
            vb[(n - 1) * G * K + i] = vnew[r * G * K + i];                                         \
        }                                                                                          \
        length[b] = n;                                                                             \
        const T* qr = q + r * H * K;                                                               \
        T* o = out + r * H * K;                                                                    \
        T* p = scratch + omp_get_thread_num() * stride;                                            \
        T* mx = p + n * H; T* sum = mx + H;                                                        \
        for (int64_t h = 0; h < H; ++h) { mx[h] = -(T)INFINITY; sum[h] = 0; }                      \
        for (int64_t j = 0; j < n; ++j) {                                                          \
            const T* kj = kb + j * G * K;                                                          \
            for (int64_t h = 0; h < H; ++h) {                                                      \
                const T* qh = qr + h * K; const T* kh = kj + (h / rep) * K;                        \
                T dot = 0;                                                                         \
                _Pragma("omp simd reduction(+:dot)")                                               \
                for (int64_t d = 0; d < K; ++d) dot += qh[d] * kh[d];                              \
                dot *= (T)scale;                                                                   \
                p[j * H + h] = dot;                                                                \
                if (dot > mx[h]) mx[h] = dot;                                                      \
            }                                                                                      \
        }                                                                                          \
        for (int64_t j = 0; j < n; ++j)                                                            \
            for (int64_t h = 0; h < H; ++h) {                                                      \
                T e = EXP(p[j * H + h] - mx[h]);                                                   \
                p[j * H + h] = e; sum[h] += e;                                                     \
            }                                                                                      \
        for (int64_t i = 0; i < H * K; ++i) o[i] = 0;                                              \
        for (int64_t j = 0; j < n; ++j) {                                                          \
            const T* vj = vb + j * G * K;                                                          \
            for (int64_t h = 0; h < H; ++h) {                                                      \
                T w = p[j * H + h]; T* oh = o + h * K; const T* vh = vj + (h / rep) * K;           \
                _Pragma("omp simd")                                                                \
                for (int64_t d = 0; d < K; ++d) oh[d] += w * vh[d];                                \
            }                                                                                      \
        }                                                                                          \
        for (int64_t h = 0; h < H; ++h)                                                            \
            for (int64_t d = 0; d < K; ++d) o[h * K + d] /= sum[h];                                \
    }                                                                                              \
    free(scratch);                                                                                 \
    return 0;                                                                                      \
}
RAGGED_DECODE(ragged_decode_f32, float, expf)
RAGGED_DECODE(ragged_decode_f64, double, exp)

/* Decoding's weight products: y (M, N) = x (M, K) w (N, K)^T (+ bias), float32, for a few rows M. At a few
   rows torch's CPU matmul reads a weight at a third to a half of the memory's rate. Each thread takes its share
   of w four rows at a time: it prefetches the next four rows into L2 while it takes the current four rows'
   dot products with every row of x, four rows of x at a time (sixteen vector accumulators, eight loads per
   sixteen fused multiply-adds), and sums each accumulator's lanes with a tree of shuffles, which gives the
   sixteen results in vectors instead of sixteen horizontal sums (those cost as much as the products). */
#if defined(__AVX512F__)
#define FR_BYTES 64
#elif defined(__AVX__)
#define FR_BYTES 32
#else
#define FR_BYTES 16
#endif
#define FR_LANES (FR_BYTES / 4)
typedef float fr_vec __attribute__((vector_size(FR_BYTES)));
typedef int32_t fr_ivec __attribute__((vector_size(FR_BYTES)));

static inline fr_vec fr_load(const float* p) { fr_vec v; memcpy(&v, p, FR_BYTES); return v; }

#if defined(__GNUC__) && !defined(__clang__)
/* One level of the tree: lanes in blocks of 2s, the first s of each block the pairwise sums of a's lanes, the
   next s those of b's. After log2(lanes) levels over `lanes` vectors, lane i holds the sum of vector i. */
static inline __attribute__((always_inline)) fr_vec fr_fold(fr_vec a, fr_vec b, int s) {
    fr_ivec lo, hi;
    for (int i = 0; i < FR_LANES; ++i) {
        int base = i / (2 * s) * 2 * s, off = i % (2 * s);
        lo[i] = off < s ? base + off : FR_LANES + base + off - s;
        hi[i] = off < s ? base + s + off : FR_LANES + base + off;
    }
    return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}
/* out[i] = the sum of acc[i]'s lanes, i < 16; every level's s a constant, so that the masks are */
static inline __attribute__((always_inline)) void fr_sum_lanes(fr_vec* acc, float* out) {
    for (int g = 0; g < 16; g += FR_LANES) {
        fr_vec* v = acc + g;
        for (int i = 0; i < FR_LANES / 2; ++i) v[i] = fr_fold(v[2 * i], v[2 * i + 1], 1);
        for (int i = 0; i < FR_LANES / 4; ++i) v[i] = fr_fold(v[2 * i], v[2 * i + 1], 2);
#if FR_LANES >= 8
        for (int i = 0; i < FR_LANES / 8; ++i) v[i] = fr_fold(v[2 * i], v[2 * i + 1], 4);
#endif
#if FR_LANES >= 16
        v[0] = fr_fold(v[0], v[1], 8);
#endif
        memcpy(out + g, &v[0], FR_BYTES);
    }
}
#else
static inline void fr_sum_lanes(fr_vec* acc, float* out) {
    for (int i = 0; i < 16; ++i) { float s = 0; for (int l = 0; l < FR_LANES; ++l) s += acc[i][l]; out[i] = s; }
}
#endif

#ifndef FR_PREFETCH_HINT
#define FR_PREFETCH_HINT 1  /* into L2 (prefetcht2); 0, non-temporal, kept the caches but halved the product's rate */
#endif

/* rows n..n+3 of w against rows m..m+MB-1 of x: y[m + i, n + j], accumulator i * 4 + j */
static inline __attribute__((always_inline)) void fr_tile(const float* x, const float* w, const float* bias,
                                                          float* y, int MB, int64_t N, int64_t K,
                                                          const float* next) {
    fr_vec acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = (fr_vec){0};
    int64_t k = 0;
    for (; k + FR_LANES <= K; k += FR_LANES) {
        if (next && k % 16 == 0)  /* one prefetch per 64-byte line of each next row */
            for (int j = 0; j < 4; ++j) __builtin_prefetch(next + j * K + k, 0, FR_PREFETCH_HINT);
        fr_vec w0 = fr_load(w + k), w1 = fr_load(w + K + k), w2 = fr_load(w + 2 * K + k), w3 = fr_load(w + 3 * K + k);
        for (int i = 0; i < MB; ++i) {
            fr_vec u = fr_load(x + i * K + k);
            acc[i * 4] += u * w0; acc[i * 4 + 1] += u * w1; acc[i * 4 + 2] += u * w2; acc[i * 4 + 3] += u * w3;
        }
    }
    float s[16];
    fr_sum_lanes(acc, s);
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < 4; ++j) {
            float t = s[i * 4 + j];
            for (int64_t r = k; r < K; ++r) t += x[i * K + r] * w[j * K + r];
            y[i * N + j] = bias ? t + bias[j] : t;
        }
}

int few_row_lanes(void) { return FR_LANES; }  /* floats per vector in this build */

void few_row_linear_f32(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t N,
                        int64_t K, int n_threads) {
    int64_t tiles = N / 4;
    _Pragma("omp parallel num_threads(n_threads)")
    {
        _Pragma("omp for schedule(static) nowait")
        for (int64_t t = 0; t < tiles; ++t) {
            const float* wt = w + t * 4 * K;
            const float* next = t + 1 < tiles ? wt + 4 * K : 0;  /* the first pass over x reads w from memory */
            const float* bt = bias ? bias + t * 4 : 0;
            for (int64_t m = 0; m < M; m += 4, next = 0) {
                const float* xm = x + m * K; float* ym = y + m * N + t * 4;
                switch (M - m) {  /* a constant MB each, so that the accumulators stay in registers */
                case 1: fr_tile(xm, wt, bt, ym, 1, N, K, next); break;
                case 2: fr_tile(xm, wt, bt, ym, 2, N, K, next); break;
                case 3: fr_tile(xm, wt, bt, ym, 3, N, K, next); break;
                default: fr_tile(xm, wt, bt, ym, 4, N, K, next);
                }
            }
        }
        _Pragma("omp for schedule(static)")
        for (int64_t n = tiles * 4; n < N; ++n)  /* the last N % 4 rows of w */
            for (int64_t m = 0; m < M; ++m) {
                float t = 0;
                for (int64_t r = 0; r < K; ++r) t += x[m * K + r] * w[n * K + r];
                y[m * N + n] = bias ? t + bias[n] : t;
            }
    }
}

/* A block's element-wise steps in inference: one call each where torch runs two to six ops, each of which
   costs 10-130 us in a decoding step (its code and data evicted by the weight products between them). Each row
   is computed alone, the same way at any row count and thread count, so prefill and decoding agree. Small
   inputs run on one thread: waking the others costs more than the work. */
#define EW_PARALLEL(work) const int64_t ew_work = (work); \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static) if(ew_work >= 65536)")

/* y = x / sqrt(mean(x^2) + eps) * w over the last dimension, as torch's rms_norm rounds it: (x * inv) * w */
void rms_norm_f32(const float* x, const float* w, float* y, int64_t M, int64_t D, double eps, int n_threads) {
    EW_PARALLEL(M * D)
    for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * D;
        float* ym = y + m * D;
        double ss = 0;
        _Pragma("omp simd reduction(+:ss)")
        for (int64_t d = 0; d < D; ++d) ss += (double)xm[d] * xm[d];
        float inv = (float)(1.0 / sqrt(ss / (double)D + eps));
        _Pragma("omp simd")
        for (int64_t d = 0; d < D; ++d) ym[d] = xm[d] * inv * w[d];
    }
}

/* In place, the rotary embedding of the first n_rot heads (size K) of each of M rows (row_stride floats apart):
   pairs (i, i + K/2) turned by row m's angles, cos/sin row m % period ((period, K/2): one per token, shared by
   the batch or not) */
void rope_rows_f32(float* x, const float* cos_, const float* sin_, int64_t M, int64_t row_stride, int64_t n_rot,
                   int64_t K, int64_t period, int n_threads) {
    int64_t half = K / 2;
    EW_PARALLEL(M * n_rot * K)
    for (int64_t m = 0; m < M; ++m) {
        const float* c = cos_ + (m % period) * half;
        const float* s = sin_ + (m % period) * half;
        for (int64_t h = 0; h < n_rot; ++h) {
            float* x1 = x + m * row_stride + h * K;
            float* x2 = x1 + half;
            _Pragma("omp simd")
            for (int64_t i = 0; i < half; ++i) {
                float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/* e^x for a vector of floats, to about 2 ulp, without libm (whose expf the compiler does not vectorise): x =
   n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so that r is exact), e^r by its degree-7 Taylor polynomial
   (error under 6e-9 on that range), times 2^n built in the exponent bits. Below -87.3 it gives 0, above 88.7 inf. */
static inline fr_vec fr_select(fr_ivec mask, fr_vec a, fr_vec b) {  /* a where mask, else b (GCC's C has no ?:) */
    return (fr_vec)(((fr_ivec)a & mask) | ((fr_ivec)b & ~mask));
}
static inline fr_vec fr_exp(fr_vec x) {
    const fr_ivec hi = x > 88.72283935546875f, lo = x < -87.33654022216797f;
    const fr_vec zero = {0}, magic = zero + 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    x = fr_select(hi, zero + 88.0f, fr_select(lo, zero - 87.0f, x));
    fr_vec n = (x * 1.44269504088896341f + magic) - magic;
    fr_vec r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    fr_vec p = zero + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120; p = p * r + 1.0f / 24; p = p * r + 1.0f / 6; p = p * r + 0.5f; p = p * r + 1.0f;
    p = p * r + 1.0f;
    p = p * (fr_vec)((__builtin_convertvector(n, fr_ivec) + 127) << 23);  /* 2^n */
    return fr_select(hi, zero + INFINITY, fr_select(lo, zero, p));
}

/* A routed block's attention over its ragged cache from the block's fused projection, float32: C tokens per call
   row (one when decoding; a prompt's entering tokens when prefilling), row r the batch row rows[r]. Token c of row
   r brings qkv[r, c] = [H query heads | G key heads | G value heads], each K wide. Its key, turned by the rotary
   angles (cos, sin row (r * C + c) % period, K/2 each), and its value go to slot length + c of the row (length as
   it was before the call); its query, turned the same way and scaled by 1/sqrt(K), attends to the row's slots up
   to its own; out[r, c] (H * K) is what the output projection reads. Then each row's length grows by its count of
   real tokens (count[r], or C where count is null): the rest are padding, written past the row's end and never
   attended by a real token. One call where the unfused path takes the rotation, copies and transposes, the
   stores and torch's attention. The scores of sixteen (token, head) pairs are summed together by the shuffle
   tree of the few-row kernel, the exponentials are vectors, and keys and values are prefetched RQ_PF tokens
   ahead. Checked before anything is written: rows distinct and in [0, B) (-2), room for C more tokens in every
   row (else the number of rows without it), memory (-1); 0 when done. */
#define RQ_PF 16
static inline void rq_rotate(const float* x, const float* c, const float* s, int64_t K, float mul, float* out) {
    int64_t half = K / 2;
    for (int64_t i = 0; i < half; ++i) {
        float a = x[i], b = x[half + i];
        out[i] = (a * c[i] - b * s[i]) * mul;
        out[half + i] = (b * c[i] + a * s[i]) * mul;
    }
}

static inline void rq_prefetch(const float* p, int64_t n) {
    for (int64_t l = 0; l < n; l += 16) __builtin_prefetch(p + l, 0, 2);
}

/* one token's attention: ql (H * K, turned and scaled) against the first n slots of kb/vb; p: scratch. The pairs
   (token j, head h) are walked with j and h counted, not divided out: a 64-bit division per pair cost more than
   its dot product. */
static void rq_attend(const float* ql, const float* kb, const float* vb, int64_t n, int64_t H, int64_t rep,
                      int64_t GK, int64_t K, float* p, float* o, float* mx, float* sum, float* out) {
    int64_t np = n * H, Kv = K / FR_LANES * FR_LANES, pf = 0, j = 0, h = 0;
    for (int64_t i0 = 0; i0 < np; i0 += 16) {  /* scores, pair i = j * H + h, sixteen at a time */
        int cnt = np - i0 < 16 ? (int)(np - i0) : 16;
        for (int64_t last = j + 16 / H + 1 + RQ_PF; pf <= last && pf < n; ++pf) rq_prefetch(kb + pf * GK, GK);
        fr_vec acc[16];
        const float* kh_of[16];
        const float* qh_of[16];
        for (int i = 0; i < 16; ++i) acc[i] = (fr_vec){0};
        for (int i = 0; i < cnt; ++i) {
            const float* qh = qh_of[i] = ql + h * K;
            const float* kh = kh_of[i] = kb + j * GK + (h / rep) * K;
            for (int64_t d = 0; d < Kv; d += FR_LANES) acc[i] += fr_load(qh + d) * fr_load(kh + d);
            if (++h == H) { h = 0; ++j; }
        }
        float dots[16];
        fr_sum_lanes(acc, dots);
        for (int i = 0; i < cnt; ++i) {
            for (int64_t d = Kv; d < K; ++d) dots[i] += qh_of[i][d] * kh_of[i][d];
            p[i0 + i] = dots[i];
        }
    }
    /* softmax over each head's scores: the max, e^(score - max) in vectors, the sum */
    for (int64_t hh = 0; hh < H; ++hh) { mx[hh] = -INFINITY; sum[hh] = 0; }
    for (int64_t jj = 0; jj < n; ++jj)
        for (int64_t hh = 0; hh < H; ++hh) if (p[jj * H + hh] > mx[hh]) mx[hh] = p[jj * H + hh];
    for (int64_t jj = 0; jj < n; ++jj)
        for (int64_t hh = 0; hh < H; ++hh) p[jj * H + hh] -= mx[hh];
    for (int64_t i = 0; i < np; i += FR_LANES) {  /* p has room past np for the last vector */
        fr_vec e = fr_exp(fr_load(p + i));
        memcpy(p + i, &e, FR_BYTES);
    }
    for (int64_t jj = 0; jj < n; ++jj)
        for (int64_t hh = 0; hh < H; ++hh) sum[hh] += p[jj * H + hh];
    memset(o, 0, (size_t)(H * K) * sizeof(float));  /* the weighted sum of the values, front to back */
    pf = 0;
    for (int64_t jj = 0; jj < n; ++jj) {
        for (; pf <= jj + RQ_PF && pf < n; ++pf) rq_prefetch(vb + pf * GK, GK);
        const float* vj = vb + jj * GK;
        for (int64_t hh = 0; hh < H; ++hh) {
            float w = p[jj * H + hh]; float* oh = o + hh * K; const float* vh = vj + (hh / rep) * K;
            _Pragma("omp simd")
            for (int64_t d = 0; d < K; ++d) oh[d] += w * vh[d];
        }
    }
    for (int64_t hh = 0; hh < H; ++hh) {
        float inv = 1.0f / sum[hh];
        for (int64_t d = 0; d < K; ++d) out[hh * K + d] = o[hh * K + d] * inv;
    }
}

int64_t ragged_attend_qkv_f32(const float* qkv, const float* cos_, const float* sin_, int64_t period, float* k,
                              float* v, int64_t* length, const int64_t* rows, const int64_t* count, float* out,
                              int64_t R, int64_t C, int64_t B, int64_t H, int64_t G, int64_t L, int64_t K,
                              int n_threads) {
    int64_t rep = H / G, GK = G * K, half = K / 2, N = H + 2 * G, longest = 0;
    if (C < 1) return 0;
    /* room for C more tokens: the check for one more, against a cache C - 1 tokens shorter */
    int64_t full = ragged_rows_check(rows, length, R, B, L - C + 1, &longest);
    if (full) return full;
    longest += C - 1;
    /* per thread: scores (longest * H, rounded up to whole vectors and blocks of 16), the turned query, the output
       and each head's max and sum */
    int64_t np_max = (longest * H + 31) / 16 * 16, stride = np_max + 2 * H * K + 2 * H;
    float* scratch = (float*)malloc((size_t)(n_threads * stride) * sizeof(float));
    if (!scratch) return -1;
    float scale = 1.0f / sqrtf((float)K);
    _Pragma("omp parallel num_threads(n_threads)")
    {
        _Pragma("omp for schedule(static)")
        for (int64_t t = 0; t < R * C; ++t) {  /* every token's key and value stored before any attends */
            int64_t r = t / C, c = t % C, slot = length[rows[r]] + c;
            const float* x = qkv + t * N * K;
            const float* cs = cos_ + (t % period) * half; const float* sn = sin_ + (t % period) * half;
            float* kslot = k + (rows[r] * L + slot) * GK;
            float* vslot = v + (rows[r] * L + slot) * GK;
            for (int64_t g = 0; g < G; ++g) {
                rq_rotate(x + (H + g) * K, cs, sn, K, 1.0f, kslot + g * K);
                memcpy(vslot + g * K, x + (H + G + g) * K, (size_t)K * sizeof(float));
            }
        }
        float* p = scratch + omp_get_thread_num() * stride;
        float* ql = p + np_max; float* o = ql + H * K; float* mx = o + H * K; float* sum = mx + H;
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t t = 0; t < R * C; ++t) {
            int64_t r = t / C, c = t % C, b = rows[r];
            const float* x = qkv + t * N * K;
            const float* cs = cos_ + (t % period) * half; const float* sn = sin_ + (t % period) * half;
            for (int64_t h = 0; h < H; ++h) rq_rotate(x + h * K, cs, sn, K, scale, ql + h * K);
            rq_attend(ql, k + b * L * GK, v + b * L * GK, length[b] + c + 1, H, rep, GK, K, p, o, mx, sum,
                      out + t * H * K);
        }
    }
    for (int64_t r = 0; r < R; ++r) length[rows[r]] += count ? count[r] : C;
    free(scratch);
    return 0;
}

/* Mixture-of-Depths decoding, one token per row: the router weight r_b = x_b . w of each of B rows (D wide), and
   the rows whose r is above the threshold, in order. Returns their count. */
int64_t mod_route_f32(const float* x, const float* w, double threshold, float* r, int64_t* rows, int64_t B,
                      int64_t D, int n_threads) {
    EW_PARALLEL(B * D)
    for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * D;
        float dot = 0;
        _Pragma("omp simd reduction(+:dot)")
        for (int64_t d = 0; d < D; ++d) dot += xb[d] * w[d];
        r[b] = dot;
    }
    int64_t R = 0;
    for (int64_t b = 0; b < B; ++b)
        if ((double)r[b] > threshold) rows[R++] = b;
    return R;
}

/* out = x (B rows of D), with each entering row rows[i] (i < R) given its branch: x + (g(r) * f_i), the product
   rounded before the sum as the prefill path's index_add rounds it (no fused multiply-add here), g(r) = r or, with
   sigmoid_gate, 1 / (1 + e^-r). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void mod_add_rows_f32(const float* x, const int64_t* rows, const float* r, const float* f, float* out, int64_t B,
                      int64_t R, int64_t D, int sigmoid_gate, int n_threads) {
    const int64_t chunk = 4096;  /* floats copied per task */
    EW_PARALLEL(B * D)
    for (int64_t c = 0; c < B * D; c += chunk)
        memcpy(out + c, x + c, (size_t)(B * D - c < chunk ? B * D - c : chunk) * sizeof(float));
    _Pragma("omp parallel for num_threads(n_threads) schedule(static) if(R * D >= 65536)")
    for (int64_t i = 0; i < R; ++i) {  /* distinct rows: no two threads write one */
        int64_t b = rows[i];
        float g = sigmoid_gate ? 1.0f / (1.0f + expf(-r[b])) : r[b];
        const float* fi = f + i * D;
        float* ob = out + b * D;
        for (int64_t d = 0; d < D; ++d) {
            float t = g * fi[d];
            ob[d] += t;
        }
    }
}
#pragma GCC pop_options

/* silu(g) = g / (1 + e^-g), taken as g e^g / (1 + e^g) below 0: e^-|g| never overflows, so that silu keeps its tiny
   values down to where e^g leaves the normal floats */
static inline fr_vec fr_silu(fr_vec g) {
    const fr_ivec neg = g < 0;
    fr_vec e = fr_exp(fr_select(neg, g, -g));
    return fr_select(neg, g * e, g) / (1.0f + e);
}

/* out = silu(gate) * up from gu = [gate | up] (M rows of 2F): silu(g) rounded, then times up */
void swiglu_f32(const float* gu, float* out, int64_t M, int64_t F, int n_threads) {
    EW_PARALLEL(M * F * 4)
    for (int64_t m = 0; m < M; ++m) {
        const float* g = gu + m * 2 * F;
        const float* u = g + F;
        float* o = out + m * F;
        int64_t j = 0;
        for (; j + FR_LANES <= F; j += FR_LANES) {
            fr_vec gv = fr_load(g + j);
            fr_vec s = fr_silu(gv) * fr_load(u + j);
            memcpy(o + j, &s, FR_BYTES);
        }
        for (; j < F; ++j) {
            fr_vec gv = {0};
            gv[0] = g[j];
            float s = fr_silu(gv)[0];
            o[j] = s * u[j];
        }
    }
}
"""

_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("MIXTURELM_CACHE", Path.home() / ".cache" / "mixturelm")) / "kernels"


def _cpu_features() -> str:
    """The processor's instruction sets, part of the build's cache key: -march=native builds for this processor, and
    a cache folder shared by machines with and without AVX-512 must not hand one the other's library."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform
        return platform.processor()


def build_flags() -> list[str]:
    """The compiler's flags: for this processor, plus $MIXTURELM_KERNEL_CFLAGS (for instance -mno-avx512f to build
    the AVX2 kernels, or -march=x86-64-v3 for a cache folder shared by different machines)."""
    return ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", *os.environ.get("MIXTURELM_KERNEL_CFLAGS", "").split()]


def _build(flags: list[str] | None = None) -> ctypes.CDLL | None:
    """Compile (or find in the cache folder) the kernel library built with `flags` (default build_flags())."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    flags = build_flags() if flags is None else flags
    key = hashlib.sha256((SOURCE + " ".join(flags) + compiler + _cpu_features()).encode()).hexdigest()[:16]
    path = _cache_dir() / f"kernels_{key}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            src.write_text(SOURCE)
            proc = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                warnings.warn(f"mixturelm's CPU kernels did not compile, using PyTorch ops: {proc.stderr[-500:]}")
                return None
            os.replace(out, path)  # atomic: a concurrent build finds a whole library or none
    lib = ctypes.CDLL(str(path))
    for name in ("gather_dot_f32", "gather_dot_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    for name in ("row_grad_f32", "row_grad_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.group_rows.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 5
    lib.group_rows.restype = ctypes.c_int64
    for name in ("row_adam_f32", "row_adam_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_double] * 5 + [ctypes.c_int]
    for name in ("ragged_decode_f32", "ragged_decode_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 6 + [ctypes.c_double, ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int64
    lib.few_row_linear_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.few_row_lanes.restype = ctypes.c_int
    lib.rms_norm_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_double, ctypes.c_int]
    lib.rope_rows_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    lib.ragged_attend_qkv_f32.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 6
                                          + [ctypes.c_int64] * 7 + [ctypes.c_int])
    lib.ragged_attend_qkv_f32.restype = ctypes.c_int64
    lib.mod_route_f32.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_double] + [ctypes.c_void_p] * 2
                                  + [ctypes.c_int64] * 2 + [ctypes.c_int])
    lib.mod_route_f32.restype = ctypes.c_int64
    lib.mod_add_rows_f32.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.swiglu_f32.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    for name in ("pk_topk_f32", "pk_topk_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be had (then the caller uses PyTorch ops)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MIXTURELM_KERNELS", os.environ.get("MIXTURELM_PEER_KERNEL", "1")) != "0":
            try:
                _lib = _build()
            except OSError as e:
                warnings.warn(f"mixturelm's CPU kernels are unavailable, using PyTorch ops: {e}")
    return _lib


@torch.compiler.assume_constant_result
def _available() -> bool:
    """Whether the kernel library loaded: a constant to torch.compile, which must not trace the build."""
    return library() is not None


def plain_dispatch() -> bool:
    """Nothing must see the torch ops, so the fused kernels may run: no dispatch mode (FlopCounterMode, fake
    tensors), no torch.jit.trace (it would record the kernel's output as a constant), no torch.func transform
    (vmap, grad, jvp: their tensors have no storage to hand a kernel) and no forward-mode AD level (the kernel
    would drop the tangents). Under torch.compile the kernels are custom ops with fake implementations: no need
    to ask (nor can compile trace the question)."""
    if torch.compiler.is_compiling():
        return True
    return (_get_current_dispatch_mode() is None and not torch.jit.is_tracing()
            and torch._C._functorch.peek_interpreter_stack() is None and torch.autograd.forward_ad._current_level < 0)


def usable(*tensors: torch.Tensor) -> bool:
    return (all(t.device.type == "cpu" for t in tensors) and tensors[0].dtype in (torch.float32, torch.float64)
            and _available())


# Each kernel is a custom op (torch.library, namespace mixturelm) with a fake implementation that gives the
# output shapes: torch.compile cannot trace a ctypes call (it would hand it fake tensors without storage),
# but it keeps an op whole in its graph. Eager calls skip the dispatcher (about 10 us a call, ~1 % of a
# small PEER step) and run the kernel function itself. The kernels take contiguous tensors; the wrappers
# below make them so.

def _call(op, kernel, *args):
    return op(*args) if torch.compiler.is_compiling() else kernel(*args)


def _gather_dot_kernel(table_ND: torch.Tensor, ids_TJ: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
    T, J = ids_TJ.shape
    out = torch.empty(T, J, dtype=table_ND.dtype)
    fn = library().gather_dot_f32 if table_ND.dtype == torch.float32 else library().gather_dot_f64
    fn(table_ND.data_ptr(), ids_TJ.data_ptr(), x_TD.data_ptr(), out.data_ptr(), T, J, table_ND.shape[1],
       torch.get_num_threads())
    return out


_gather_dot_op = torch.library.custom_op("mixturelm::peer_gather_dot", _gather_dot_kernel, mutates_args=())


@_gather_dot_op.register_fake
def _(table_ND, ids_TJ, x_TD):
    return table_ND.new_empty(ids_TJ.shape)


def gather_dot(table_ND: torch.Tensor, ids_TJ: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
    """out_tj = table[ids_tj] . x_t for CPU float32/float64 tensors (ids int64, in range)."""
    return _call(_gather_dot_op, _gather_dot_kernel, table_ND.contiguous(), ids_TJ.contiguous(),
                 x_TD.to(table_ND.dtype).contiguous())


def _product_key_topk_kernel(scores_2HTS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, H, T, S = scores_2HTS.shape
    a = torch.empty(T, H, k, dtype=torch.int64)
    b = torch.empty(T, H, k, dtype=torch.int64)
    fn = library().pk_topk_f32 if scores_2HTS.dtype == torch.float32 else library().pk_topk_f64
    fn(scores_2HTS.data_ptr(), a.data_ptr(), b.data_ptr(), T, H, S, k, torch.get_num_threads())
    return a, b


_product_key_topk_op = torch.library.custom_op("mixturelm::peer_product_key_topk", _product_key_topk_kernel,
                                               mutates_args=())


@_product_key_topk_op.register_fake
def _(scores_2HTS, k):
    _, H, T, _ = scores_2HTS.shape
    return scores_2HTS.new_empty(T, H, k, dtype=torch.int64), scores_2HTS.new_empty(T, H, k, dtype=torch.int64)


def product_key_topk(scores_2HTS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact product-key top-k from the two halves' sub-key scores (2, H, T, S), in one pass per
    (token, head): sub-key ids a, b, each (T, H, k), best first. k <= 64."""
    return _call(_product_key_topk_op, _product_key_topk_kernel, scores_2HTS.contiguous(), k)


def _group_rows_kernel(ids_TJ: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    n, J = ids_TJ.numel(), ids_TJ.shape[1]
    count = torch.zeros(n_rows + 1, dtype=torch.int64)
    order, token = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    rows, offsets = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    R = library().group_rows(ids_TJ.data_ptr(), n, n_rows, J, count.data_ptr(), order.data_ptr(),
                             token.data_ptr(), rows.data_ptr(), offsets.data_ptr())
    return token, order, rows[:R], offsets[:R]


_group_rows_op = torch.library.custom_op("mixturelm::peer_group_rows", _group_rows_kernel, mutates_args=())


@_group_rows_op.register_fake
def _(ids_TJ, n_rows):
    n = ids_TJ.numel()
    R = torch.library.get_ctx().new_dynamic_size()  # the distinct rows: known only from the data
    return (ids_TJ.new_empty(n), ids_TJ.new_empty(n), ids_TJ.new_empty(R), ids_TJ.new_empty(R))


def group_rows(ids_TJ: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, ...]:
    """Pairs grouped by row id, by a counting sort: (token of each pair, pair order, distinct rows,
    offsets), in expert order; the same as a stable sort by id."""
    return _call(_group_rows_op, _group_rows_kernel, ids_TJ.contiguous(), n_rows)


def _row_grad_kernel(src_TD: torch.Tensor, w_TJ: torch.Tensor, order: torch.Tensor, token: torch.Tensor,
                     offsets_R: torch.Tensor) -> torch.Tensor:
    R, D = offsets_R.numel(), src_TD.shape[1]
    out = torch.empty(R, D, dtype=src_TD.dtype)
    fn = library().row_grad_f32 if src_TD.dtype == torch.float32 else library().row_grad_f64
    fn(src_TD.data_ptr(), w_TJ.data_ptr(), order.data_ptr(), token.data_ptr(), offsets_R.data_ptr(), out.data_ptr(),
       R, order.numel(), D, torch.get_num_threads())
    return out


_row_grad_op = torch.library.custom_op("mixturelm::peer_row_grad", _row_grad_kernel, mutates_args=())


@_row_grad_op.register_fake
def _(src_TD, w_TJ, order, token, offsets_R):
    return src_TD.new_empty(offsets_R.shape[0], src_TD.shape[1])


def row_grad(src_TD: torch.Tensor, w_TJ: torch.Tensor, order: torch.Tensor, token: torch.Tensor,
             offsets_R: torch.Tensor) -> torch.Tensor:
    """The touched rows of a table's gradient: row r = sum over its pairs p of w_p * src[token_p]."""
    return _call(_row_grad_op, _row_grad_kernel, src_TD.contiguous(), w_TJ.to(src_TD.dtype).contiguous(),
                 order.contiguous(), token.contiguous(), offsets_R.contiguous())


def row_adam(param_ND: torch.Tensor, exp_avg_ND: torch.Tensor, exp_avg_sq_ND: torch.Tensor, rows_R: torch.Tensor,
             grad_RD: torch.Tensor, beta1: float, beta2: float, eps: float, step_size: float, decay: float) -> None:
    """In place, on the rows `rows_R` (distinct) of contiguous CPU tensors: SparseAdam's moment updates, then
    param = param * decay - step_size * m / (sqrt(v) + eps)."""
    rows_R, grad_RD = rows_R.contiguous(), grad_RD.to(param_ND.dtype).contiguous()
    fn = library().row_adam_f32 if param_ND.dtype == torch.float32 else library().row_adam_f64
    fn(param_ND.data_ptr(), exp_avg_ND.data_ptr(), exp_avg_sq_ND.data_ptr(), rows_R.data_ptr(), grad_RD.data_ptr(),
       rows_R.numel(), param_ND.shape[1], beta1, beta2, eps, step_size, decay, torch.get_num_threads())


def _ragged_decode_kernel(q_RHK: torch.Tensor, k_new_RGK: torch.Tensor, v_new_RGK: torch.Tensor,
                          k_BLGK: torch.Tensor, v_BLGK: torch.Tensor, length_B: torch.Tensor,
                          rows_R: torch.Tensor) -> torch.Tensor:
    R, H, K = q_RHK.shape
    B, L, G, _ = k_BLGK.shape
    out = torch.empty_like(q_RHK)
    fn = library().ragged_decode_f32 if q_RHK.dtype == torch.float32 else library().ragged_decode_f64
    full = fn(q_RHK.data_ptr(), k_new_RGK.data_ptr(), v_new_RGK.data_ptr(), k_BLGK.data_ptr(), v_BLGK.data_ptr(),
              length_B.data_ptr(), rows_R.data_ptr(), out.data_ptr(), R, B, H, G, L, K, K ** -0.5,
              torch.get_num_threads())
    _raise_ragged(full, B, L, rows_R)
    return out


def _raise_ragged(full: int, B: int, L: int, rows_R: torch.Tensor) -> None:
    """The ragged steps' refusals (their return codes), raised with nothing written."""
    if full == -2:
        raise ValueError(f"the rows of a ragged decoding step must be distinct batch rows in [0, {B}); got "
                         f"{rows_R.tolist()}")
    if full == -1:
        raise MemoryError("no memory for the ragged decoding step's attention scores")
    if full:
        raise RuntimeError(f"KV cache holds {L} tokens; {full} row(s) asked for one more")


_ragged_decode_op = torch.library.custom_op("mixturelm::ragged_decode_step", _ragged_decode_kernel,
                                            mutates_args=("k_BLGK", "v_BLGK", "length_B"))


@_ragged_decode_op.register_fake
def _(q_RHK, k_new_RGK, v_new_RGK, k_BLGK, v_BLGK, length_B, rows_R):
    return torch.empty_like(q_RHK)


def ragged_decode_step(q_RHK: torch.Tensor, k_new_RGK: torch.Tensor, v_new_RGK: torch.Tensor, k_BLGK: torch.Tensor,
                       v_BLGK: torch.Tensor, length_B: torch.Tensor, rows_R: torch.Tensor,
                       check: bool = True) -> torch.Tensor:
    """One decoding step of a ragged (B, L, G, K) cache, in place: for each distinct batch row rows_R[r], its new
    key and value (k_new_RGK[r], v_new_RGK[r]) go to slot length_B[row], the length grows by one, and its
    query (one per head, q_RHK[r]) attends to the row's cached tokens, its own included: softmax scaled by
    1/sqrt(K), G dividing H. Returns (R, H, K). A row with no free slot raises RuntimeError, with nothing
    written; rows repeated or outside the batch raise ValueError, with nothing written. No gradient: for
    decoding. CPU tensors; the cache and lengths contiguous, lengths and rows int64. check=False skips the
    checks of shapes, devices, layouts and dtypes, for a caller that built them so (RaggedRows.attend: in the
    middle of a decoding step every Python statement costs); rows and free slots are checked by the kernel
    either way."""
    if check:
        _check_ragged_decode_step(q_RHK, k_new_RGK, v_new_RGK, k_BLGK, v_BLGK, length_B, rows_R)
    dtype = k_BLGK.dtype
    return _call(_ragged_decode_op, _ragged_decode_kernel, q_RHK.to(dtype).contiguous(),
                 k_new_RGK.to(dtype).contiguous(), v_new_RGK.to(dtype).contiguous(), k_BLGK, v_BLGK, length_B,
                 rows_R.contiguous())


def _check_ragged_decode_step(q_RHK, k_new_RGK, v_new_RGK, k_BLGK, v_BLGK, length_B, rows_R) -> None:
    (R, H, K), (B, _, G, K_cache) = q_RHK.shape, k_BLGK.shape
    if G == 0 or H % G:
        raise ValueError(f"{H} query heads cannot share {G} key/value heads")
    if (K_cache != K or v_BLGK.shape != k_BLGK.shape or k_new_RGK.shape != (R, G, K) or v_new_RGK.shape != (R, G, K)
            or rows_R.shape != (R,) or length_B.shape != (B,)):
        raise ValueError(f"ragged decoding step: shapes do not agree (query {tuple(q_RHK.shape)}, new keys "
                         f"{tuple(k_new_RGK.shape)}, values {tuple(v_new_RGK.shape)}, cache {tuple(k_BLGK.shape)} "
                         f"and {tuple(v_BLGK.shape)}, lengths {tuple(length_B.shape)}, rows {tuple(rows_R.shape)})")
    if not all(t.device.type == "cpu" for t in (q_RHK, k_new_RGK, v_new_RGK, k_BLGK, v_BLGK, length_B, rows_R)):
        raise ValueError("the ragged decoding step's kernel runs on CPU tensors only")
    if not (k_BLGK.is_contiguous() and v_BLGK.is_contiguous() and length_B.is_contiguous()):
        raise ValueError("the ragged cache's keys, values and lengths must be contiguous")
    if length_B.dtype != torch.int64 or rows_R.dtype != torch.int64:
        raise ValueError("the ragged cache's lengths and the rows must be int64")


def few_row_lanes() -> int:
    """Floats per vector in the built few-row kernel (16 with AVX-512, 8 with AVX/AVX2, 4 otherwise); 0 unbuilt."""
    lib = library()
    return lib.few_row_lanes() if lib is not None else 0


def few_row_linear(x_MK: torch.Tensor, weight_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x_MK, weight_NK, bias_N) for contiguous CPU float32 tensors, reading the weight once from memory:
    decoding's products of a few rows (layers/linear.py says when it is used)."""
    M, K = x_MK.shape
    N = weight_NK.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    library().few_row_linear_f32(x_MK.data_ptr(), weight_NK.data_ptr(), None if bias_N is None else bias_N.data_ptr(),
                                 y.data_ptr(), M, N, K, torch.get_num_threads())
    return y


# -- a block's element-wise steps in inference -------------------------------------------------------------------
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # no subclass (DTensor, fake tensors): those dispatch on their own


def inference_ready(*tensors: torch.Tensor) -> bool:
    """Whether rms_norm, rope_rows_ and swiglu below may stand in for torch's ops: CPU float32 tensors of no subclass,
    no gradient to carry, no autocast, nothing watching the ops, not compiling (torch.compile fuses these itself),
    kernels built. Anything else keeps torch's ops."""
    if torch.compiler.is_compiling() or not plain_dispatch():
        return False
    grad = torch.is_grad_enabled()
    return (all(type(t) in _PLAIN_TYPES and t.dtype == torch.float32 and t.device.type == "cpu"
                and not (grad and t.requires_grad) for t in tensors)
            and not torch.is_autocast_enabled("cpu") and _available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (D,), weight, eps) for CPU float32 tensors (inference_ready), weight of D elements."""
    D = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    library().rms_norm_f32(x.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), x.numel() // max(D, 1), D,
                           eps, torch.get_num_threads())
    return y


def rope_rows_(x_BTNK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> torch.Tensor:
    """In place: heads [0, n_rot) of a contiguous (B, T, N, K) tensor turned by the rotary angles, cos and sin
    (T, K/2) shared by the batch or (B, T, K/2) per row, as attention.apply_rope turns them. Returns x_BTNK."""
    B, T, N, K = x_BTNK.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    library().rope_rows_f32(x_BTNK.data_ptr(), cos.data_ptr(), sin.data_ptr(), B * T, N * K, n_rot, K,
                            cos.numel() // (K // 2), torch.get_num_threads())
    return x_BTNK


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from gu = [gate | up] on its last dimension, for a CPU float32 tensor (inference_ready)."""
    F2 = gu.shape[-1]
    gu = gu.contiguous()
    out = gu.new_empty(*gu.shape[:-1], F2 // 2)
    library().swiglu_f32(gu.data_ptr(), out.data_ptr(), gu.numel() // max(F2, 1), F2 // 2, torch.get_num_threads())
    return out


def mod_route(x_BD: torch.Tensor, weight_D: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture-of-Depths decoding (one token per row, CPU float32, inference_ready): the router weight r (B,) of
    each row, x_BD . weight_D, and the rows (R,) whose r is above the threshold, in order."""
    B, D = x_BD.shape
    x_BD, weight_D = x_BD.contiguous(), weight_D.contiguous()
    r_B = torch.empty(B, dtype=torch.float32)
    rows_B = torch.empty(B, dtype=torch.int64)
    R = library().mod_route_f32(x_BD.data_ptr(), weight_D.data_ptr(), threshold, r_B.data_ptr(), rows_B.data_ptr(),
                                B, D, torch.get_num_threads())
    return r_B, rows_B[:R]


def mod_add_rows(x_BD: torch.Tensor, rows_R: torch.Tensor, r_B: torch.Tensor, f_RD: torch.Tensor,
                 sigmoid_gate: bool) -> torch.Tensor:
    """A copy of x_BD with x + g(r) f added to the rows rows_R (distinct, in [0, B)): g(r) = r, or sigmoid(r);
    the product rounded before the sum, as MoD's prefill path rounds it."""
    B, D = x_BD.shape
    x_BD, f_RD = x_BD.contiguous(), f_RD.contiguous()
    out = torch.empty_like(x_BD)
    library().mod_add_rows_f32(x_BD.data_ptr(), rows_R.data_ptr(), r_B.data_ptr(), f_RD.data_ptr(), out.data_ptr(),
                               B, rows_R.numel(), D, int(sigmoid_gate), torch.get_num_threads())
    return out


def ragged_attend_qkv(qkv_RCNK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_BLGK: torch.Tensor,
                      v_BLGK: torch.Tensor, length_B: torch.Tensor, rows_R: torch.Tensor, count_R: torch.Tensor | None,
                      n_heads: int) -> torch.Tensor:
    """A routed block's attention over its ragged cache from the fused projection qkv_RCNK (R rows, C tokens each,
    H + 2G heads of K), float32: keys and queries turned by the rotary angles (cos, sin: (C, K/2) for every row or
    (R, C, K/2)), every token's key and value stored at the row's length + its index, each token attending to its
    row's tokens up to its own, and the lengths grown by count_R (each row's real tokens, padding after them; None:
    all C). Returns (R, C, H * K), as the output projection reads it. The caller has checked shapes, dtypes and
    layouts (RaggedRows.attend_projection); rows and room are checked here, with nothing written."""
    R, C, N, K = qkv_RCNK.shape
    B, L, G, _ = k_BLGK.shape
    out = torch.empty(R, C, n_heads * K, dtype=torch.float32)
    count = None if count_R is None else count_R.data_ptr()
    full = library().ragged_attend_qkv_f32(qkv_RCNK.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.numel() // (K // 2),
                                           k_BLGK.data_ptr(), v_BLGK.data_ptr(), length_B.data_ptr(), rows_R.data_ptr(),
                                           count, out.data_ptr(), R, C, B, n_heads, G, L, K, torch.get_num_threads())
    if full > 0:
        raise RuntimeError(f"KV cache holds {L} tokens; {full} row(s) have no room for {C} more")
    _raise_ragged(full, B, L, rows_R)
    return out
