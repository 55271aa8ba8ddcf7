"""Exact 1-D k-means for weight palettization, one LUT per channel group.

Why exact and why this way:
- 1-D k-means has an exact solution: optimal clusters are contiguous runs of
  the sorted values, so a dynamic program over the sorted *unique* values with
  their counts (the weighted histogram) finds the global optimum. Equal values
  always share a cluster, so clustering the histogram loses nothing.
- fp16 weights have at most 65,536 distinct values. We map every fp16 value to
  an order-preserving 16-bit key, keep the keys present in the tensor (the
  layer's "grid", sorted by construction) and count, per group, how often each
  grid value occurs: no sort, O(elements + grid) per group.
- Lloyd's algorithm on the same histogram is 10x cheaper but not exact: on
  fp16 data it stalls in discrete local optima 0.5-5 % worse at 4 bits and far
  worse at 8 bits where outliers deserve their own centroid (measured while
  building this module), so we pay for the DP.
- The exact solver per group: the run cost (SSE of a run of sorted values,
  O(1) from prefix sums) is Monge, and OPT(k) is convex in k, so a penalty
  lam per run turns "exactly k runs" into an unconstrained 1D/1D DP solved by
  a monotone queue in O(n log n); walking the lower hull of (runs, SSE) finds
  the lam whose optimum has exactly k runs in a few passes, independent of k
  (Groenlund et al. 2017, "Fast exact k-means, k-medians and Bregman
  divergence clustering in 1D", sec. on the Lagrangian/Wilber approach). When
  k lies on a degenerate (collinear) hull edge, the layered DP
  D[j][i] = min_m D[j-1][m] + cost(m, i), each layer by divide and conquer,
  answers instead: exact either way. It runs compiled (numba), in parallel
  over groups; the recursions do not vectorise in numpy.
- coremltools' own path does the same maths per group in Python (kmeans1d
  for groups of >= 10,000 fp16 values, scikit-learn's approximate KMeans
  below that), which is why a full UNet takes minutes to hours.

After the exact centroids are found they are rounded to the weight's dtype
(the LUT dtype coremltools writes) and every value is re-assigned to its
nearest rounded entry (ties to the lower entry), which can only lower the
error. Results are deterministic: groups are independent and each is solved
by the same sequential code.
"""
from __future__ import annotations

import os

import numpy as np

try:
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba picks OpenMP when present, and libgomp's threads spin between parallel loops: on this
        # shared 2-core machine that cost 25x the CPU and ~0.4 s of wall time per call. The plain
        # workqueue layer sleeps instead (set NUMBA_THREADING_LAYER to choose another).
        numba.config.THREADING_LAYER = "workqueue"
except ImportError as e:  # a clear error at use, not at import of sdwork
    numba = None
    _NUMBA_ERROR = e

SUPPORTED_NBITS = (1, 2, 3, 4, 6, 8)
GRANULARITIES = ("per_tensor", "per_grouped_channel")


def _require_numba():
    if numba is None:
        raise ImportError(
            "sdwork.kmeans1d needs numba for its compiled exact k-means: `pip install numba` "
            f"(import failed: {_NUMBA_ERROR})"
        )


# ---------------------------------------------------------------- public API

