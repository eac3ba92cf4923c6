"""Non-causal attention with a key padding mask: every kind against its dense float64 twin with
ragged padding (outputs and gradients), padding that changes nothing, batch independence, supports
that do not depend on padding, low precision, and the errors. Small sizes as in test_attention.py
(head_dim 8, window 6 or 5, buckets of 3); no real length is a multiple of a window or chunk."""

from __future__ import annotations

import pytest
import torch

from sbtrain.attention import build_attention, check_attention
from sbtrain.attention.reference import reference_attention, reference_matrix
from tests.conftest import with_lsh_paths

D = 8
LSH = dict(n_hashes=2, bucket_size=3, n_buckets=4)
CASES = {
    "full": ("full", {}),
    "local": ("local", dict(window=6)),
    "local-odd": ("local", dict(window=5)),
    "performer": ("performer", dict(n_features=8, seed=1)),
    "lsh": ("lsh", dict(**LSH, seed=2)),
    "lsh-even": ("lsh", dict(n_hashes=2, bucket_size=4, n_buckets=4, seed=7)),
    "scatterbrain-local": ("scatterbrain", dict(sparse="local", window=6, n_features=8, seed=3)),
    "scatterbrain-no-window": ("scatterbrain", dict(window=0, n_features=8, seed=6)),
    "scatterbrain-lsh": ("scatterbrain", dict(sparse="lsh", n_features=8, **LSH, seed=4)),
    "scatterbrain-local+lsh": (
        "scatterbrain",
        dict(sparse="local+lsh", window=5, n_features=8, **LSH, seed=5),
    ),
    "performer-simplex": ("performer", dict(n_features=8, seed=8, features="simplex")),
    "performer-favor++": ("performer", dict(n_features=8, seed=9, features="favor++")),
    "scatterbrain-local-favor++": (
        "scatterbrain",
        dict(sparse="local", window=6, n_features=8, seed=10, features="favor++"),
    ),
    "scatterbrain-local+lsh-simplex": (
        "scatterbrain",
        dict(sparse="local+lsh", window=5, n_features=8, **LSH, seed=11, features="simplex"),
    ),
}


def build(name: str, **overrides):
    kind, options = CASES[name]
    return build_attention(kind, head_dim=D, causal=False, **{**options, **overrides})


def qkv(length: int, batch: int = 4, heads: int = 2, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, D, generator=gen, dtype=dtype) for _ in range(3)]


def padding_mask(lengths: list[int], length: int) -> torch.Tensor:
    """(B, L) bool: the first lengths[b] tokens of row b are real."""
    return torch.arange(length) < torch.tensor(lengths).unsqueeze(-1)


def ragged(length: int) -> list[int]:
    """Real lengths of 4 rows: full, two ragged ones, and a row with no real token."""
    return [length, max(1, length - 13), max(1, length // 2 + 1), 0]


def relative(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), floor))


