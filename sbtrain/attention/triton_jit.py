"""The Triton kernels behind `triton_kernels.py` (which documents the algorithm): six passes.

Imported only where triton is installed. Every kernel works on one (batch, head) pair per program
along one grid axis; tiles are BLOCK rows (queries or keys) x BLOCK_D (head dim, padded) or
BLOCK_F (half the features, padded). Index conventions:

- positions: rows `r` of query block c are i = c BLOCK + r, columns `t` of key block b are
  j = b BLOCK + t; rows at or past L are loaded as zeros and never stored.
- features: a state holds m = 2 MH rows, the `+W x` half first, then the `-W x` half; the
  kernels keep the halves as two (…, BLOCK_F) tiles. Padded features have log-feature -inf.
- states, scales, per-row statistics: fp32, contiguous, (BH, N, m, D), (BH, N, m), (BH, N BLOCK).
"""

from __future__ import annotations

import triton
import triton.language as tl

# The log-scale of "nothing yet": finite, so EMPTY - EMPTY is 0 rather than NaN.
EMPTY = -1.0e30


# ---------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _load_rows(base, stride_l, start, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK, BLOCK_D) rows start.. of a (L, D) matrix with row stride `stride_l`, zero-padded,
    converted to fp32."""
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < L) & (cols[None, :] < D)
    x = tl.load(base + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_rows(base, stride_l, start, L, D, x, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < L) & (cols[None, :] < D)
    tl.store(
        base + rows[:, None] * stride_l + cols[None, :], x.to(base.dtype.element_ty), mask=mask
    )


@triton.jit
def _operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to the dot-operand dtype (the inputs' dtype); UPCAST (interpreter only, whose
    bf16 dot is unusable) keeps the rounding but hands fp32 to the dot."""
    x = x.to(DTYPE)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_projection(w_ptr, MH, D, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """W: (BLOCK_F, BLOCK_D) fp32, zero-padded."""
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_D)
    mask = (f[:, None] < MH) & (d[None, :] < D)
    return tl.load(w_ptr + f[:, None] * D + d[None, :], mask=mask, other=0.0)


@triton.jit
def _log_features(x, w, sqrt_tau, log_norm, MH, BLOCK_F: tl.constexpr):
    """log phi(x) for x (BLOCK, BLOCK_D) fp32: the two halves (BLOCK, BLOCK_F) and x' = tau**.5 x.

    log phi(x) = [W x', -W x'] - |x'|²/2 - log_norm; padded features get -inf. The projection
    runs as 3-pass tf32 (≈ fp32): feature logits feed exp, where 1e-3 relative errors would show.
    """
    xs = x * sqrt_tau
    proj = tl.dot(xs, tl.trans(w), input_precision="tf32x3")
    offset = 0.5 * tl.sum(xs * xs, 1) + log_norm
    real = (tl.arange(0, BLOCK_F) < MH)[None, :]
    plus = tl.where(real, proj - offset[:, None], float("-inf"))
    minus = tl.where(real, -proj - offset[:, None], float("-inf"))
    return plus, minus, xs


@triton.jit
def _input_grad(d_plus, d_minus, xs, w, sqrt_tau):
    """Gradient w.r.t. x from gradients w.r.t. both halves of log phi(x) (fp32 (BLOCK, BLOCK_D)):
    d log phi_f / d x' = ±W_f - x'."""
    dxs = tl.dot(d_plus - d_minus, w, input_precision="tf32x3")
    dxs -= xs * (tl.sum(d_plus, 1) + tl.sum(d_minus, 1))[:, None]
    return dxs * sqrt_tau


@triton.jit
def _load_scale(scale_ptr, idx, MH, BLOCK_F: tl.constexpr):
    """Per-feature log-scales (R_plus, R_minus) of state `idx`; 0 for padded features."""
    f = tl.arange(0, BLOCK_F)
    row = scale_ptr + idx * 2 * MH
    plus = tl.load(row + f, mask=f < MH, other=0.0)
    minus = tl.load(row + MH + f, mask=f < MH, other=0.0)
    return plus, minus


@triton.jit
def _load_state(state_ptr, ones_ptr, idx, MH, D, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """State `idx`: numerator halves (BLOCK_F, BLOCK_D) and denominator halves (BLOCK_F,)."""
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_D)
    mask = (f[:, None] < MH) & (d[None, :] < D)
    tile = state_ptr + idx * 2 * MH * D + f[:, None] * D + d[None, :]
    plus = tl.load(tile, mask=mask, other=0.0)
    minus = tl.load(tile + MH * D, mask=mask, other=0.0)
    ones = ones_ptr + idx * 2 * MH + f
    plus1 = tl.load(ones, mask=f < MH, other=0.0)
    minus1 = tl.load(ones + MH, mask=f < MH, other=0.0)
    return plus, minus, plus1, minus1


