"""Rotary positions: the rotation itself (closed form, relative positions), every attention kind
on rotated queries and keys against its dense float64 twin, LSH buckets drawn from the content,
and the model handing the kernel rotated vectors plus the unrotated ones for hashing."""

from __future__ import annotations

import pytest
import torch

from sbtrain.attention.reference import reference_attention
from sbtrain.config import AttentionConfig, DecoderConfig
from sbtrain.model import ROPE_BASE, TransformerLM, rope
from tests.conftest import with_lsh_paths
from tests.unit.test_attention import CASES, D, build, qkv, relative


def rope_twin(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """float64 rotary positions written independently: the pair (x_i, x_{i+D/2}) as the complex
    number x_i + j x_{i+D/2}, multiplied by exp(j p theta_i), theta_i = base**(-2i/D)."""
    x = x.double()
    length, dim = x.shape[-2:]
    half = dim // 2
    theta = torch.tensor([ROPE_BASE ** (-2.0 * i / dim) for i in range(half)], dtype=torch.float64)
    p = torch.arange(start, start + length, dtype=torch.float64)
    turn = torch.polar(torch.ones(length, half, dtype=torch.float64), p[:, None] * theta)
    z = torch.complex(x[..., :half], x[..., half:]) * turn
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_of_a_unit_vector_is_the_rotation_by_its_position():
    # head size 2: one pair, theta_0 = 1, so position p turns (1, 0) into (cos p, sin p)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(5, 2)
    out = rope(x, start=3)
    p = torch.arange(3, 8, dtype=torch.float64)
    assert torch.allclose(out, torch.stack([p.cos(), p.sin()], dim=-1), atol=1e-12)


@pytest.mark.parametrize("start", [0, 5, 1000])
def test_rope_matches_its_complex_twin_and_keeps_norms(start):
    x = torch.randn(2, 3, 17, D, dtype=torch.float64)
    out = rope(x, start)
    assert relative(out, rope_twin(x, start)) < 1e-12
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)


def test_rotated_scores_depend_only_on_the_offset():
    """q_m . k_n after rotation is a function of m - n: the same vectors at every pair of
    positions with the same offset give the same score; another offset gives another score."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, D, generator=gen, dtype=torch.float64) for _ in range(2))

    def score(m: int, n: int) -> float:
        return float(rope(q, m) @ rope(k, n).T)

    for offset in (0, 3, 40):
        same = [score(n + offset, n) for n in (0, 7, 123, 5000)]
        assert max(same) - min(same) < 1e-9, (offset, same)
    assert abs(score(10, 0) - score(11, 0)) > 1e-3


@pytest.mark.parametrize("name, lsh_path", with_lsh_paths(CASES), indirect=["lsh_path"])
def test_kinds_on_rotated_inputs_match_the_dense_reference(name, lsh_path):
    """The module on rope(q), rope(k) with the content as hash_qk equals the float64 twin of
    rope followed by the kind's dense twin (buckets from the content): outputs and gradients."""
    attn = build(name)
    q, k, v = (x.requires_grad_() for x in qkv(130))
    out = attn(rope(q), rope(k), v, hash_qk=(q, k))
    expected = reference_attention(attn, rope_twin(q), rope_twin(k), v, hash_qk=(q, k))
    assert relative(out, expected) < 1e-9
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for g, w in zip(got, want):
        assert relative(g, w) < 1e-9


@pytest.mark.parametrize(
    "name, lsh_path", with_lsh_paths(n for n in CASES if "lsh" in n), indirect=["lsh_path"]
)
def test_non_causal_lsh_kinds_hash_the_content_too(name, lsh_path):
    """Non-causal, with ragged padding: the module on rope(q), rope(k) with the content as
    hash_qk equals the float64 twin whose buckets come from the content; hashing the rotated
    vectors instead gives another output."""
    chunkless = {"chunk_size": None} if name == "scatterbrain-lsh" else {}  # causal-only option
    attn = build(name, causal=False, **chunkless)
    q, k, v = qkv(97)
    mask = torch.arange(97) < torch.tensor([[97], [60]])
    out = attn(rope(q), rope(k), v, key_padding_mask=mask, hash_qk=(q, k))
    expected = reference_attention(attn, rope_twin(q), rope_twin(k), v, mask, hash_qk=(q, k))
    assert relative(out, expected) < 1e-9
    rotated = attn(rope(q), rope(k), v, key_padding_mask=mask)
    assert relative(rotated, expected) > 1e-3


def support(attn, q, k, hash_qk=None) -> torch.Tensor:
    """(B, H, L, L) bool: which keys each query's output draws on. The values are one-hot
    position indicators, so out[..., i, j] > 0 exactly where key j weighs in."""
    batch, heads, length, _ = q.shape
    v = torch.eye(length, dtype=q.dtype).expand(batch, heads, length, length)
    return attn(q, k, v, hash_qk=hash_qk) > 0


def test_lsh_buckets_come_from_the_content_not_the_rotation():
    """With rope the exact support is the one the same content has without rope; hashing the
    rotated vectors instead would give another one. (scatterbrain's LSH part: the dense
    reference test above, whose twin draws buckets from the content.)"""
    attn = build("lsh")
    q, k, _ = qkv(64)
    plain = support(attn, q, k)
    assert torch.equal(support(attn, rope(q), rope(k), hash_qk=(q, k)), plain)
    assert not torch.equal(support(attn, rope(q), rope(k)), plain)


def test_the_model_rotates_what_the_kernel_sees_and_hashes_the_content():
    torch.manual_seed(0)
    attention = AttentionConfig(kind="lsh", n_hashes=2, bucket_size=3, n_buckets=4)
    cfg = DecoderConfig(n_layers=1, n_heads=2, d_model=16, d_ff=32, dropout=0.0,
                      positions="rope", attention=attention)  # fmt: skip
    model = TransformerLM(cfg, vocab_size=30, max_len=8).eval()
    seen = {}

    def hook(_module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    layer = model.blocks[0].attn
    layer.kernel.register_forward_pre_hook(hook, with_kwargs=True)
    tokens = torch.randint(0, 30, (1, 20))  # longer than max_len: rope has no table
    with torch.no_grad():
        model(tokens)
        x = model.blocks[0].ln1(model.tok_emb(tokens))
        q, k, _ = layer.qkv(x).view(1, 20, 3, 2, 8).permute(2, 0, 3, 1, 4)
    got_q, got_k, _ = seen["args"]
    assert relative(got_q, rope_twin(q)) < 1e-6 and relative(got_k, rope_twin(k)) < 1e-6
    hash_q, hash_k = seen["kwargs"]["hash_qk"]
    assert torch.equal(hash_q, q) and torch.equal(hash_k, k)
    assert not any("pos" in name for name, _ in model.named_parameters())