def at_real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> the entries at real positions, flattened."""
    return x.transpose(1, 2)[mask]


@pytest.mark.parametrize("length", [1, 7, 47, 130])
@pytest.mark.parametrize("name, lsh_path", with_lsh_paths(CASES), indirect=["lsh_path"])
def test_matches_dense_twin_with_ragged_padding(name, lsh_path, length):
    """fp64 to 1e-5 like the causal tests, outputs and the gradients of q, k, v."""
    attn = build(name)
    mask = padding_mask(ragged(length), length)
    inputs = [x.requires_grad_() for x in qkv(length)]
    grad = torch.randn(4, 2, length, D, dtype=torch.float64)
    out = attn(*inputs, key_padding_mask=mask)
    expected = reference_attention(attn, *inputs, key_padding_mask=mask)
    assert relative(out, expected) < 1e-5
    assert (out.transpose(1, 2)[~mask] == 0).all()  # padded queries output 0
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert relative(g, w, floor=1.0) < 1e-5


@pytest.mark.parametrize("name, lsh_path", with_lsh_paths(CASES), indirect=["lsh_path"])
def test_fp32_matches_the_float64_twin(name, lsh_path):
    attn = build(name)
    mask = padding_mask(ragged(130), 130)
    inputs = [x.requires_grad_() for x in qkv(130, dtype=torch.float32)]
    out = attn(*inputs, key_padding_mask=mask)
    expected = reference_attention(attn, *inputs, key_padding_mask=mask)
    assert out.dtype == torch.float32 and relative(out, expected) < 1e-4
    got = torch.autograd.grad(out.square().sum(), inputs)
    want = torch.autograd.grad(expected.square().sum(), inputs)
    assert all(relative(g, w, floor=1.0) < 1e-4 for g, w in zip(got, want))


def test_without_a_mask_every_token_is_real():
    for name in CASES:
        attn = build(name)
        q, k, v = qkv(47)
        everything = torch.ones(4, 47, dtype=torch.bool)
        assert torch.equal(attn(q, k, v), attn(q, k, v, key_padding_mask=everything))


@pytest.mark.parametrize("name", CASES)
def test_twin_rows_are_distributions_over_real_keys(name):
    attn = build(name)
    mask = padding_mask(ragged(40), 40)
    q, k, _ = qkv(40)
    matrix = reference_matrix(attn, q, k, mask)  # (B, H, L, L)
    real_rows = mask[:, None, :].expand(-1, 2, -1)
    sums = matrix.sum(-1)
    assert torch.allclose(sums[real_rows], torch.ones_like(sums[real_rows]))
    assert (sums[~real_rows] == 0).all()
    assert (matrix.transpose(-1, -2)[~real_rows] == 0).all()  # padded keys: no weight
    assert (matrix >= 0).all()


@pytest.mark.parametrize("window", [1, 5, 6])
def test_local_window_is_centred_with_the_causal_budget(window):
    """Counted on the twin: `window` keys per interior query, j - i from -(w // 2) to (w-1) // 2;
    near the ends of the real tokens, fewer."""
    attn = build_attention("local", head_dim=D, causal=False, window=window)
    q, k, _ = qkv(30, batch=1, heads=1)
    mask = padding_mask([25], 30)
    support = reference_matrix(attn, q, k, mask)[0, 0] > 0
    before, after = window // 2, (window - 1) // 2
    for i in range(25):
        keys = support[i].nonzero().flatten().tolist()
        assert keys == list(range(max(0, i - before), min(25, i + after + 1)))
    assert support[12].sum() == window


def test_lsh_support_budget_and_sides():
    """Counted on the twin: at most 1 + n_hashes * bucket_size keys per query (the causal
    budget), at most bucket_size // 2 per round after the query, all real."""
    attn = build("lsh-even")  # bucket_size 4: up to 2 before (itself included) and 2 after
    q, k, _ = qkv(60, batch=2, heads=2)
    mask = padding_mask([60, 37], 60)
    support = reference_matrix(attn, q, k, mask) > 0
    sizes = support.sum(-1)
    assert sizes.max() <= 1 + 2 * 4 and sizes[1, :, :37].min() >= 1
    later = support & torch.ones(60, 60, dtype=torch.bool).triu(1)
    assert later.sum(-1).max() <= 2 * 2
    assert not support[1, :, :, 37:].any()


def test_scatterbrain_with_a_window_covering_everything_is_exact():
    q, k, v = qkv(47)
    mask = padding_mask(ragged(47), 47)
    exact = reference_attention(build("full"), q, k, v, mask)
    for sparse in ("local", "local+lsh"):
        options = dict(sparse=sparse, window=2 * 47, n_features=8, seed=0)
        if sparse == "local+lsh":
            options.update(LSH)
        attn = build_attention("scatterbrain", head_dim=D, causal=False, **options)
        assert relative(attn(q, k, v, key_padding_mask=mask), exact) < 1e-10


def test_scatterbrain_without_a_sparse_part_is_performer():
    q, k, v = qkv(47)
    mask = padding_mask(ragged(47), 47)
    scatterbrain = build("scatterbrain-no-window")
    performer = build("performer")
    performer.projection.copy_(scatterbrain.projection)
    got = scatterbrain(q, k, v, key_padding_mask=mask)
    assert relative(got, performer(q, k, v, key_padding_mask=mask)) < 1e-12


@pytest.mark.parametrize("name, lsh_path", with_lsh_paths(CASES), indirect=["lsh_path"])
def test_inputs_under_padding_change_nothing(name, lsh_path):
    """q, k, v at padded positions replaced by large random values: the outputs at real positions
    and their gradients are unchanged, and the padded inputs get zero gradient."""
    attn = build(name)
    length = 47
    mask = padding_mask(ragged(length), length)
    padded = ~mask[:, None, :, None]
    inputs = qkv(length)
    changed = [torch.where(padded, 30 * x, y) for x, y in zip(qkv(length, seed=1), inputs)]
    outs, grads = [], []
    for xs in (inputs, changed):
        xs = [x.clone().requires_grad_() for x in xs]
        out = attn(*xs, key_padding_mask=mask)
        outs.append(out)
        grads.append(torch.autograd.grad(out.sin().sum(), xs))
    assert relative(at_real(outs[1], mask), at_real(outs[0], mask)) < 1e-10
    for before, after in zip(*grads):
        assert relative(at_real(after, mask), at_real(before, mask), floor=1.0) < 1e-10
        assert (after.transpose(1, 2)[~mask] == 0).all()


@pytest.mark.parametrize("name", CASES)
def test_a_row_ignores_how_the_other_rows_are_padded(name):
    """Row 0's outputs and gradients are the same whether the other rows are long, short or
    empty, and the same as when row 0 is computed alone."""
    attn = build(name)
    length = 47
    inputs = qkv(length)
    results = []
    for lengths in ([40, 47, 47, 47], [40, 3, 0, 29], [40, 1, 11, 0]):
        xs = [x.clone().requires_grad_() for x in inputs]
        out = attn(*xs, key_padding_mask=padding_mask(lengths, length))
        grads = torch.autograd.grad(out[0].sin().sum(), xs)
        results.append((out[0], *(g[0] for g in grads)))
    alone = attn(*(x[:1] for x in inputs), key_padding_mask=padding_mask([40], length))
    for result in results[1:]:
        assert all(relative(a, b, floor=1.0) < 1e-12 for a, b in zip(result, results[0]))
    assert relative(alone[0], results[0][0]) < 1e-12


@pytest.mark.parametrize("where", ["append", "prepend"])
@pytest.mark.parametrize("name", CASES)
def test_outputs_do_not_depend_on_how_much_padding_a_row_carries(name, where):
    """The same real tokens with 0, 11 or 29 padded positions after (or before) them: the same
    outputs at the real positions. For lsh this says the support does not depend on padding;
    prepending also moves every position off the chunk grid."""
    attn = build(name)
    real = 35
    q, k, v = qkv(real + 29, batch=2)
    outputs = []
    for extra in (0, 11, 29):
        xs = [x[:, :, : real + extra] for x in (q, k, v)]
        if where == "prepend":
            xs = [x.roll(extra, dims=2) for x in xs]  # the padding (garbage) comes first
        mask = torch.zeros(2, real + extra, dtype=torch.bool)
        start = extra if where == "prepend" else 0
        mask[:, start : start + real] = True
        outputs.append(attn(*xs, key_padding_mask=mask)[:, :, start : start + real])
    assert all(relative(out, outputs[0]) < 1e-10 for out in outputs[1:])


def hot_inputs(length: int, peak: float = 30.0):
    """fp32 q, k, v with max |q.k| tau = `peak` over all pairs."""
    q, k, v = qkv(length)
    scores = (q @ k.transpose(-1, -2) * D**-0.5).abs().amax()
    scale = (peak / scores) ** 0.5
    return [x.float() for x in (q * scale, k * scale, v)]


@pytest.mark.parametrize("name", CASES)
def test_bf16_autocast_is_finite_and_close(name):
    attn = build(name)
    mask = padding_mask(ragged(130), 130)
    inputs = [x.requires_grad_() for x in hot_inputs(130)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [x.bfloat16() for x in inputs]
        out = attn(*low, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    expected = reference_attention(attn, *low, key_padding_mask=mask)
    assert relative(out, expected) < 2e-2
    out.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)


@pytest.mark.parametrize("name", [n for n in CASES if n != "full"])
def test_denominators_of_real_queries_are_positive(name):
    attn = build(name)
    mask = padding_mask(ragged(130), 130)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        part = attn.forward_parts(*(x.bfloat16() for x in hot_inputs(130)), mask)
    assert part.nd.dtype == torch.float32
    assert torch.isfinite(part.nd).all() and torch.isfinite(part.log_scale).all()
    assert (part.nd[..., -1].transpose(1, 2)[mask] > 0).all()


@pytest.mark.parametrize("name", CASES)
def test_causal_kinds_refuse_a_mask_and_non_causal_ones_refuse_to_decode(name):
    kind, options = CASES[name]
    q, k, v = qkv(10)
    mask = padding_mask(ragged(10), 10)
    with pytest.raises(ValueError, match="key_padding_mask is for non-causal attention only"):
        build_attention(kind, head_dim=D, **options)(q, k, v, key_padding_mask=mask)
    attn = build(name)
    with pytest.raises(ValueError, match="decode is for causal attention only"):
        attn.decode(q, k, v, None)
    for bad in (mask.float(), mask[:, :5], mask[:2]):
        with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
            attn(q, k, v, key_padding_mask=bad)


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("full", dict(causal="no"), "causal must be true or false"),
        ("local", dict(causal=0), "causal must be true or false"),
        ("performer", dict(causal=False, chunk_size=9), "chunk_size only applies to causal"),
        ("scatterbrain", dict(causal=False, window=0, chunk_size=9), "chunk_size only applies"),
        ("scatterbrain", dict(causal=False, window=6, chunk_size=9), "chunk_size is not an option"),
    ],
)
def test_impossible_combinations_are_value_errors(kind, options, message):
    with pytest.raises(ValueError, match=message):
        check_attention(kind, D, **options)