@triton.jit
def _store_state(
    state_ptr,
    ones_ptr,
    idx,
    MH,
    D,
    plus,
    minus,
    plus1,
    minus1,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_D)
    mask = (f[:, None] < MH) & (d[None, :] < D)
    tile = state_ptr + idx * 2 * MH * D + f[:, None] * D + d[None, :]
    tl.store(tile, plus, mask=mask)
    tl.store(tile + MH * D, minus, mask=mask)
    ones = ones_ptr + idx * 2 * MH + f
    tl.store(ones, plus1, mask=f < MH)
    tl.store(ones + MH, minus1, mask=f < MH)


@triton.jit
def _row_max(plus, minus):
    return tl.maximum(tl.max(plus, 1), tl.max(minus, 1))


@triton.jit
def _intra_block_weights(lq_plus, lq_minus, lk_plus, lk_minus, causal):
    """Performer's diagonal block, where no per-feature key scale may be used (it would include
    keys after the query). Each key is scaled by its own max over features s_j, each query by its
    own max qtop_i and by reach_i = max_{j <= i} s_j, so every factor is <= 1 and only keys j <= i
    set a query's scale. Returns query features, key features (both halves, <= 1),
    exp(s_j - reach_i) on the causal triangle (0 elsewhere), and the log-scale qtop_i + reach_i."""
    key_top = _row_max(lk_plus, lk_minus)
    query_top = _row_max(lq_plus, lq_minus)
    reach = tl.max(tl.where(causal, key_top[None, :], float("-inf")), 1)
    decay = tl.exp(tl.where(causal, key_top[None, :] - reach[:, None], float("-inf")))
    return (
        tl.exp(lq_plus - query_top[:, None]),
        tl.exp(lq_minus - query_top[:, None]),
        tl.exp(lk_plus - key_top[:, None]),
        tl.exp(lk_minus - key_top[:, None]),
        decay,
        query_top + reach,
    )


