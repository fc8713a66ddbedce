"""Correlation layers (Rocco et al. 2017, all pairs; FlowNet 2015, windowed) against explicit
loops, 2D and 3D."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from learnreg.nn.correlation import (
    FeatureCorrelation,
    LocalCorrelation,
    correlation,
    displacements,
    l2_normalize,
    local_correlation,
)


def _loop(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out[n, k, x] = <a[n, :, p_k], b[n, :, x]> with p_k the row-major positions of a."""
    n, _ = a.shape[:2]
    sa, sb = a.shape[2:], b.shape[2:]
    pos_a = list(itertools.product(*[range(s) for s in sa]))
    out = torch.zeros(n, len(pos_a), *sb, dtype=a.dtype)
    for i in range(n):
        for k, p in enumerate(pos_a):
            for x in itertools.product(*[range(s) for s in sb]):
                out[(i, k, *x)] = sum(
                    float(a[(i, c, *p)]) * float(b[(i, c, *x)]) for c in range(a.shape[1])
                )
    return out


@pytest.mark.parametrize(
    "sa,sb", [((3, 4), (3, 4)), ((2, 3), (4, 2)), ((2, 3, 2), (2, 3, 2)), ((2, 2, 3), (3, 1, 2))]
)
def test_correlation_matches_explicit_loop(sa, sb) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, *sa, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, *sb, generator=g, dtype=torch.float64)
    out = correlation(a, b)
    assert out.shape == (2, a[0, 0].numel(), *sb)
    torch.testing.assert_close(out, _loop(a, b))


def test_feature_correlation_normalizations() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)
    raw = FeatureCorrelation(False, False)(a, b)
    torch.testing.assert_close(raw, _loop(a, b))
    # normalized features: the correlation of an image with itself is 1 on the "diagonal"
    self_corr = FeatureCorrelation(True, False)(a, a)
    diag = self_corr.reshape(9, 9).diagonal()
    torch.testing.assert_close(diag, torch.ones(9, dtype=torch.float64))
    assert self_corr.abs().max() <= 1 + 1e-12
    # full: ReLU then unit L2 norm over the correlation channels at every position
    full = FeatureCorrelation()(a, b)
    ref = torch.relu(_loop(l2_normalize(a), l2_normalize(b)))
    ref = ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-6)
    torch.testing.assert_close(full, ref)
    assert (full >= 0).all()
    torch.testing.assert_close(full.norm(dim=1), torch.ones(1, 3, 3, dtype=torch.float64))


def test_correlation_finds_a_shift() -> None:
    """Distinct unit descriptors shifted by one column: the best match of each target position
    is the source position one column to the left (3D)."""
    g = torch.Generator().manual_seed(2)
    src = l2_normalize(torch.randn(1, 16, 3, 4, 5, generator=g))
    tgt = torch.roll(src, shifts=1, dims=4)
    best = FeatureCorrelation()(src, tgt).argmax(1)[0]  # (3, 4, 5) flat source index
    i, j, k = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    expected = (i * 4 + j) * 5 + (k - 1) % 5
    assert torch.equal(best, expected)


def test_correlation_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same batch size and channels"):
        correlation(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        correlation(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        correlation(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, \*S\)"):
        l2_normalize(torch.zeros(3, 4))


# ---------------------------------------------------------------------------- FlowNet's layer
def _local_loop(a, b, d, s1, s2, patch):
    """FlowNet Eq. 1 by brute force: for every output position x (step s1) and displacement
    δ (step s2, |δ_i| <= d), mean over channels and patch offsets o of a(x + o) · b(x + δ + o),
    zero outside the maps."""
    n, c, *size = a.shape
    k = patch // 2
    shifts = [s for s in itertools.product(range(-d, d + 1), repeat=len(size))]
    shifts = [s for s in shifts if all(v % s2 == 0 for v in s)]
    out_size = [-(-v // s1) for v in size]
    out = torch.zeros(n, len(shifts), *out_size, dtype=a.dtype)

    def at(t, i, ch, p):
        return (
            float(t[(i, ch, *p)]) if all(0 <= v < m for v, m in zip(p, size, strict=True)) else 0.0
        )

    for i in range(n):
        for m, shift in enumerate(shifts):
            for y in itertools.product(*[range(v) for v in out_size]):
                x = [v * s1 for v in y]
                total = 0.0
                for o in itertools.product(range(-k, k + 1), repeat=len(size)):
                    p = [xi + oi for xi, oi in zip(x, o, strict=True)]
                    q = [pi + si for pi, si in zip(p, shift, strict=True)]
                    total += sum(at(a, i, ch, p) * at(b, i, ch, q) for ch in range(c))
                out[(i, m, *y)] = total / (c * patch ** len(size))
    return out


@pytest.mark.parametrize(
    "size,d,s1,s2,patch",
    [
        ((6, 7), 2, 1, 1, 1),
        ((6, 7), 3, 2, 2, 1),
        ((5, 6), 2, 1, 1, 3),
        ((4, 5, 4), 1, 1, 1, 1),
        ((4, 4, 5), 2, 2, 2, 3),
    ],
)
def test_local_correlation_matches_brute_force(size, d, s1, s2, patch) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    out = local_correlation(a, b, d, s1, s2, patch)
    ref = _local_loop(a, b, d, s1, s2, patch)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < 1e-6


def test_normalized_local_correlation_is_the_cosine_of_centred_features() -> None:
    """``normalize``: the brute-force loop on features centred and scaled to unit length per
    position (numpy), times the channel count (a sum over channels, not a mean)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64) + 2.0
    b = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64) * 3.0

    def centred_unit(t):
        x = t.numpy() - t.numpy().mean(1, keepdims=True)
        return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))

    out = local_correlation(a, b, 2, 1, 1, 3, normalize=True)
    ref = _local_loop(centred_unit(a), centred_unit(b), 2, 1, 1, 3) * 4
    assert float((out - ref).abs().max()) < 1e-6
    assert float(local_correlation(a, a, 0, normalize=True).sub(1).abs().max()) < 1e-6


def test_local_correlation_peaks_at_the_shift_and_orders_channels() -> None:
    """A map shifted by δ = (1, -2) correlates best at channel δ of :func:`displacements`."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1, 8, 12, 12, generator=g)
    b = torch.roll(a, shifts=(1, -2), dims=(2, 3))  # b(x + δ) = a(x)
    layer = LocalCorrelation(3, activation=False)
    out = layer(a, b)[..., 3:-3, 3:-3]  # away from the wrapped border
    shifts = displacements(2, 3)
    assert out.shape[1] == layer.out_channels(2) == len(shifts) == 49
    best = out.mean((2, 3)).argmax(1)
    assert shifts[best].tolist() == [[1, -2]]


def test_local_correlation_rejects_bad_inputs() -> None:
    a = torch.zeros(1, 2, 5, 5)
    with pytest.raises(ValueError, match="same shape"):
        local_correlation(a, torch.zeros(1, 2, 5, 4), 1)
    with pytest.raises(ValueError, match="odd"):
        local_correlation(a, a, 1, patch_size=2)
    with pytest.raises(ValueError, match="max_displacement"):
        LocalCorrelation(-1)
