"""The plain GPT loop behind `sbtrain bench gpt` (the yardstick of `bench train`), at tiny size."""

from __future__ import annotations

from sbtrain.bench.gpt import bench_gpt


def test_plain_gpt_has_the_wt103_full_shape_and_trains():
    vocab, length, layers, d, ff = 300, 32, 2, 64, 256
    result = bench_gpt(vocab, length, batch=2, layers=layers, d_model=d, heads=2, d_ff=ff,
                       steps=1, warmup=1, device="cpu")  # fmt: skip
    row = result["row"]
    # tied embedding + positions + per block: 2 LayerNorms, qkv, proj, 2 MLP layers; final norm
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
    assert row["params"] == vocab * d + length * d + layers * block + 2 * d
    assert row["tokens_per_s"] > 0 and row["batch"] * row["length"] == 2 * length
