"""Every attention kind against its dense float64 twin: outputs, gradients, causality, decoding,
low precision. Small sizes (head_dim 8, window 6, chunks of 9, buckets of 3) so that L = 1000
crosses ~100 chunks; no length is a multiple of a chunk, window or bucket size."""

from __future__ import annotations

import itertools

import pytest
import torch

from sbtrain.attention import build_attention
from sbtrain.attention.features import _ExclusiveScan
from sbtrain.attention.reference import reference_attention, reference_matrix
from tests.conftest import with_lsh_paths

D = 8
LSH = dict(n_hashes=2, bucket_size=3, n_buckets=4)
CASES = {
    "full": ("full", {}),
    "local": ("local", dict(window=6)),
    "performer": ("performer", dict(n_features=8, chunk_size=9, seed=1)),
    "lsh": ("lsh", dict(**LSH, seed=2)),
    "scatterbrain-local": ("scatterbrain", dict(sparse="local", window=6, n_features=8, seed=3)),
    "scatterbrain-no-window": (
        "scatterbrain",
        dict(sparse="local", window=0, n_features=8, chunk_size=9, seed=6),
    ),
    "scatterbrain-lsh": (
        "scatterbrain",
        dict(sparse="lsh", n_features=8, chunk_size=9, **LSH, seed=4),
    ),
    "scatterbrain-local+lsh": (
        "scatterbrain",
        dict(sparse="local+lsh", window=6, n_features=8, **LSH, seed=5),
    ),
    # the other feature maps (features.py), against their own twins
    "performer-simplex": (
        "performer",
        dict(n_features=8, chunk_size=9, seed=7, features="simplex"),
    ),
    "performer-favor++": (
        "performer",
        dict(n_features=8, chunk_size=9, seed=8, features="favor++"),
    ),
    "scatterbrain-local-simplex": (
        "scatterbrain",
        dict(sparse="local", window=6, n_features=8, seed=9, features="simplex"),
    ),
    "scatterbrain-local+lsh-favor++": (
        "scatterbrain",
        dict(sparse="local+lsh", window=6, n_features=8, **LSH, seed=10, features="favor++"),
    ),
}
APPROXIMATE = [name for name in CASES if name not in ("full", "local", "lsh")]


def build(name: str, **overrides):
    kind, options = CASES[name]
    return build_attention(kind, head_dim=D, **{**options, **overrides})


def qkv(length: int, batch: int = 2, heads: int = 2, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, D, generator=gen, dtype=dtype) for _ in range(3)]


def relative(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), floor))


@pytest.mark.parametrize("length", [1, 7, 130, 1000])
@pytest.mark.parametrize("name, lsh_path", with_lsh_paths(CASES), indirect=["lsh_path"])
def test_matches_dense_reference_outputs_and_gradients(name, lsh_path, length):
    attn = build(name)
    inputs = [x.requires_grad_() for x in qkv(length)]
    grad = torch.randn(2, 2, length, D, dtype=torch.float64)
    out = attn(*inputs)
    expected = reference_attention(attn, *inputs)
    assert relative(out, expected) < 1e-5
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want):
        # at L = 1 the q and k gradients are exactly zero: compare them absolutely
        assert relative(g, w, floor=1.0) < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_reference_rows_are_causal_distributions(name):
    attn = build(name)
    q, k, _ = qkv(40)
    matrix = reference_matrix(attn, q, k)
    assert torch.allclose(matrix.sum(-1), torch.ones(2, 2, 40, dtype=torch.float64))
    assert (matrix.triu(1) == 0).all() and (matrix >= 0).all()


@pytest.mark.parametrize("name, lsh_path", with_lsh_paths(CASES), indirect=["lsh_path"])
def test_future_inputs_do_not_change_the_past(name, lsh_path):
    """Outputs at positions <= t ignore q, k, v after t, even a future key 20x larger."""
    t, length = 16, 40  # t sits inside a window chunk and inside a feature chunk
    attn = build(name)
    q, k, v = qkv(length)
    changed = [x.clone() for x in (q, k, v)]
    for x, new in zip(changed, qkv(length, seed=1)):
        x[:, :, t + 1 :] = new[:, :, t + 1 :]
    changed[1][:, :, t + 2] *= 20
    before, after = attn(q, k, v)[:, :, : t + 1], attn(*changed)[:, :, : t + 1]
    assert relative(after, before) < 1e-6


@pytest.mark.parametrize("name, lsh_path", with_lsh_paths(CASES), indirect=["lsh_path"])
def test_gradient_of_an_output_ignores_later_inputs(name, lsh_path):
    t, length = 16, 40
    attn = build(name)
    inputs = [x.requires_grad_() for x in qkv(length)]
    grads = torch.autograd.grad(attn(*inputs)[:, :, t].sum(), inputs)
    for grad in grads:
        assert (grad[:, :, t + 1 :] == 0).all()


@pytest.mark.parametrize(
    "name, lsh_path", with_lsh_paths(n for n in CASES if n != "full"), indirect=["lsh_path"]
)
def test_stabilisers_do_not_look_ahead(name, lsh_path):
    """fp32: future keys aligned with the projection rows (x' = ±W_f) have the largest possible
    feature in every feature, past keys tiny ones (large norms). A log-scale taken over the
    future would move and flush past features to zero; ours are computed from positions <= i
    only, so the parts (scales included) at positions <= t do not change."""
    t, length = 16, 40
    attn = build(name)
    q, k, v = (10 * x.float() for x in qkv(length))
    projection = getattr(attn, "projection", torch.randn(4, D))
    rows = torch.cat([projection, -projection])  # (m, D)
    aligned = k.clone()
    aligned[:, :, t + 1 : t + 1 + len(rows)] = rows * D**0.25  # x' = tau**0.5 x = ±W_f
    before, after = attn.forward_parts(q, k, v), attn.forward_parts(q, aligned, v)
    assert torch.equal(after.log_scale[:, :, : t + 1], before.log_scale[:, :, : t + 1])
    assert relative(after.nd[:, :, : t + 1], before.nd[:, :, : t + 1]) < 1e-6