def palettize_weight(w: np.ndarray, nbits: int, granularity: str = "per_tensor",
                     group_size: int = 32, channel_axis: int = 0, return_sse: bool = False):
    """(lut, indices) for one weight, in the iOS18 constexpr_lut_to_dense layout.

    lut has rank w.ndim + 2: shape 1 everywhere except G = channels / group_size
    at channel_axis (per_grouped_channel; per_tensor has G = 1), 2**nbits on the
    second-to-last axis and 1 (the vector size) on the last, dtype w.dtype.
    indices has w's shape, dtype uint8, values < 2**nbits. This is exactly
    what coremltools' palettize_weights pass builds before packing the indices
    into uint{nbits} (see `grouped_channelwise_compress`). With return_sse, a
    third value: the float64 sum of squared errors of the stored result.
    """
    w = np.asarray(w)
    nbits = check_nbits(nbits)
    if w.ndim < 1 or w.size == 0:
        raise ValueError(f"cannot palettize an empty or 0-d weight (shape {w.shape})")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not -w.ndim <= channel_axis < w.ndim:
        raise ValueError(f"channel_axis {channel_axis} is out of range for a weight of shape {w.shape}")
    axis = channel_axis % w.ndim
    channels = w.shape[axis]
    if granularity == "per_tensor":
        group_size = channels
    elif not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if channels % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the {channels} channels on axis {axis} of a weight "
            f"of shape {w.shape}; pick a divisor of {channels} or use granularity='per_tensor'"
        )
    groups = channels // group_size
    moved = np.moveaxis(w, axis, 0)  # groups are contiguous runs of rows, like coremltools
    lut, idx, sse = cluster_rows(np.ascontiguousarray(moved).reshape(groups, -1), nbits, return_sse=True)
    indices = np.moveaxis(idx.reshape(moved.shape), 0, axis)
    shape = [1] * (w.ndim + 2)
    shape[axis], shape[-2] = groups, 1 << nbits
    return (lut.reshape(shape), indices, float(sse.sum())) if return_sse else (lut.reshape(shape), indices)


def cluster_rows(rows: np.ndarray, nbits: int, return_sse: bool = False):
    """Exact k-means with k = 2**nbits on each row of a (G, M) array.

    Returns lut (G, k) in rows.dtype, sorted ascending, and indices (G, M)
    uint8; with return_sse also the per-row sum of squared errors (float64)
    of the result as stored (rounded LUT).
    """
    _require_numba()
    nbits = check_nbits(nbits)
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.size == 0:
        raise ValueError(f"cluster_rows needs a non-empty (groups, values) array, got shape {rows.shape}")
    if rows.dtype not in (np.float16, np.float32):
        raise ValueError(f"weights must be float16 or float32 (the LUT dtypes Core ML stores), got {rows.dtype}")
    if not np.isfinite(rows).all():
        raise ValueError("the weight holds NaN or inf values; palettizing them is meaningless: fix the weight first")
    grid, codes, rank_of = _grid(rows)
    k = 1 << nbits
    centroids = np.empty((rows.shape[0], k), np.float64)
    _solve_groups(codes, rank_of, grid, k, centroids)
    lut = centroids.astype(rows.dtype)  # the stored LUT has the weight's dtype
    indices = np.empty(rows.shape, np.uint8)
    sse = np.empty(rows.shape[0], np.float64)
    _assign_groups(codes, rank_of, grid, lut.astype(np.float64), indices, sse)
    return (lut, indices, sse) if return_sse else (lut, indices)


def check_nbits(nbits) -> int:
    if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or int(nbits) not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS} (the index widths Core ML supports), got {nbits!r}")
    return int(nbits)


# ---------------------------------------------------------------- histogram grid

def _grid(rows: np.ndarray):
    """(grid, codes, rank_of): the sorted distinct values of the array (float64), a per-element
    code, and a table with grid[rank_of[code]] == value.

    For fp16 the code is the element's own bit pattern and rank_of a 65,536-entry table, so no
    per-element rank array is ever written (on a full UNet that pass cost more than the solve).
    """
    if rows.dtype == np.float16:
        codes = np.ascontiguousarray(rows).view(np.uint16)
        grid_bits, rank_of = _grid16(codes.reshape(-1))
        return grid_bits.view(np.float16).astype(np.float64), codes, rank_of
    grid, inverse = np.unique(rows.astype(np.float64) + 0.0, return_inverse=True)
    return grid, inverse.reshape(rows.shape).astype(np.int32), np.arange(len(grid), dtype=np.int32)


# ---------------------------------------------------------------- compiled kernels

def _jit(parallel=False):
    def wrap(fn):
        if numba is None:
            return fn
        return numba.njit(cache=True, parallel=parallel, nogil=True)(fn)
    return wrap