@triton.jit
def _feature_dot(a_plus, a_minus, b_plus, b_minus, PREC: tl.constexpr):
    """(BLOCK, BLOCK) products a_i . b_j over both halves of the features."""
    out = tl.dot(a_plus, tl.trans(b_plus), input_precision=PREC)
    return tl.dot(a_minus, tl.trans(b_minus), out, input_precision=PREC)


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def key_block_sums_kernel(
    k_ptr, v_ptr, w_ptr, state_ptr, ones_ptr, scale_ptr,
    stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    H, L, D, MH, N, sqrt_tau, log_norm,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Pass 1, grid (N, BH): per key block b, the block max of log phi(k) (per feature) and
    Σ_j exp(log phi(k_j) - max) [v_j, 1]: written as states[b] (later scanned in place)."""
    blk = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    start = blk * BLOCK
    k = _load_rows(
        k_ptr + (bh // H) * stride_kb + (bh % H) * stride_kh, stride_kl, start, L, D, BLOCK, BLOCK_D
    )
    v = _load_rows(
        v_ptr + (bh // H) * stride_vb + (bh % H) * stride_vh, stride_vl, start, L, D, BLOCK, BLOCK_D
    )
    w = _load_projection(w_ptr, MH, D, BLOCK_F, BLOCK_D)
    lk_plus, lk_minus, _ = _log_features(k, w, sqrt_tau, log_norm, MH, BLOCK_F)
    valid = (start + tl.arange(0, BLOCK) < L)[:, None]
    lk_plus = tl.where(valid, lk_plus, float("-inf"))
    lk_minus = tl.where(valid, lk_minus, float("-inf"))
    real = tl.arange(0, BLOCK_F) < MH
    top_plus = tl.where(real, tl.max(lk_plus, 0), 0.0)
    top_minus = tl.where(real, tl.max(lk_minus, 0), 0.0)
    w_plus = tl.exp(lk_plus - top_plus[None, :])  # (BLOCK, BLOCK_F), <= 1, 0 past L
    w_minus = tl.exp(lk_minus - top_minus[None, :])
    sum_plus = tl.dot(tl.trans(w_plus), v, input_precision=PREC)
    sum_minus = tl.dot(tl.trans(w_minus), v, input_precision=PREC)
    idx = bh * N + blk
    _store_state(
        state_ptr,
        ones_ptr,
        idx,
        MH,
        D,
        sum_plus,
        sum_minus,
        tl.sum(w_plus, 0),
        tl.sum(w_minus, 0),
        BLOCK_F,
        BLOCK_D,
    )
    f = tl.arange(0, BLOCK_F)
    tl.store(scale_ptr + idx * 2 * MH + f, top_plus, mask=real)
    tl.store(scale_ptr + idx * 2 * MH + MH + f, top_minus, mask=real)


@triton.jit
def state_scan_kernel(
    state_ptr, ones_ptr, scale_ptr, M, D, N,
    AFTER: tl.constexpr, BLOCK_FS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 2, grid (BH, cdiv(m, BLOCK_FS)): in place, block sums -> prefix states.

    Reads block b's sum S_b and max mk_b; keeps R_b = max(R_{b-1}, mk_b) (a running max: only
    blocks <= b) and writes the state of blocks < b (AFTER False) or <= b (AFTER True) on the
    scale R_b, and R_b itself. Loads do not depend on the carry, so they pipeline."""
    bh = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_FS + tl.arange(0, BLOCK_FS)
    d = tl.arange(0, BLOCK_D)
    real = f < M
    mask = real[:, None] & (d[None, :] < D)
    carry = tl.zeros((BLOCK_FS, BLOCK_D), tl.float32)
    carry1 = tl.zeros((BLOCK_FS,), tl.float32)
    previous = tl.full((BLOCK_FS,), float("-inf"), tl.float32)
    for blk in range(N):
        idx = bh * N + blk
        tile = state_ptr + idx * M * D + f[:, None] * D + d[None, :]
        block_max = tl.load(scale_ptr + idx * M + f, mask=real, other=0.0)
        block_sum = tl.load(tile, mask=mask, other=0.0)
        block_sum1 = tl.load(ones_ptr + idx * M + f, mask=real, other=0.0)
        running = tl.maximum(previous, block_max)
        decay = tl.exp(previous - running)
        carry *= decay[:, None]
        carry1 *= decay
        growth = tl.exp(block_max - running)
        if AFTER:
            carry += block_sum * growth[:, None]
            carry1 += block_sum1 * growth
        tl.store(tile, carry, mask=mask)
        tl.store(ones_ptr + idx * M + f, carry1, mask=real)
        tl.store(scale_ptr + idx * M + f, running, mask=real)
        if not AFTER:
            carry += block_sum * growth[:, None]
            carry1 += block_sum1 * growth
        previous = running


@triton.jit
def forward_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, state_ptr, ones_ptr, scale_ptr, out_ptr, top_ptr, lse_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, L, D, MH, N, tau, sqrt_tau, log_norm, WINDOW,
    N_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Pass 3, grid (N, BH): outputs of query block c, and per row the log-scale `top` and
    log-normaliser `lse` for the backward.

    N_W = WINDOW / BLOCK > 0 (scatterbrain): the state before key block k0 = c - N_W, the near
    block k0 (features where j <= i - WINDOW, exact scores elsewhere), then exact blocks
    k0+1..c, flash style. N_W = 0 (performer): the state after block c-1 and block c's own
    causal feature products. Everything meets on one per-row log-scale `top`."""
    blk = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    batch, head = bh // H, bh % H
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    start = blk * BLOCK
    i = start + tl.arange(0, BLOCK)
    q = _load_rows(q_base, stride_ql, start, L, D, BLOCK, BLOCK_D)
    w = _load_projection(w_ptr, MH, D, BLOCK_F, BLOCK_D)
    lq_plus, lq_minus, _ = _log_features(q, w, sqrt_tau, log_norm, MH, BLOCK_F)
    q_op = _operand(q, DTYPE, UPCAST)
    acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    denom = tl.zeros((BLOCK,), tl.float32)
    if N_W == 0:
        # state after block c-1, on R_{c-1}; block 0 has none (logits -inf)
        idx = bh * N + tl.maximum(blk - 1, 0)
        r_plus, r_minus = _load_scale(scale_ptr, idx, MH, BLOCK_F)
        logit_plus = tl.where(blk > 0, lq_plus + r_plus[None, :], float("-inf"))
        logit_minus = tl.where(blk > 0, lq_minus + r_minus[None, :], float("-inf"))
        k = _load_rows(k_base, stride_kl, start, L, D, BLOCK, BLOCK_D)
        v = _load_rows(v_base, stride_vl, start, L, D, BLOCK, BLOCK_D)
        lk_plus, lk_minus, _ = _log_features(k, w, sqrt_tau, log_norm, MH, BLOCK_F)
        causal = i[None, :] <= i[:, None]
        qf_plus, qf_minus, kf_plus, kf_minus, decay, intra_top = _intra_block_weights(
            lq_plus, lq_minus, lk_plus, lk_minus, causal
        )
        top = tl.maximum(_row_max(logit_plus, logit_minus), intra_top)
        qw_plus = tl.exp(logit_plus - top[:, None])
        qw_minus = tl.exp(logit_minus - top[:, None])
        s_plus, s_minus, s1_plus, s1_minus = _load_state(
            state_ptr, ones_ptr, idx, MH, D, BLOCK_F, BLOCK_D
        )
        acc = tl.dot(qw_plus, s_plus, acc, input_precision=PREC)
        acc = tl.dot(qw_minus, s_minus, acc, input_precision=PREC)
        denom += tl.sum(qw_plus * s1_plus[None, :], 1) + tl.sum(qw_minus * s1_minus[None, :], 1)
        products = _feature_dot(qf_plus, qf_minus, kf_plus, kf_minus, PREC)
        p = products * decay * tl.exp(intra_top - top)[:, None]
        acc = tl.dot(
            _operand(p, DTYPE, UPCAST), _operand(v, DTYPE, UPCAST), acc, input_precision=PREC
        )
        denom += tl.sum(p, 1)
    else:
        top = tl.full((BLOCK,), EMPTY, tl.float32)
        k0 = blk - N_W
        if k0 >= 0:
            idx = bh * N + k0
            r_plus, r_minus = _load_scale(scale_ptr, idx, MH, BLOCK_F)
            logit_plus = lq_plus + r_plus[None, :]
            logit_minus = lq_minus + r_minus[None, :]
            k = _load_rows(k_base, stride_kl, k0 * BLOCK, L, D, BLOCK, BLOCK_D)
            v = _load_rows(v_base, stride_vl, k0 * BLOCK, L, D, BLOCK, BLOCK_D)
            j = k0 * BLOCK + tl.arange(0, BLOCK)
            exact = j[None, :] > i[:, None] - WINDOW  # every j < i here: the rest is low-rank
            scores = tl.dot(q_op, tl.trans(_operand(k, DTYPE, UPCAST)), input_precision=PREC)
            scores = tl.where(exact, scores * tau, float("-inf"))
            top = tl.maximum(_row_max(logit_plus, logit_minus), tl.max(scores, 1))
            qw_plus = tl.exp(logit_plus - top[:, None])
            qw_minus = tl.exp(logit_minus - top[:, None])
            s_plus, s_minus, s1_plus, s1_minus = _load_state(
                state_ptr, ones_ptr, idx, MH, D, BLOCK_F, BLOCK_D
            )
            acc = tl.dot(qw_plus, s_plus, acc, input_precision=PREC)
            acc = tl.dot(qw_minus, s_minus, acc, input_precision=PREC)
            denom += tl.sum(qw_plus * s1_plus[None, :], 1)
            denom += tl.sum(qw_minus * s1_minus[None, :], 1)
            lk_plus, lk_minus, _ = _log_features(k, w, sqrt_tau, log_norm, MH, BLOCK_F)
            kw_plus = tl.exp(lk_plus - r_plus[None, :])
            kw_minus = tl.exp(lk_minus - r_minus[None, :])
            near = _feature_dot(qw_plus, qw_minus, kw_plus, kw_minus, PREC)
            p = tl.where(exact, tl.exp(scores - top[:, None]), near)
            acc = tl.dot(
                _operand(p, DTYPE, UPCAST), _operand(v, DTYPE, UPCAST), acc, input_precision=PREC
            )
            denom += tl.sum(p, 1)
        for kb in range(tl.maximum(k0 + 1, 0), blk + 1):
            k = _load_rows(k_base, stride_kl, kb * BLOCK, L, D, BLOCK, BLOCK_D)
            v = _load_rows(v_base, stride_vl, kb * BLOCK, L, D, BLOCK, BLOCK_D)
            j = kb * BLOCK + tl.arange(0, BLOCK)
            seen = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - WINDOW)
            scores = tl.dot(q_op, tl.trans(_operand(k, DTYPE, UPCAST)), input_precision=PREC)
            scores = tl.where(seen, scores * tau, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            decay = tl.exp(top - new_top)
            p = tl.exp(scores - new_top[:, None])
            acc = tl.dot(
                _operand(p, DTYPE, UPCAST),
                _operand(v, DTYPE, UPCAST),
                acc * decay[:, None],
                input_precision=PREC,
            )
            denom = denom * decay + tl.sum(p, 1)
            top = new_top
    out_base = out_ptr + bh * L * D
    _store_rows(out_base, D, start, L, D, acc / denom[:, None], BLOCK, BLOCK_D)
    tl.store(top_ptr + bh * N * BLOCK + i, top)
    tl.store(lse_ptr + bh * N * BLOCK + i, top + tl.log(denom))


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def backward_query_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, w_ptr, state_ptr, ones_ptr, scale_ptr, top_ptr, lse_ptr,
    dq_ptr, delta_ptr, y_ptr, y1_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
    stride_db, stride_dh, stride_dl,
    H, L, D, MH, N, tau, sqrt_tau, log_norm, WINDOW,
    N_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Backward pass 1, grid (N, BH), query block c: dq, delta_i = dO_i . O_i, and the block's
    contribution Y to the reverse scan: Σ_i exp(lq_i + R - lse_i) [dO_i, -delta_i], stored at the
    state index the block read in the forward."""
    blk = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    batch, head = bh // H, bh % H
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    start = blk * BLOCK
    i = start + tl.arange(0, BLOCK)
    valid = i < L
    q = _load_rows(
        q_ptr + batch * stride_qb + head * stride_qh, stride_ql, start, L, D, BLOCK, BLOCK_D
    )
    do = _load_rows(
        do_ptr + batch * stride_db + head * stride_dh, stride_dl, start, L, D, BLOCK, BLOCK_D
    )
    o = _load_rows(
        o_ptr + batch * stride_ob + head * stride_oh, stride_ol, start, L, D, BLOCK, BLOCK_D
    )
    delta = tl.sum(do * o, 1)
    tl.store(delta_ptr + bh * N * BLOCK + i, delta)
    top = tl.load(top_ptr + bh * N * BLOCK + i)
    lse = tl.load(lse_ptr + bh * N * BLOCK + i, mask=valid, other=float("inf"))
    inv_denom = tl.exp(top - lse)  # 1 / (normaliser on the scale `top`); 0 past L
    w = _load_projection(w_ptr, MH, D, BLOCK_F, BLOCK_D)
    lq_plus, lq_minus, xs = _log_features(q, w, sqrt_tau, log_norm, MH, BLOCK_F)
    q_op = _operand(q, DTYPE, UPCAST)
    do_op = _operand(do, DTYPE, UPCAST)
    dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)  # from exact scores, times tau at the end
    dl_plus = tl.zeros((BLOCK, BLOCK_F), tl.float32)  # d loss / d log phi(q)
    dl_minus = tl.zeros((BLOCK, BLOCK_F), tl.float32)
    idx = tl.maximum(blk - 1, 0) if N_W == 0 else blk - N_W
    if idx >= 0:
        state = bh * N + idx
        r_plus, r_minus = _load_scale(scale_ptr, state, MH, BLOCK_F)
        qw_plus = tl.exp(lq_plus + r_plus[None, :] - top[:, None])
        qw_minus = tl.exp(lq_minus + r_minus[None, :] - top[:, None])
        if N_W == 0:
            qw_plus = tl.where(blk > 0, qw_plus, 0.0)
            qw_minus = tl.where(blk > 0, qw_minus, 0.0)
        # Q_i = phi(q_i) exp(R) / normaliser, 0 past L
        big_q_plus = qw_plus * inv_denom[:, None]
        big_q_minus = qw_minus * inv_denom[:, None]
        s_plus, s_minus, s1_plus, s1_minus = _load_state(
            state_ptr, ones_ptr, state, MH, D, BLOCK_F, BLOCK_D
        )
        # dA_ij = (dO_i . v_j - delta_i) / normaliser_i  =>  d log phi(q_i) = Q_i * (T g_i)
        g_plus = tl.dot(do, tl.trans(s_plus), input_precision=PREC)
        g_minus = tl.dot(do, tl.trans(s_minus), input_precision=PREC)
        dl_plus += big_q_plus * (g_plus - delta[:, None] * s1_plus[None, :])
        dl_minus += big_q_minus * (g_minus - delta[:, None] * s1_minus[None, :])
        write = blk > 0 if N_W == 0 else True
        if write:
            y_plus = tl.dot(tl.trans(big_q_plus), do, input_precision=PREC)
            y_minus = tl.dot(tl.trans(big_q_minus), do, input_precision=PREC)
            y1_plus = -tl.sum(big_q_plus * delta[:, None], 0)
            y1_minus = -tl.sum(big_q_minus * delta[:, None], 0)
            _store_state(
                y_ptr, y1_ptr, state, MH, D, y_plus, y_minus, y1_plus, y1_minus, BLOCK_F, BLOCK_D
            )
        if N_W > 0:
            # the near block k0: exact where j > i - WINDOW, features elsewhere
            k = _load_rows(k_base, stride_kl, idx * BLOCK, L, D, BLOCK, BLOCK_D)
            v = _load_rows(v_base, stride_vl, idx * BLOCK, L, D, BLOCK, BLOCK_D)
            j = idx * BLOCK + tl.arange(0, BLOCK)
            exact = j[None, :] > i[:, None] - WINDOW
            k_op = _operand(k, DTYPE, UPCAST)
            scores = tl.dot(q_op, tl.trans(k_op), input_precision=PREC) * tau
            p = tl.where(exact, tl.exp(scores - lse[:, None]), 0.0)
            dp = tl.dot(do_op, tl.trans(_operand(v, DTYPE, UPCAST)), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(_operand(ds, DTYPE, UPCAST), k_op, dq, input_precision=PREC)
            da = tl.where(exact, 0.0, (dp - delta[:, None]) * inv_denom[:, None])
            lk_plus, lk_minus, _ = _log_features(k, w, sqrt_tau, log_norm, MH, BLOCK_F)
            kw_plus = tl.exp(lk_plus - r_plus[None, :])
            kw_minus = tl.exp(lk_minus - r_minus[None, :])
            dl_plus += qw_plus * tl.dot(da, kw_plus, input_precision=PREC)
            dl_minus += qw_minus * tl.dot(da, kw_minus, input_precision=PREC)
    if N_W == 0:
        k = _load_rows(k_base, stride_kl, start, L, D, BLOCK, BLOCK_D)
        v = _load_rows(v_base, stride_vl, start, L, D, BLOCK, BLOCK_D)
        lk_plus, lk_minus, _ = _log_features(k, w, sqrt_tau, log_norm, MH, BLOCK_F)
        causal = i[None, :] <= i[:, None]
        qf_plus, qf_minus, kf_plus, kf_minus, decay, intra_top = _intra_block_weights(
            lq_plus, lq_minus, lk_plus, lk_minus, causal
        )
        dp = tl.dot(do_op, tl.trans(_operand(v, DTYPE, UPCAST)), input_precision=PREC)
        weight = decay * (tl.exp(intra_top - top) * inv_denom)[:, None]
        z = (dp - delta[:, None]) * weight
        dl_plus += qf_plus * tl.dot(z, kf_plus, input_precision=PREC)
        dl_minus += qf_minus * tl.dot(z, kf_minus, input_precision=PREC)
    else:
        for kb in range(tl.maximum(blk - N_W + 1, 0), blk + 1):
            k = _load_rows(k_base, stride_kl, kb * BLOCK, L, D, BLOCK, BLOCK_D)
            v = _load_rows(v_base, stride_vl, kb * BLOCK, L, D, BLOCK, BLOCK_D)
            j = kb * BLOCK + tl.arange(0, BLOCK)
            seen = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - WINDOW)
            k_op = _operand(k, DTYPE, UPCAST)
            scores = tl.dot(q_op, tl.trans(k_op), input_precision=PREC) * tau
            p = tl.where(seen, tl.exp(scores - lse[:, None]), 0.0)
            dp = tl.dot(do_op, tl.trans(_operand(v, DTYPE, UPCAST)), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(_operand(ds, DTYPE, UPCAST), k_op, dq, input_precision=PREC)
    dq = dq * tau + _input_grad(dl_plus, dl_minus, xs, w, sqrt_tau)
    _store_rows(dq_ptr + bh * L * D, D, start, L, D, dq, BLOCK, BLOCK_D)


@triton.jit
def reverse_scan_kernel(
    y_ptr, y1_ptr, scale_ptr, M, D, N, SHIFT,
    AFTER: tl.constexpr, BLOCK_FS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Backward pass 2, grid (BH, cdiv(m, BLOCK_FS)): in place, per-state-index query sums Y_b
    -> V_b = Σ_{b' > b} (AFTER False) or Σ_{b' >= b} (AFTER True) of Y_b' exp(R_b - R_b'), the
    mirror of `state_scan_kernel`; factors exp(R_b - R_b') <= 1 since R only grows. Index b has
    a Y only if its consumer, query block b + SHIFT, exists."""
    bh = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_FS + tl.arange(0, BLOCK_FS)
    d = tl.arange(0, BLOCK_D)
    real = f < M
    mask = real[:, None] & (d[None, :] < D)
    carry = tl.zeros((BLOCK_FS, BLOCK_D), tl.float32)
    carry1 = tl.zeros((BLOCK_FS,), tl.float32)
    later = tl.load(scale_ptr + (bh * N + N - 1) * M + f, mask=real, other=0.0)
    for step in range(N):
        blk = N - 1 - step
        idx = bh * N + blk
        tile = y_ptr + idx * M * D + f[:, None] * D + d[None, :]
        has = blk + SHIFT < N
        block_y = tl.load(tile, mask=mask & has, other=0.0)
        block_y1 = tl.load(y1_ptr + idx * M + f, mask=real & has, other=0.0)
        running = tl.load(scale_ptr + idx * M + f, mask=real, other=0.0)
        decay = tl.exp(running - later)
        carry *= decay[:, None]
        carry1 *= decay
        if AFTER:
            carry += block_y
            carry1 += block_y1
        tl.store(tile, carry, mask=mask)
        tl.store(y1_ptr + idx * M + f, carry1, mask=real)
        if not AFTER:
            carry += block_y
            carry1 += block_y1
        later = running


@triton.jit
def backward_key_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, vstate_ptr, vones_ptr, scale_ptr, top_ptr, lse_ptr,
    delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_db, stride_dh, stride_dl,
    H, L, D, MH, N, tau, sqrt_tau, log_norm, WINDOW,
    N_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Backward pass 3, grid (N, BH), key block b: dk and dv from the suffix state V_b (every
    later query that sees block b through the state), the near (or diagonal) block's features,
    and the exact scores of the query blocks whose window covers block b."""
    blk = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    batch, head = bh // H, bh % H
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    do_base = do_ptr + batch * stride_db + head * stride_dh
    start = blk * BLOCK
    j = start + tl.arange(0, BLOCK)
    k = _load_rows(
        k_ptr + batch * stride_kb + head * stride_kh, stride_kl, start, L, D, BLOCK, BLOCK_D
    )
    v = _load_rows(
        v_ptr + batch * stride_vb + head * stride_vh, stride_vl, start, L, D, BLOCK, BLOCK_D
    )
    k_op = _operand(k, DTYPE, UPCAST)
    v_op = _operand(v, DTYPE, UPCAST)
    w = _load_projection(w_ptr, MH, D, BLOCK_F, BLOCK_D)
    lk_plus, lk_minus, xs = _log_features(k, w, sqrt_tau, log_norm, MH, BLOCK_F)
    state = bh * N + blk
    r_plus, r_minus = _load_scale(scale_ptr, state, MH, BLOCK_F)
    kw_plus = tl.exp(lk_plus - r_plus[None, :])  # <= 1: R_b covers block b
    kw_minus = tl.exp(lk_minus - r_minus[None, :])
    # later queries through the state: d log phi(k_j) = kw_j * (V_b [v_j, 1]), dv_j = V_b^T kw_j
    u_plus, u_minus, u1_plus, u1_minus = _load_state(
        vstate_ptr, vones_ptr, state, MH, D, BLOCK_F, BLOCK_D
    )
    dl_plus = kw_plus * (tl.dot(v, tl.trans(u_plus), input_precision=PREC) + u1_plus[None, :])
    dl_minus = kw_minus * (tl.dot(v, tl.trans(u_minus), input_precision=PREC) + u1_minus[None, :])
    dv = tl.dot(kw_plus, u_plus, input_precision=PREC)
    dv = tl.dot(kw_minus, u_minus, dv, input_precision=PREC)
    dk = tl.zeros((BLOCK, BLOCK_D), tl.float32)  # from exact scores, times tau at the end
    if N_W == 0:
        # the diagonal block: queries i >= j of block b
        i = j
        q = _load_rows(q_base, stride_ql, start, L, D, BLOCK, BLOCK_D)
        do = _load_rows(do_base, stride_dl, start, L, D, BLOCK, BLOCK_D)
        delta = tl.load(delta_ptr + bh * N * BLOCK + i)
        top = tl.load(top_ptr + bh * N * BLOCK + i)
        lse = tl.load(lse_ptr + bh * N * BLOCK + i, mask=i < L, other=float("inf"))
        lq_plus, lq_minus, _ = _log_features(q, w, sqrt_tau, log_norm, MH, BLOCK_F)
        causal = j[None, :] <= i[:, None]
        qf_plus, qf_minus, kf_plus, kf_minus, decay, intra_top = _intra_block_weights(
            lq_plus, lq_minus, lk_plus, lk_minus, causal
        )
        weight = decay * tl.exp(intra_top - lse)[:, None]
        p = _feature_dot(qf_plus, qf_minus, kf_plus, kf_minus, PREC) * weight
        do_op = _operand(do, DTYPE, UPCAST)
        dv = tl.dot(tl.trans(_operand(p, DTYPE, UPCAST)), do_op, dv, input_precision=PREC)
        dp = tl.dot(do_op, tl.trans(v_op), input_precision=PREC)
        z = (dp - delta[:, None]) * weight
        dl_plus += kf_plus * tl.dot(tl.trans(z), qf_plus, input_precision=PREC)
        dl_minus += kf_minus * tl.dot(tl.trans(z), qf_minus, input_precision=PREC)
    else:
        for qb in range(blk, tl.minimum(blk + N_W, N)):
            i = qb * BLOCK + tl.arange(0, BLOCK)
            q_op = _operand(
                _load_rows(q_base, stride_ql, qb * BLOCK, L, D, BLOCK, BLOCK_D), DTYPE, UPCAST
            )
            do_op = _operand(
                _load_rows(do_base, stride_dl, qb * BLOCK, L, D, BLOCK, BLOCK_D), DTYPE, UPCAST
            )
            delta = tl.load(delta_ptr + bh * N * BLOCK + i)
            lse = tl.load(lse_ptr + bh * N * BLOCK + i, mask=i < L, other=float("inf"))
            seen = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - WINDOW)
            scores = tl.dot(q_op, tl.trans(k_op), input_precision=PREC) * tau
            p = tl.where(seen, tl.exp(scores - lse[:, None]), 0.0)
            dp = tl.dot(do_op, tl.trans(v_op), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dv = tl.dot(tl.trans(_operand(p, DTYPE, UPCAST)), do_op, dv, input_precision=PREC)
            dk = tl.dot(tl.trans(_operand(ds, DTYPE, UPCAST)), q_op, dk, input_precision=PREC)
        qb = blk + N_W
        if qb < N:
            # the block whose near block is b: exact where j > i - WINDOW, features elsewhere
            i = qb * BLOCK + tl.arange(0, BLOCK)
            q = _load_rows(q_base, stride_ql, qb * BLOCK, L, D, BLOCK, BLOCK_D)
            do = _load_rows(do_base, stride_dl, qb * BLOCK, L, D, BLOCK, BLOCK_D)
            q_op = _operand(q, DTYPE, UPCAST)
            do_op = _operand(do, DTYPE, UPCAST)
            delta = tl.load(delta_ptr + bh * N * BLOCK + i)
            top = tl.load(top_ptr + bh * N * BLOCK + i)
            lse = tl.load(lse_ptr + bh * N * BLOCK + i, mask=i < L, other=float("inf"))
            inv_denom = tl.exp(top - lse)
            lq_plus, lq_minus, _ = _log_features(q, w, sqrt_tau, log_norm, MH, BLOCK_F)
            qw_plus = tl.exp(lq_plus + r_plus[None, :] - top[:, None])
            qw_minus = tl.exp(lq_minus + r_minus[None, :] - top[:, None])
            exact = j[None, :] > i[:, None] - WINDOW
            scores = tl.dot(q_op, tl.trans(k_op), input_precision=PREC) * tau
            near = _feature_dot(qw_plus, qw_minus, kw_plus, kw_minus, PREC)
            p = tl.where(exact, tl.exp(scores - lse[:, None]), near * inv_denom[:, None])
            dp = tl.dot(do_op, tl.trans(v_op), input_precision=PREC)
            ds = tl.where(exact, p * (dp - delta[:, None]), 0.0)
            da = tl.where(exact, 0.0, (dp - delta[:, None]) * inv_denom[:, None])
            dv = tl.dot(tl.trans(_operand(p, DTYPE, UPCAST)), do_op, dv, input_precision=PREC)
            dk = tl.dot(tl.trans(_operand(ds, DTYPE, UPCAST)), q_op, dk, input_precision=PREC)
            dl_plus += kw_plus * tl.dot(tl.trans(da), qw_plus, input_precision=PREC)
            dl_minus += kw_minus * tl.dot(tl.trans(da), qw_minus, input_precision=PREC)
    dk = dk * tau + _input_grad(dl_plus, dl_minus, xs, w, sqrt_tau)
    _store_rows(dk_ptr + bh * L * D, D, start, L, D, dk, BLOCK, BLOCK_D)
    _store_rows(dv_ptr + bh * L * D, D, start, L, D, dv, BLOCK, BLOCK_D)