def test_scatterbrain_with_a_window_covering_the_past_is_exact():
    q, k, v = qkv(130)
    exact = reference_attention(build("full"), q, k, v)
    for sparse in ("local", "local+lsh"):
        options = dict(sparse=sparse, window=130, n_features=8, seed=0)
        if sparse == "local+lsh":
            options.update(LSH)
        attn = build_attention("scatterbrain", head_dim=D, **options)
        assert relative(attn(q, k, v), exact) < 1e-6


def test_scatterbrain_without_a_sparse_part_is_performer():
    q, k, v = qkv(130)
    scatterbrain = build_attention("scatterbrain", head_dim=D, window=0, n_features=8, seed=7)
    performer = build_attention("performer", head_dim=D, n_features=8, chunk_size=9)
    performer.projection.copy_(scatterbrain.projection)  # scatterbrain chunks by 64
    assert relative(scatterbrain(q, k, v), performer(q, k, v)) < 1e-10


def test_chunked_equals_unchunked():
    """The chunk size changes the rounding only (one chunk of 130 = no chunking)."""
    q, k, v = qkv(130)
    outputs = []
    for chunk_size in (1, 9, 130):
        performer = build_attention("performer", head_dim=D, n_features=8, chunk_size=chunk_size)
        performer.redraw(0)
        outputs.append(performer(q, k, v))
    assert all(relative(out, outputs[-1]) < 1e-10 for out in outputs)


def hot_inputs(length: int, dtype: torch.dtype, peak: float = 30.0):
    """q, k, v with max |q.k| tau = `peak` over the causal pairs."""
    q, k, v = qkv(length, dtype=torch.float64)
    scores = (q @ k.transpose(-1, -2) * D**-0.5).tril().abs().amax()
    scale = (peak / scores) ** 0.5
    return [x.to(dtype) for x in (q * scale, k * scale, v)]


@pytest.mark.parametrize("name", CASES)
def test_fp16_inputs_with_sharp_scores_stay_finite_and_close(name):
    attn = build(name)
    q, k, v = hot_inputs(130, torch.float16)
    out = attn(q, k, v)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expected = reference_attention(attn, q, k, v)
    assert relative(out.double(), expected) < 1e-2


@pytest.mark.parametrize("name", CASES)
def test_bf16_autocast_forward_and_backward_stay_finite(name):
    attn = build(name)
    inputs = [x.requires_grad_() for x in hot_inputs(130, torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(*[x.bfloat16() for x in inputs])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)


@pytest.mark.parametrize("name", [n for n in CASES if n != "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_denominators_are_positive_in_fp32(name, dtype):
    attn = build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        part = attn.forward_parts(*hot_inputs(130, dtype))
    assert part.nd.dtype == torch.float32
    assert torch.isfinite(part.nd).all() and torch.isfinite(part.log_scale).all()
    assert (part.nd[..., -1] > 0).all()


def decode_in_pieces(attn, q, k, v, bounds):
    cache, outs = None, []
    for start, stop in itertools.pairwise(bounds):
        piece = (x[:, :, start:stop] for x in (q, k, v))
        out, cache = attn.decode(*piece, cache)
        outs.append(out)
    return torch.cat(outs, dim=2), cache


@pytest.mark.parametrize("name, lsh_path", with_lsh_paths(CASES), indirect=["lsh_path"])
def test_decoding_matches_forward(name, lsh_path):
    attn = build(name)
    q, k, v = qkv(301, batch=1, dtype=torch.float32)
    full = attn(q, k, v)
    one_by_one, _ = decode_in_pieces(attn, q, k, v, list(range(302)))
    assert (one_by_one - full).abs().max() < 1e-5
    prefilled, _ = decode_in_pieces(attn, q, k, v, [0, 37, 38, 39, 100, 301])
    assert (prefilled - full).abs().max() < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_decoding_without_the_next_cache_gives_the_same_outputs(name):
    """keep_cache=False (what context parallelism asks) skips only the next cache."""
    attn = build(name)
    q, k, v = qkv(130, batch=1, dtype=torch.float32)
    _, cache = attn.decode(q[:, :, :60], k[:, :, :60], v[:, :, :60], None)
    rest = [x[:, :, 60:] for x in (q, k, v)]
    kept, _ = attn.decode(*rest, cache)
    out, none = attn.decode(*rest, cache, keep_cache=False)
    assert none is None and torch.equal(out, kept)


@pytest.mark.parametrize("name", ["local", "performer", "scatterbrain-local"])
def test_decode_cache_does_not_grow_with_the_context(name):
    attn = build(name)
    q, k, v = qkv(301, batch=1, dtype=torch.float32)
    _, short = decode_in_pieces(attn, q, k, v, [0, 50, 51])
    _, long = decode_in_pieces(attn, q, k, v, [0, 250, 300, 301])
    assert {key: x.shape for key, x in short.items()} == {key: x.shape for key, x in long.items()}


def test_scan_function_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    growth = torch.rand(1, 2, 5, 3, 1, generator=gen, dtype=torch.float64)
    initial = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _ExclusiveScan.apply(a, growth, b), (x, initial))
