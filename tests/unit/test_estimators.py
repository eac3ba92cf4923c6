"""The random estimators themselves, over many independent draws of their randomness.

The dense twins in attention/reference.py are built from a module's own projection W and LSH
rotations, so they check the kernels, not the draws: a biased W gives a biased twin. Here the
truth is independent of the draws: exp(tau q.k) in closed form, the chi distribution of a Gaussian
vector's length, orthogonality, the symmetry that makes every LSH bucket equally likely, and exact
softmax attention. Every bound comes from the sample's own spread (standard errors), with the
number of draws chosen so that a biased estimator falls far outside it in a second or two.
"""

from __future__ import annotations

import math

import pytest
import torch

from sbtrain.attention import build_attention
from sbtrain.attention.features import draw_projection, log_features
from sbtrain.attention.lsh import draw_rotations, hash_buckets
from sbtrain.attention.reference import reference_attention

D = 8
TAU = D**-0.5
N_FEATURES = 40  # 20 rows: blocks of 8, 8 and a partial block of 4
ROWS = N_FEATURES // 2
DRAWS = 3000


@pytest.fixture(scope="module")
def projections() -> torch.Tensor:
    """(DRAWS, ROWS, D) independent draws of W from the library's own draw_projection."""
    gen = torch.Generator().manual_seed(0)
    return torch.stack([draw_projection(D, N_FEATURES, gen) for _ in range(DRAWS)])


