"""The random-feature maps (favor+, simplex, favor++): unbiased over independent draws, lower
variance than FAVOR+ for inputs with large norms, the optimal parameter, the simplex geometry,
the statistic and the checks. Their attention outputs, decoding and low precision are tested
against the dense twins with the other kinds (test_attention.py, test_bidirectional.py)."""

from __future__ import annotations

import math

import pytest
import torch

from sbtrain.attention import build_attention, check_attention
from sbtrain.attention.common import generator
from sbtrain.attention.features import (
    FEATURES,
    default_statistic,
    draw_projection,
    input_statistic,
    log_features,
    map_log_features,
    optimal_a,
)
from sbtrain.attention.performer import calibrate

D = 8
TAU = D**-0.5


def pair(norm: float, product: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (D,) float64 with tau |q|² = tau |k|² = norm and tau q.k = product."""
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(D, 2, generator=gen, dtype=torch.float64))
    cos = product / norm
    length = math.sqrt(norm / TAU)
    q = length * basis[:, 0]
    k = length * (cos * basis[:, 0] + math.sqrt(1 - cos * cos) * basis[:, 1])
    return q, k


def estimates(features: str, q, k, draws: int, n_features: int = 2 * D, a: float | None = None):
    """phi(q).phi(k) for `draws` independent projections (float64)."""
    if a is None:
        s = float(input_statistic(q[None], k[None], TAU))
        a = optimal_a(s, D) if features == "favor++" else 0.0
    out = torch.empty(draws, dtype=torch.float64)
    for seed in range(draws):
        w = draw_projection(D, n_features, generator(seed), features).double()
        lq, lk = (log_features(x[None], w, TAU, a)[0] for x in (q, k))
        out[seed] = torch.exp(lq + lk).sum()
    return out


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("norm, product", [(1.0, 1.0), (3.0, 3.0), (3.0, -3.0), (2.0, 0.5)])
def test_mean_over_draws_is_the_softmax_kernel(features, norm, product):
    q, k = pair(norm, product)
    values = estimates(features, q, k, draws=3000)
    standard_error = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) - math.exp(product)) < 5 * standard_error + 1e-12


@pytest.mark.parametrize("a", [-0.1, 0.05, 0.6])
def test_favor_plus_plus_is_unbiased_for_any_fixed_a(a):
    q, k = pair(2.0, 1.5)
    values = estimates("favor++", q, k, draws=3000, a=a)
    standard_error = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) - math.exp(1.5)) < 5 * standard_error


@pytest.mark.parametrize("norm", [1.0, 2.0])
def test_favor_plus_plus_has_lower_variance_than_favor_plus_for_large_norms(norm):
    # S = tau |q + k|² = 4, 6. The sample variance of FAVOR+ is heavy-tailed (2,000 draws
    # underestimate it, 20,000 give 0.9 and 14 exp(2 tau q.k)); favor++'s is 0.1 and 0.8
    q, k = pair(norm, 1.0)
    variance = {f: float(estimates(f, q, k, draws=2000).var()) for f in ("favor+", "favor++")}
    assert variance["favor++"] < 0.5 * variance["favor+"]


def second_moment(a: float, s: float, d: int = D) -> float:
    """log E[(phi(x).phi(y))²] + |x'|² + |y'|² for one i.i.d. Gaussian feature (closed form)."""
    return d * math.log1p(4 * a) - d / 2 * math.log1p(8 * a) + 2 * s * (1 + 4 * a) / (1 + 8 * a)


@pytest.mark.parametrize("s", [0.0, 0.3, 4.0, 30.0, 300.0])
def test_optimal_a_minimises_the_second_moment(s):
    a = optimal_a(s, D)
    assert a >= 0.0
    for other in (a - 1e-3, a + 1e-3, 0.0, 2 * a + 0.1):
        if other > -0.125:
            assert second_moment(a, s) <= second_moment(other, s) + 1e-12


def test_simplex_blocks_are_a_rotated_regular_simplex_with_gaussian_lengths():
    w = draw_projection(D, 4 * D, generator(3), "simplex").double()  # (2 D, D): two blocks
    lengths = w.norm(dim=1)
    for block in (w[:D], w[D:]):
        unit = block / block.norm(dim=1, keepdim=True)
        cosines = unit @ unit.T
        off = cosines[~torch.eye(D, dtype=torch.bool)]
        assert torch.allclose(off, torch.full_like(off, -1.0 / (D - 1)), atol=1e-6)
    assert not torch.allclose(w[:D] / lengths[:D, None], w[D:] / lengths[D:, None])
    # lengths are chi_D: over many draws the mean squared length is D
    many = torch.cat([draw_projection(D, 2 * D, generator(s), "simplex") for s in range(300)])
    assert abs(float(many.double().norm(dim=1).pow(2).mean()) - D) < 0.3


def test_statistic_is_the_mean_over_pairs():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 3, 5, D, generator=gen, dtype=torch.float64) for _ in range(2))
    qs, ks = q.reshape(-1, D) * TAU**0.5, k.reshape(-1, D) * TAU**0.5
    brute = ((qs[:, None] + ks[None]) ** 2).sum(-1).mean()
    assert torch.allclose(input_statistic(q, k, TAU), brute)


def test_calibrate_sets_the_statistic_of_favor_plus_plus_only():
    attn = build_attention("performer", head_dim=D, n_features=8, seed=0, features="favor++")
    assert float(attn.feature_stat) == pytest.approx(default_statistic(D))
    q, k = (3 * torch.randn(1, 2, 9, D) for _ in range(2))
    calibrate(attn, q, k)
    assert float(attn.feature_stat) == pytest.approx(float(input_statistic(q, k, TAU)))
    assert "feature_stat" in attn.state_dict()
    plain = build_attention("performer", head_dim=D, n_features=8, seed=0, features="simplex")
    calibrate(plain, q, k)
    assert "feature_stat" not in plain.state_dict()  # favor+ / simplex checkpoints unchanged


def test_favor_plus_plus_reads_its_statistic_without_a_host_round_trip(monkeypatch):
    """The forward pass must not turn the `feature_stat` buffer into a Python number (on a GPU
    that is a synchronisation per layer per call); the tensor A equals the float formula's."""
    attn = build_attention("performer", head_dim=D, n_features=8, seed=0, features="favor++")
    attn.feature_stat.fill_(7.5)
    x = torch.randn(1, 2, 5, D, dtype=torch.float64)
    expected = log_features(x, attn.projection, TAU, optimal_a(7.5, D))

    def refuse(*_):
        raise AssertionError("the statistic was read on the host")

    for name in ("item", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    got = map_log_features(attn, x)
    monkeypatch.undo()
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["performer", "scatterbrain"])
def test_only_the_favor_plus_formula_is_fusable(kind):
    built = {f: build_attention(kind, head_dim=D, n_features=8, features=f) for f in FEATURES}
    fused = {f: attn.fusable for f, attn in built.items()}
    assert fused == {"favor+": True, "simplex": True, "favor++": False}


@pytest.mark.parametrize("kind", ["performer", "scatterbrain"])
def test_the_dispatch_sends_only_fusable_maps_to_the_kernels(kind, monkeypatch):
    """Under `auto` (the interpreter serving CPU tensors) favor+ reaches the fused kernels and
    favor++ never does; `fused` refuses favor++ with the switch's error."""
    pytest.importorskip("triton")
    from sbtrain.attention import dispatch, triton_kernels

    if not triton_kernels.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
    monkeypatch.setattr(dispatch, "INTERPRETER_SERVES_CPU", True)
    calls = []
    monkeypatch.setattr(triton_kernels, "scatterbrain_local", lambda *a, **k: calls.append(1))
    options = {"window": 16} if kind == "scatterbrain" else {}
    q = torch.randn(1, 1, 20, D)
    for features, expected in (("favor+", 1), ("favor++", 0)):
        attn = build_attention(kind, head_dim=D, n_features=16, features=features, **options)
        calls.clear()
        attn(q, q, q)
        assert len(calls) == expected, features
    attn.impl = "fused"
    with pytest.raises(dispatch.FusedUnavailable, match="no fused kernel"):
        attn(q, q, q)


def test_redraw_follows_the_map_and_the_seed():
    attn = build_attention("scatterbrain", head_dim=D, window=4, n_features=16, features="simplex")
    attn.redraw(5)
    first = attn.projection.clone()
    attn.redraw(6)
    assert not torch.equal(first, attn.projection)
    attn.redraw(5)
    assert torch.equal(first, attn.projection)
    assert torch.equal(first, draw_projection(D, 16, generator(5), "simplex"))


@pytest.mark.parametrize("kind", ["performer", "scatterbrain"])
def test_an_unknown_map_is_an_error(kind):
    with pytest.raises(ValueError, match="features must be one of favor\\+, simplex, favor\\+\\+"):
        check_attention(kind, head_dim=D, n_features=8, features="favor")
    with pytest.raises(TypeError, match="does not take features"):
        check_attention("local", head_dim=D, window=4, features="simplex")
