"""sdwork.kmeans1d: exact, never worse than coremltools' k-means, coremltools' LUT layout, clear errors."""
import itertools

import numpy as np
import pytest

from sdwork.compress import kmeans1d
from sdwork.coreml.lut import lut_to_dense

pytest.importorskip("numba")


def _sse(w, lut, idx):
    return float(np.square(w.astype(np.float64) - lut[idx].astype(np.float64)).sum())


def _brute_force_sse(x, c, k):
    """Minimum SSE over every split of sorted distinct values x (counts c) into k contiguous runs."""
    best = np.inf
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        total = 0.0
        for a, b in zip((0,) + cuts, cuts + (len(x),)):
            xs, cs = x[a:b], c[a:b]
            mean = (xs * cs).sum() / cs.sum()
            total += (cs * (xs - mean) ** 2).sum()
        best = min(best, total)
    return best


def test_dp_matches_brute_force():
    """The DP's centroids reach the true optimum on every small case (float64, before rounding)."""
    rng = np.random.default_rng(1)
    for trial in range(40):
        n, k = rng.integers(5, 11), int(rng.choice([2, 3, 4]))
        x = np.sort(rng.choice(rng.normal(size=200), n, replace=False))
        c = rng.integers(1, 20, n).astype(np.float64)
        out = np.empty(k)
        kmeans1d._kmeans_exact(x, c, k, out)
        # SSE of the DP's solution with each value on its nearest centroid
        d = np.abs(x[:, None] - out[None, :]).min(1)
        assert (c * d**2).sum() == pytest.approx(_brute_force_sse(x, c, k), rel=1e-9, abs=1e-12), trial


def test_degenerate_ties_still_exact():
    """Equally spaced equal counts make costs collinear in k: the layered DP fallback must answer exactly."""
    for n, k in [(8, 3), (9, 4), (10, 5), (6, 4)]:
        x, c = np.arange(n, dtype=np.float64), np.ones(n)
        out = np.empty(k)
        kmeans1d._kmeans_exact(x, c, k, out)
        d = np.abs(x[:, None] - out[None, :]).min(1)
        assert (d**2).sum() == pytest.approx(_brute_force_sse(x, c, k), rel=1e-9, abs=1e-12)


def test_both_exact_routes_agree():
    """The Lagrangian route and the layered DP give the same optimum on fp16-like histograms."""
    rng = np.random.default_rng(7)
    for k, n in ((4, 3000), (16, 3000), (64, 3000), (16, 20_000), (256, 20_000)):
        x, c = np.unique(rng.normal(size=n).astype(np.float16).astype(np.float64), return_counts=True)
        c = c.astype(np.float64)
        a, b, seeded = np.empty(k), np.empty(k), np.empty(k)
        lam = kmeans1d._kmeans_exact(x, c, k, a)
        # a sibling group's penalty as the starting guess (how groups after the first are solved)
        kmeans1d._kmeans_exact(x, c, k, seeded, lam * 1.3 if lam > 0 else -1.0)
        S = [np.concatenate([[0.0], np.cumsum(c * (x - (c * x).sum() / c.sum()) ** p)]) for p in (0, 1, 2)]
        kmeans1d._kmeans_layered(x, c, k, b, *S)
        sse = [(c * np.abs(x[:, None] - o[None, :]).min(1) ** 2).sum() for o in (a, b, seeded)]
        assert sse[0] == pytest.approx(sse[1], rel=1e-9) and sse[2] == pytest.approx(sse[1], rel=1e-9)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
def test_never_worse_than_coremltools(nbits):
    """Per group, MSE <= coremltools' own k-means (kmeans1d for >= 10k fp16 values, scikit-learn below)."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    rng = np.random.default_rng(nbits)
    for m in (600, 10_240):  # both of coremltools' code paths
        if nbits == 8 and m > 1000:
            continue  # coremltools' exact path takes seconds here; the 600 case covers 8 bits
        rows = np.stack([rng.standard_t(3, m) * 0.02, rng.uniform(-0.01, 0.01, m)]).astype(np.float16)
        lut, idx = kmeans1d.cluster_rows(rows, nbits)
        for g in range(rows.shape[0]):
            ref_lut, ref_idx = _get_kmeans_lookup_table_and_weight(nbits, rows[g])
            ref = _sse(rows[g], ref_lut.reshape(-1).astype(np.float16), ref_idx.astype(np.int64))
            ours = _sse(rows[g], lut[g], idx[g].astype(np.int64))
            assert ours <= ref * (1 + 1e-9) + 1e-15, (m, g, ours, ref)


def test_exact_when_few_distinct_values():
    w = np.repeat(np.array([-1.5, -0.25, 0.0, 0.125, 3.0], np.float16), 7).reshape(5, 7)
    lut, idx = kmeans1d.palettize_weight(w, 3)
    assert np.array_equal(lut_to_dense(lut, idx), w)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_layout_matches_coremltools(dtype):
    """Same LUT shape/dtype and index shape as coremltools' grouped_channelwise_compress, for axis 0 and 1."""
    from coremltools.optimize.coreml._quantization_passes import palettize_weights as ct_pass

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 12, 3, 3)).astype(dtype)
    for axis in (0, 1):
        lut, idx = kmeans1d.palettize_weight(w, 2, "per_grouped_channel", group_size=4, channel_axis=axis)
        ref = ct_pass.grouped_channelwise_compress(w, "KMEANS", 2, axis, 4)
        assert lut.shape == ref.lut.shape and lut.dtype == ref.lut.dtype == dtype
        assert idx.shape == ref.indices.shape == w.shape and idx.dtype == np.uint8
        dense = lut_to_dense(lut, idx)
        from coremltools.optimize import _utils as ct_utils

        assert np.array_equal(dense, ct_utils.lut_to_dense(idx, lut, None))  # coremltools' own decoding
        assert np.square(dense - w).sum() <= np.square(ct_pass.decompress(ref) - w).sum() * (1 + 1e-6)
        _, _, sse = kmeans1d.palettize_weight(w, 2, "per_grouped_channel", 4, axis, return_sse=True)
        assert sse == pytest.approx(np.square(dense.astype(np.float64) - w.astype(np.float64)).sum(), rel=1e-9)
    lut, idx = kmeans1d.palettize_weight(w, 4)
    assert lut.shape == (1, 1, 1, 1, 16, 1)


def test_deterministic():
    w = np.random.default_rng(3).normal(size=(64, 300)).astype(np.float16)
    a = kmeans1d.palettize_weight(w, 4, "per_grouped_channel", group_size=8)
    b = kmeans1d.palettize_weight(w.copy(), 4, "per_grouped_channel", group_size=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_clear_errors():
    w = np.zeros((6, 4), np.float16)
    with pytest.raises(ValueError, match="nbits must be one of"):
        kmeans1d.palettize_weight(w, 5)
    with pytest.raises(ValueError, match="does not divide the 6 channels.*divisor"):
        kmeans1d.palettize_weight(w, 4, "per_grouped_channel", group_size=4)
    with pytest.raises(ValueError, match="granularity"):
        kmeans1d.palettize_weight(w, 4, "per_channel")
    with pytest.raises(ValueError, match="NaN or inf"):
        kmeans1d.palettize_weight(np.full((2, 2), np.nan, np.float16), 1)
    with pytest.raises(ValueError, match="float16 or float32"):
        kmeans1d.palettize_weight(np.zeros((2, 2), np.int8), 1)