def pair(target: float, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (D,) float64 with |q'| = |k'| = norm and q'.k' = tau q.k = target (x' = tau**0.5 x)."""
    cos = target / norm**2
    u = torch.zeros(D, dtype=torch.float64)
    u[0] = 1.0
    w = torch.zeros(D, dtype=torch.float64)
    w[0], w[1] = cos, math.sqrt(max(1 - cos**2, 0.0))
    return norm * u / TAU**0.5, norm * w / TAU**0.5


# (tau q.k, |q'|): positive targets use aligned q', k', the pairs of least variance for them
# (the variance of one feature product grows like exp(|q' + k'|^2), and |q' + k'|^2 >= 4 q'.k').
PAIRS = [(0.0, 0.7), (0.5, 0.8), (1.0, 1.0), (2.0, 2**0.5), (3.0, 3**0.5), (-1.0, 1.2), (-3.0, 2.0)]


@pytest.mark.parametrize(("target", "norm"), PAIRS)
def test_feature_products_are_unbiased_for_exp_of_the_score(projections, target, norm):
    """mean over draws of phi(q).phi(k) = exp(tau q.k) within 5 standard errors of the mean."""
    q, k = pair(target, norm)
    x = torch.stack([q, k])[None, None]  # (1, 1, 2, D)
    logs = torch.stack([log_features(x, w, TAU)[0, 0] for w in projections.double()])  # (N, 2, m)
    products = (logs[:, 0] + logs[:, 1]).exp().sum(-1)  # (N,): one estimate per draw
    truth = math.exp(target)
    mean = products.mean().item()
    error = products.std().item() / DRAWS**0.5
    assert abs(mean - truth) < 5 * error, (mean, truth, error)
    assert error < 0.2 * truth  # sharp: a 1.3x longer W biases every pair here by 1.4x or more


def chi_cdf(r: torch.Tensor, dof: int) -> torch.Tensor:
    """P(|g| <= r) for g ~ N(0, I_dof): the regularised lower incomplete gamma P(dof/2, r^2/2)."""
    return torch.special.gammainc(torch.tensor(dof / 2, dtype=r.dtype), r * r / 2)


def test_row_lengths_follow_the_chi_distribution(projections):
    """Kolmogorov-Smirnov distance of the row lengths to chi(D) below its 0.1% critical value
    (1.95 / sqrt(n) for n i.i.d. lengths); the mean squared length D within 5 standard errors."""
    lengths = projections.double().norm(dim=-1).flatten().sort().values  # n i.i.d. chi(D)
    n = lengths.numel()
    cdf = chi_cdf(lengths, D)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    assert max(above.max().item(), below.max().item()) < 1.95 / n**0.5
    squared = lengths**2  # chi-square(D): mean D, variance 2D
    assert abs(squared.mean().item() - D) < 5 * (2 * D / n) ** 0.5


def test_rows_are_orthogonal_within_a_block_and_independent_across_blocks(projections):
    directions = projections.double() / projections.double().norm(dim=-1, keepdim=True)
    for start in range(0, ROWS, D):  # blocks of D rows; the last one is partial
        block = directions[:, start : start + D]
        gram = block @ block.transpose(-1, -2)
        eye = torch.eye(block.shape[1], dtype=torch.float64)
        assert (gram - eye).abs().max() < 1e-5  # orthonormal directions (W is stored in fp32)
    # directions of different blocks are independent and uniform: E[cos^2] = 1 / D
    cos2 = (directions[:, :D] @ directions[:, D : 2 * D].transpose(-1, -2)).square()
    per_draw = cos2.mean(dim=(-1, -2))
    error = per_draw.std().item() / DRAWS**0.5
    assert abs(per_draw.mean().item() - 1 / D) < 5 * error


@pytest.mark.parametrize("n_buckets", [4, 16])
def test_lsh_buckets_of_random_inputs_are_spread_over_all_buckets(n_buckets):
    """By symmetry every bucket is equally likely for one input over independent rotations.
    4000 rounds (each an independent rotation) hash the same inputs; per input, the bucket
    counts pass a chi-square test (df = n_buckets - 1, bound: mean + 5 standard deviations)."""
    rounds = 4000
    rotations = draw_rotations(D, rounds, n_buckets, torch.Generator().manual_seed(1))
    x = torch.randn(1, 1, 3, D, generator=torch.Generator().manual_seed(2))
    buckets = hash_buckets(x, rotations)[:, 0, 0]  # (rounds, 3)
    dof = n_buckets - 1
    for point in buckets.T:
        counts = torch.bincount(point, minlength=n_buckets).double()
        assert counts.numel() == n_buckets  # no bucket outside [0, n_buckets)
        expected = rounds / n_buckets
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < dof + 5 * (2 * dof) ** 0.5, counts


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("performer", dict(n_features=256)),
        ("scatterbrain", dict(sparse="local", window=5, n_features=256)),
    ],
)
def test_module_output_matches_exact_softmax_attention(kind, options):
    """Many features, small scores (|tau q.k| <= 0.5): over 32 seeds the mean output equals
    exact softmax attention within the seeds' own spread. The ratio estimator's bias is of order
    Var/(m L), far below the standard error here. The bound is on the mean squared z-score of all
    outputs: each is a t-statistic with 31 degrees of freedom (its square has mean 31/29), but the
    outputs of a row share one denominator, so the mean over them varies: 0.8-1.8 over ten draws
    of the inputs. A 1.3x longer W gives 80-300; the bound, 3, sits between."""
    seeds, length = 32, 40
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, length, D, generator=gen, dtype=torch.float64) for _ in range(3))
    peak = (q @ k.transpose(-1, -2) * TAU).abs().amax()
    q, k = q * (0.5 / peak) ** 0.5, k * (0.5 / peak) ** 0.5
    exact = reference_attention(build_attention("full", head_dim=D), q, k, v)
    outs = torch.stack(
        [build_attention(kind, head_dim=D, seed=s, **options)(q, k, v) for s in range(seeds)]
    )
    error = outs.std(0) / seeds**0.5
    z2 = ((outs.mean(0) - exact) / error)[:, :, 5:].square()  # the window covers rows < 5 exactly
    assert z2.mean().item() < 3.0
    assert error.max().item() < 0.05  # the seeds agree closely, so the bound is sharp