@pytest.mark.parametrize(
    "name, lsh_path", with_lsh_paths(n for n in CASES if n != "full"), indirect=["lsh_path"]
)
def test_padded_keys_do_not_move_the_stabilisers(name, lsh_path):
    """fp32: padded keys aligned with the projection rows (x' = ±W_f, the largest feature every
    feature can have), real keys with tiny features (large norms). A key max that counted padded
    keys would move and flush real features to zero; ours ignores them, so the parts (scales
    included) at real positions do not change."""
    attn = build(name)
    q, k, v = (10 * x.float() for x in qkv(40))
    mask = padding_mask([40, 21, 33, 9], 40)
    projection = getattr(attn, "projection", torch.randn(4, D))
    rows = torch.cat([projection, -projection])  # (m, D)
    hot = k.clone()
    for b, real in enumerate([40, 21, 33, 9]):
        count = min(len(rows), 40 - real)
        hot[b, :, real : real + count] = rows[:count] * D**0.25  # x' = tau**0.5 x = ±W_f
    before, after = attn.forward_parts(q, k, v, mask), attn.forward_parts(q, hot, v, mask)
    real_scale = [part.log_scale.transpose(1, 2)[mask] for part in (before, after)]
    assert torch.equal(*real_scale)
    assert relative(at_real(after.nd, mask), at_real(before.nd, mask)) < 1e-6