@_jit()
def _key16(u):
    """Order-preserving 16-bit key of an fp16 bit pattern; -0.0 maps onto +0.0."""
    if u == 0x8000:
        u = 0
    return (u ^ 0xFFFF) if u & 0x8000 else (u | 0x8000)


@_jit(parallel=True)
def _grid16(u):
    """Distinct fp16 bit patterns of u in value order, and the rank of every bit pattern among them."""
    chunks = 8
    seen = np.zeros((chunks, 1 << 16), np.bool_)
    step = (u.shape[0] + chunks - 1) // chunks
    for c in numba.prange(chunks):
        for i in range(c * step, min(u.shape[0], (c + 1) * step)):
            seen[c, u[i]] = True
    present = np.zeros(1 << 16, np.bool_)  # by order-preserving key
    for c in range(chunks):
        for bits in range(1 << 16):
            if seen[c, bits]:
                present[_key16(bits)] = True
    rank = np.empty(1 << 16, np.int32)
    n = 0
    for key in range(1 << 16):
        rank[key] = n
        n += present[key]
    grid = np.empty(n, np.uint16)
    for key in range(1 << 16):
        if present[key]:
            grid[rank[key]] = (key & 0x7FFF) if key & 0x8000 else (key ^ 0xFFFF)
    rank_of = np.empty(1 << 16, np.int32)
    for bits in range(1 << 16):
        rank_of[bits] = rank[_key16(bits)]
    return grid, rank_of