@pytest.mark.parametrize("name, lsh_path", with_lsh_paths(CASES), indirect=["lsh_path"])
def test_matches_dense_twin_with_padding_between_real_tokens(name, lsh_path):
    """A mask with holes (not only trailing padding): padded keys between real ones are skipped,
    so e.g. lsh takes its nearest *real* same-bucket keys on both sides."""
    attn = build(name)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(4, 47, generator=gen) < 0.6
    q, k, v = qkv(47)
    out = attn(q, k, v, key_padding_mask=mask)
    assert relative(out, reference_attention(attn, q, k, v, key_padding_mask=mask)) < 1e-10


@pytest.mark.parametrize(
    "name, lsh_path", with_lsh_paths(n for n in CASES if n != "full"), indirect=["lsh_path"]
)
def test_padded_keys_get_no_weight_in_any_part(name, lsh_path):
    """Keys and values under padding replaced: the unnormalised parts of *every* query, padded
    ones included, are unchanged: no sum, exact or through features, counts a padded key."""
    attn = build(name)
    mask = padding_mask(ragged(47), 47)
    q, k, v = qkv(47)
    padded = ~mask[:, None, :, None]
    k2, v2 = (torch.where(padded, 30 * x, y) for x, y in zip(qkv(47, seed=1)[1:], (k, v)))
    before, after = attn.forward_parts(q, k, v, mask), attn.forward_parts(q, k2, v2, mask)
    assert torch.equal(before.log_scale, after.log_scale)
    assert relative(after.nd, before.nd) < 1e-12