@_jit()
def _layer_dc(prev, cur, arg, S0, S1, S2, ilo, ihi, mlo, tmp):
    """cur[i] = min_{mlo <= m < i} prev[m] + cost(m, i) for ilo <= i <= ihi, by divide and conquer."""
    stack = np.empty((64, 4), np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = ilo, ihi, mlo, ihi - 1
    top = 1
    while top > 0:
        top -= 1
        lo, hi, olo, ohi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        mid = (lo + hi) // 2
        a0, a1, a2 = S0[mid], S1[mid], S2[mid]
        mhi = min(ohi, mid - 1)
        for m in range(olo, mhi + 1):  # branch-free so it vectorises
            s = a1 - S1[m]
            tmp[m] = prev[m] + (a2 - S2[m]) - s * s / (a0 - S0[m])
        best, bestm = np.inf, olo
        for m in range(olo, mhi + 1):
            if tmp[m] < best:
                best, bestm = tmp[m], m
        cur[mid] = best
        arg[mid] = bestm
        if lo < mid:
            stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = lo, mid - 1, olo, bestm
            top += 1
        if mid < hi:
            stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = mid + 1, hi, bestm, ohi
            top += 1


@_jit()
def _run(F, S0, S1, S2, m, p):
    """F[m] + SSE of the run of values m..p-1."""
    s = S1[p] - S1[m]
    return F[m] + (S2[p] - S2[m]) - s * s / (S0[p] - S0[m])


@_jit()
def _penalised(S0, S1, S2, lam, F, cnt, start, qm, ql, qr):
    """min over any number of runs of SSE + lam * runs, by the monotone-queue 1D/1D DP.

    The run cost is Monge, so a later cut's advantage over an earlier one only
    grows with i: a queue holds each candidate cut with the interval of i it
    serves, and a new cut finds where it takes over by binary search, so one
    pass is O(n log n). Returns the number of runs; start[] walks them back.
    """
    n = S0.shape[0] - 1
    F[0] = 0.0
    cnt[0] = 0
    head, tail = 0, 0
    qm[0], ql[0], qr[0] = 0, 1, n
    for i in range(1, n + 1):
        while qr[head] < i:
            head += 1
        m = qm[head]
        F[i] = _run(F, S0, S1, S2, m, i) + lam
        cnt[i] = cnt[m] + 1
        start[i] = m
        # cut i competes for positions > i: drop queued cuts it beats from their first position on
        while tail >= head:
            p = max(ql[tail], i + 1)
            if p <= qr[tail] and _run(F, S0, S1, S2, i, p) < _run(F, S0, S1, S2, qm[tail], p):
                tail -= 1
            else:
                break
        if tail < head:
            if i < n:
                tail = head
                qm[tail], ql[tail], qr[tail] = i, i + 1, n
            continue
        lo, hi = max(ql[tail], i + 1), qr[tail] + 1
        b = qm[tail]
        # first position where cut i beats the last queued cut: gallop from lo (it is usually
        # close), then bisect the last step; O(log distance) instead of O(log n)
        step = 1
        while lo + step < hi and not _run(F, S0, S1, S2, i, lo + step) < _run(F, S0, S1, S2, b, lo + step):
            lo += step + 1
            step *= 2
        hi = min(hi, lo + step + 1) if lo + step < hi else hi
        while lo < hi:
            p = (lo + hi) // 2
            if _run(F, S0, S1, S2, i, p) < _run(F, S0, S1, S2, b, p):
                hi = p
            else:
                lo = p + 1
        if lo <= n:
            qr[tail] = lo - 1
            tail += 1
            qm[tail], ql[tail], qr[tail] = i, lo, n
    return cnt[n]


@_jit()
def _kmeans_exact(x, w, k, out, lam0=-1.0):
    """Optimal k centroids (sorted) of sorted distinct values x with counts w, into out.

    lam0 > 0 is a guess of the penalty (a sibling group's answer): one pass
    there usually lands next to k, which saves most of the hull walk. Returns
    the penalty that isolated k (-1 when there was none).

    Lagrangian route first: OPT(k) is convex in k for 1-D k-means (a k-link
    path with Monge costs), so some penalty lam per run makes the penalised
    optimum use exactly k runs, and that solution is then optimal for k. We
    walk the lower hull of (runs, SSE) from (1 run) and (n runs) towards k: a
    handful of O(n log n) passes whatever k is. If k sits on a degenerate hull
    edge (collinear costs) no penalty isolates it and the O(k n log n) layered
    DP answers instead, so the result is exact either way.
    """
    n = x.shape[0]
    if n <= k:  # every value its own entry; pad with the largest (keeps the LUT sorted)
        for j in range(k):
            out[j] = x[min(j, n - 1)]
        return -1.0
    # centre the values so the prefix sums of squares do not cancel badly
    mean = 0.0
    tot = 0.0
    for i in range(n):
        mean += w[i] * x[i]
        tot += w[i]
    mean /= tot
    S0 = np.zeros(n + 1)
    S1 = np.zeros(n + 1)
    S2 = np.zeros(n + 1)
    for i in range(n):
        d = x[i] - mean
        S0[i + 1] = S0[i] + w[i]
        S1[i + 1] = S1[i] + w[i] * d
        S2[i + 1] = S2[i] + w[i] * d * d
    F = np.empty(n + 1)
    cnt = np.empty(n + 1, np.int64)
    start = np.empty(n + 1, np.int64)
    qm = np.empty(n + 1, np.int64)
    ql = np.empty(n + 1, np.int64)
    qr = np.empty(n + 1, np.int64)
    hi_c, hi_sse = n, 0.0  # every value alone
    lo_c, lo_sse = 1, S2[n] - S1[n] * S1[n] / S0[n]  # one run
    # without a guess, the two extremes bracket k; with one, we first look for near points on both sides
    bracketed = lam0 <= 0
    lam = (lo_sse - hi_sse) / (hi_c - lo_c) if bracketed else lam0
    seen_hi, seen_lo = False, False
    for it in range(100):
        c = _penalised(S0, S1, S2, lam, F, cnt, start, qm, ql, qr)
        if c == k:
            end = n
            for j in range(k - 1, -1, -1):
                _run_mean(x, w, start[end], end, out, j)
                end = start[end]
            return lam
        if bracketed and (c == hi_c or c == lo_c):
            break  # degenerate hull edge: no penalty isolates k
        sse = F[n] - lam * c
        if c > k:
            if c < hi_c or not seen_hi:
                hi_c, hi_sse = c, sse
            seen_hi = True
        else:
            if c > lo_c or not seen_lo:
                lo_c, lo_sse = c, sse
            seen_lo = True
        if bracketed or (seen_hi and seen_lo):
            bracketed = True
            lam = (lo_sse - hi_sse) / (hi_c - lo_c)  # hull walk
        else:  # SSE ~ 1/k^2, so the penalty that gives k runs scales ~ 1/k^3; overshoot to cross k
            r = c / k
            lam = lam * r * r * r * (1.005 if c > k else 1 / 1.005)
    _kmeans_layered(x, w, k, out, S0, S1, S2)
    return -1.0


@_jit()
def _run_mean(x, w, a, b, out, j):
    s, c = 0.0, 0.0
    for i in range(a, b):
        s += w[i] * x[i]
        c += w[i]
    out[j] = s / c


@_jit()
def _kmeans_layered(x, w, k, out, S0, S1, S2):
    """D[j][i] = min_m D[j-1][m] + cost(m, i), each layer by divide and conquer: O(k n log n)."""
    n = x.shape[0]
    prev = np.empty(n + 1)
    cur = np.empty(n + 1)
    tmp = np.empty(n + 1)
    arg = np.zeros((k, n + 1), np.int32)
    for i in range(1, n + 1):
        prev[i] = S2[i] - S1[i] * S1[i] / S0[i]
    for j in range(1, k):  # j+1 clusters over the first i values; the rest need >= 1 each
        _layer_dc(prev, cur, arg[j], S0, S1, S2, j + 1, n - (k - 1 - j), j, tmp)
        prev, cur = cur, prev
    end = n
    for j in range(k - 1, -1, -1):
        start = arg[j, end] if j > 0 else 0
        _run_mean(x, w, start, end, out, j)
        end = start


@_jit(parallel=True)
def _solve_groups(codes, rank_of, grid, k, out):
    """Exact centroids per row; row 0 first, its penalty then seeds the others (same layer, alike)."""
    G = codes.shape[0]
    lam = _solve_one(codes, rank_of, grid, k, out, 0, -1.0)
    for g in numba.prange(1, G):
        _solve_one(codes, rank_of, grid, k, out, g, lam)


@_jit()
def _solve_one(codes, rank_of, grid, k, out, g, lam0):
    M = codes.shape[1]
    L = grid.shape[0]
    counts = np.zeros(L, np.int64)
    for m in range(M):
        counts[rank_of[codes[g, m]]] += 1
    n = 0
    for r in range(L):
        if counts[r] > 0:
            n += 1
    x = np.empty(n)
    w = np.empty(n)
    n = 0
    for r in range(L):
        if counts[r] > 0:
            x[n] = grid[r]
            w[n] = counts[r]
            n += 1
    return _kmeans_exact(x, w, k, out[g], lam0)


@_jit(parallel=True)
def _assign_groups(codes, rank_of, grid, lut, out, sse):
    """Nearest LUT entry for every element (ties to the lower entry) and the per-group SSE."""
    G, M = codes.shape
    L = grid.shape[0]
    k = lut.shape[1]
    for g in numba.prange(G):
        table = np.empty(L, np.uint8)
        j = 0
        for r in range(L):  # grid and LUT are both sorted: one merge pass
            while j + 1 < k and grid[r] > 0.5 * (lut[g, j] + lut[g, j + 1]):
                j += 1
            table[r] = j
        counts = np.zeros(L, np.int64)
        for m in range(M):
            r = rank_of[codes[g, m]]
            out[g, m] = table[r]
            counts[r] += 1
        e = 0.0  # from the histogram: one float op per distinct value, not per element
        for r in range(L):
            if counts[r] > 0:
                d = grid[r] - lut[g, table[r]]
                e += counts[r] * (d * d)
        sse[g] = e
