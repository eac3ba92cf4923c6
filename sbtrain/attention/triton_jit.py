"""The Triton kernels behind `triton_kernels.py` (which documents the algorithm): six passes.

Imported only where triton is installed. Every kernel works on one (batch, head) pair per program
along one grid axis; tiles are BLOCK rows (queries or keys) x BLOCK_D (head dim D, padded to a
power of 2) or BLOCK_F (MH = m/2 features, padded). Conventions:

- positions: rows of query block c are i = c BLOCK + r, columns of key block b are
  j = b BLOCK + t; rows at or past L are loaded as zeros and never stored.
- features: log phi(x) = [proj, -proj] - offset with proj = x' W^T and offset = |x'|²/2 +
  log(m)/2. Kernels keep `proj` and `offset` and derive one half at a time (`_half`, HALF 0 is
  +W x', HALF 1 is -W x') in a static two-step loop, so only one half's tiles are ever live.
  Padded features have log-feature -inf.
- states (BH, N, m, D) with the + half's features (rows 0..MH-1) first, their denominators
  (BH, N, m), scales R (BH, N, m), per-row statistics (BH, N BLOCK): fp32, contiguous.
- dots: exact scores and P @ V take the inputs' dtype (DTYPE); every dot with a feature or state
  operand takes fp32 operands with PREC (tf32 for bf16/fp16 inputs, 3-pass tf32 for fp32):
  bf16-rounded features or states cost bf16 results ~1e-2 relative error.
- D and MH are compile-time constants, so unpadded tiles need no column masks.
- gradients w.r.t. log-features are accumulated as `dlin` = d(+ half) - d(- half)
  (BLOCK, BLOCK_F) and `dsum` = the row sums of both (BLOCK,): all the input gradient needs,
  since d log phi_f(x) / d x' = ±W_f - x'.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The log-scale of "nothing yet": finite, so EMPTY - EMPTY is 0 rather than NaN.
EMPTY = tl.constexpr(-1.0e30)


# ---------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _tile_mask(rows, n_rows, cols, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """rows < n_rows, and cols < D only where D is padded (an all-true column mask would stop
    vectorised loads)."""
    if D == BLOCK_D:
        return rows[:, None] < n_rows
    else:
        return (rows[:, None] < n_rows) & (cols[None, :] < D)


@triton.jit
def _load_rows(base, stride_l, start, L, D: tl.constexpr, BLOCK: tl.constexpr,
               BLOCK_D: tl.constexpr):  # fmt: skip
    """(BLOCK, BLOCK_D) rows start.. of a (L, D) matrix with row stride `stride_l`, zero-padded,
    in its own dtype."""
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = _tile_mask(rows, L, cols, D, BLOCK_D)
    return tl.load(base + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, start, L, D: tl.constexpr, x, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store rows start.. (< L) of a contiguous (L, D) matrix."""
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = _tile_mask(rows, L, cols, D, BLOCK_D)
    tl.store(base + rows[:, None] * D + cols[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _head(ptr, bh, H, stride_b, stride_h):
    """Where (batch, head) = divmod(bh, H) starts in a (B, H, L, D) tensor. Offsets of whole
    heads are int64; positions and in-tile offsets stay int32 (int64 tiles cost 2 registers an
    element)."""
    return ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _row_stats(ptr, bh, N, BLOCK: tl.constexpr):
    """Where head bh's per-row statistics (N BLOCK rows: delta, lse) start."""
    return ptr + bh.to(tl.int64) * N * BLOCK


@triton.jit
def _load_row_stat(ptr, bh, N, i, L, fill, BLOCK: tl.constexpr):
    """Per-row statistic (delta, lse) of rows i; `fill` at or past L (no gradient flows there)."""
    return tl.load(_row_stats(ptr, bh, N, BLOCK) + i, mask=i < L, other=fill)


@triton.jit
def _operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """x as a dot operand: rounded to DTYPE; UPCAST (interpreter only, whose bf16 dot is
    unusable) keeps the rounding but hands fp32 to the dot."""
    x = x.to(DTYPE)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _tf32(x, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """In the interpreter, which multiplies fp32 exactly, drop the 13 mantissa bits that a tf32
    dot ignores, so tests see the GPU's rounding (bf16 values have none to drop)."""
    if UPCAST and PREC == "tf32":
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True) & 0xFFFFE000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _fdot(a, b, acc, DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b (+ acc) in fp32 with both operands rounded to DTYPE (and to tf32 if PREC says so)."""
    a = _tf32(_operand(a, DTYPE, UPCAST), PREC, UPCAST)
    b = _tf32(_operand(b, DTYPE, UPCAST), PREC, UPCAST)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _feature_tile(base, n_rows: tl.constexpr, D: tl.constexpr, BLOCK_F: tl.constexpr,
                  BLOCK_D: tl.constexpr):  # fmt: skip
    """Pointers and mask of a (BLOCK_F, BLOCK_D) tile of a row-major (n_rows, D) matrix."""
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_D)
    return base + f[:, None] * D + d[None, :], (f[:, None] < n_rows) & (d[None, :] < D)


@triton.jit
def _load_feature_tile(base, n_rows: tl.constexpr, D: tl.constexpr, BLOCK_F: tl.constexpr,
                       BLOCK_D: tl.constexpr):  # fmt: skip
    """A (BLOCK_F, BLOCK_D) tile of a row-major (n_rows, D) fp32 matrix, zero-padded."""
    ptrs, mask = _feature_tile(base, n_rows, D, BLOCK_F, BLOCK_D)
    if n_rows == BLOCK_F and D == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_projection(w_ptr, MH: tl.constexpr, D: tl.constexpr, BLOCK_F: tl.constexpr,
                     BLOCK_D: tl.constexpr):  # fmt: skip
    """W: (BLOCK_F, BLOCK_D) fp32, zero-padded."""
    return _load_feature_tile(w_ptr, MH, D, BLOCK_F, BLOCK_D)


@triton.jit
def _projection(x, w, sqrt_tau, log_norm):
    """Rows x (BLOCK, BLOCK_D), any float dtype -> proj = x' W^T (BLOCK, BLOCK_F) and offset =
    |x'|²/2 + log_norm (BLOCK,), x' = sqrt_tau x. As 3-pass tf32 (≈ fp32): proj feeds exp,
    where tf32's ~5e-4 relative error, times |proj| of several units, would show."""
    xs = x.to(tl.float32) * sqrt_tau
    proj = tl.dot(xs, tl.trans(w), input_precision="tf32x3")
    return proj, 0.5 * tl.sum(xs * xs, 1) + log_norm


@triton.jit
def _half(proj, offset, HALF: tl.constexpr, MH: tl.constexpr, BLOCK_F: tl.constexpr):
    """log phi of one half of the features (BLOCK, BLOCK_F): ±proj - offset, -inf if padded."""
    logits = proj - offset[:, None] if HALF == 0 else -proj - offset[:, None]
    if MH != BLOCK_F:
        logits = tl.where((tl.arange(0, BLOCK_F) < MH)[None, :], logits, float("-inf"))
    return logits


@triton.jit
def _top(proj, offset, MH: tl.constexpr, BLOCK_F: tl.constexpr):
    """max over both halves of log phi, per row: max_f |proj_f| - offset."""
    size = tl.abs(proj)
    if MH != BLOCK_F:
        size = tl.where((tl.arange(0, BLOCK_F) < MH)[None, :], size, float("-inf"))
    return tl.max(size, 1) - offset


@triton.jit
def _input_grad(dlin, dsum, x, w_ptr, sqrt_tau, MH: tl.constexpr, D: tl.constexpr,
                BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """d loss / d x from d loss / d log phi(x), given as `dlin` and `dsum`. W is reloaded here
    rather than kept live since the start."""
    w = _load_projection(w_ptr, MH, D, BLOCK_F, BLOCK_D)
    dxs = tl.dot(dlin, w, input_precision=PREC) - x.to(tl.float32) * (sqrt_tau * dsum)[:, None]
    return dxs * sqrt_tau


@triton.jit
def _accumulate(dlin, dsum, d, HALF: tl.constexpr):
    """Add one half's d loss / d log phi (BLOCK, BLOCK_F) to (dlin, dsum)."""
    if HALF == 0:
        dlin += d
    else:
        dlin -= d
    return dlin, dsum + tl.sum(d, 1)


@triton.jit
def _load_scale(scale_ptr, idx, HALF: tl.constexpr, MH: tl.constexpr, BLOCK_F: tl.constexpr):
    """Per-feature log-scales R of one half of state `idx`; 0 for padded features."""
    f = tl.arange(0, BLOCK_F)
    return tl.load((scale_ptr + (idx * 2 + HALF) * MH) + f, mask=f < MH, other=0.0)


@triton.jit
def _load_state(state_ptr, ones_ptr, idx, HALF: tl.constexpr, MH: tl.constexpr,
                D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """One half of state `idx`: numerator (BLOCK_F, BLOCK_D) and denominator (BLOCK_F,)."""
    row = idx * 2 + HALF
    f = tl.arange(0, BLOCK_F)
    ones = tl.load((ones_ptr + row * MH) + f, mask=f < MH, other=0.0)
    return _load_feature_tile(state_ptr + row * MH * D, MH, D, BLOCK_F, BLOCK_D), ones


@triton.jit
def _store_state(state_ptr, ones_ptr, idx, HALF: tl.constexpr, x, x1, MH: tl.constexpr,
                 D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    row = idx * 2 + HALF
    ptrs, mask = _feature_tile(state_ptr + row * MH * D, MH, D, BLOCK_F, BLOCK_D)
    tl.store(ptrs, x.to(state_ptr.dtype.element_ty), mask=mask)
    f = tl.arange(0, BLOCK_F)
    tl.store((ones_ptr + row * MH) + f, x1, mask=f < MH)


@triton.jit
def _intra_block_scales(proj_q, offset_q, proj_k, offset_k, causal, MH: tl.constexpr,
                        BLOCK_F: tl.constexpr):  # fmt: skip
    """Performer's diagonal block, where no per-feature key scale may be used (it would include
    keys after the query). Each key is scaled by its own max over features s_j, each query by its
    own max qtop_i and by reach_i = max_{j <= i} s_j, so every factor is <= 1 and only keys j <= i
    set a query's scale. Returns qtop (BLOCK,), s (BLOCK,), exp(s_j - reach_i) on the causal
    triangle (0 elsewhere), and the block's log-scale qtop_i + reach_i."""
    query_top = _top(proj_q, offset_q, MH, BLOCK_F)
    key_top = _top(proj_k, offset_k, MH, BLOCK_F)
    reach = tl.max(tl.where(causal, key_top[None, :], float("-inf")), 1)
    decay = tl.exp(tl.where(causal, key_top[None, :] - reach[:, None], float("-inf")))
    return query_top, key_top, decay, query_top + reach


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def key_block_sums_kernel(
    k_ptr, v_ptr, w_ptr, state_ptr, ones_ptr, scale_ptr,
    stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    H, L, N, sqrt_tau, log_norm,
    D: tl.constexpr, MH: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Pass 1, grid (N, BH): per key block b, the block max of log phi(k) (per feature) and
    Σ_j exp(log phi(k_j) - max) [v_j, 1]: written as states[b] (later scanned in place)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    start = blk * BLOCK
    k = _load_rows(_head(k_ptr, bh, H, stride_kb, stride_kh), stride_kl, start, L, D, BLOCK,
                   BLOCK_D)  # fmt: skip
    v = _load_rows(_head(v_ptr, bh, H, stride_vb, stride_vh), stride_vl, start, L, D, BLOCK,
                   BLOCK_D)  # fmt: skip
    proj, offset = _projection(k, _load_projection(w_ptr, MH, D, BLOCK_F, BLOCK_D), sqrt_tau,
                               log_norm)  # fmt: skip
    valid = (start + tl.arange(0, BLOCK) < L)[:, None]
    real = tl.arange(0, BLOCK_F) < MH
    idx = bh.to(tl.int64) * N + blk
    for HALF in tl.static_range(2):
        logits = tl.where(valid, _half(proj, offset, HALF, MH, BLOCK_F), float("-inf"))
        top = tl.where(real, tl.max(logits, 0), 0.0)
        weights = tl.exp(logits - top[None, :])  # (BLOCK, BLOCK_F), <= 1, 0 past L
        sums = _fdot(tl.trans(weights), v, None, tl.float32, PREC, UPCAST)
        _store_state(state_ptr, ones_ptr, idx, HALF, sums, tl.sum(weights, 0), MH, D, BLOCK_F,
                     BLOCK_D)  # fmt: skip
        tl.store((scale_ptr + (idx * 2 + HALF) * MH) + tl.arange(0, BLOCK_F), top, mask=real)


@triton.jit
def state_scan_kernel(
    state_ptr, ones_ptr, scale_ptr, N,
    M: tl.constexpr, D: tl.constexpr, AFTER: tl.constexpr, BLOCK_FS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 2, grid (BH, cdiv(m, BLOCK_FS)): in place, block sums -> prefix states.

    Reads block b's sum S_b and max mk_b; keeps R_b = max(R_{b-1}, mk_b) (a running max: only
    blocks <= b) and writes the state of blocks < b (AFTER False) or <= b (AFTER True) on the
    scale R_b, and R_b itself. Loads do not depend on the carry: the loop prefetches them
    (cp.async, 3 stages), which is safe in place since each step stores only the block it read."""
    bh = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_FS + tl.arange(0, BLOCK_FS)
    d = tl.arange(0, BLOCK_D)
    real = f < M
    mask = real[:, None] & (d[None, :] < D)
    carry = tl.zeros((BLOCK_FS, BLOCK_D), tl.float32)
    carry1 = tl.zeros((BLOCK_FS,), tl.float32)
    previous = tl.full((BLOCK_FS,), float("-inf"), tl.float32)
    for blk in tl.range(N, num_stages=3):
        idx = bh * N + blk
        tile = (state_ptr + idx * M * D) + f[:, None] * D + d[None, :]
        block_max = tl.load((scale_ptr + idx * M) + f, mask=real, other=0.0)
        block_sum = tl.load(tile, mask=mask, other=0.0).to(tl.float32)
        block_sum1 = tl.load((ones_ptr + idx * M) + f, mask=real, other=0.0)
        running = tl.maximum(previous, block_max)
        decay = tl.exp(previous - running)
        carry *= decay[:, None]
        carry1 *= decay
        growth = tl.exp(block_max - running)
        if AFTER:
            carry += block_sum * growth[:, None]
            carry1 += block_sum1 * growth
        tl.store(tile, carry.to(state_ptr.dtype.element_ty), mask=mask)
        tl.store((ones_ptr + idx * M) + f, carry1, mask=real)
        tl.store((scale_ptr + idx * M) + f, running, mask=real)
        if not AFTER:
            carry += block_sum * growth[:, None]
            carry1 += block_sum1 * growth
        previous = running


@triton.jit
def forward_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, state_ptr, ones_ptr, scale_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, L, N, tau, sqrt_tau, log_norm, WINDOW,
    D: tl.constexpr, MH: tl.constexpr, N_W: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Pass 3, grid (N, BH): outputs of query block c, and per row the log-normaliser `lse`.

    First the low-rank part on the scale top_i = max_f(log phi(q_i) + R): Scatterbrain (N_W =
    WINDOW / BLOCK > 0) reads the state before key block k0 = c - N_W and adds block k0's keys
    with j <= i - WINDOW; Performer (N_W = 0) reads the state after block c-1. Then, merged like
    online softmax: Scatterbrain's exact scores on key blocks k0..c (window and causal masks), or
    Performer's causal feature products inside block c."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    k_base = _head(k_ptr, bh, H, stride_kb, stride_kh)
    v_base = _head(v_ptr, bh, H, stride_vb, stride_vh)
    start = blk * BLOCK
    i = start + tl.arange(0, BLOCK)
    q = _load_rows(_head(q_ptr, bh, H, stride_qb, stride_qh), stride_ql, start, L, D, BLOCK,
                   BLOCK_D)  # fmt: skip
    w = _load_projection(w_ptr, MH, D, BLOCK_F, BLOCK_D)
    proj_q, offset_q = _projection(q, w, sqrt_tau, log_norm)
    acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    denom = tl.zeros((BLOCK,), tl.float32)
    top = tl.full((BLOCK,), EMPTY, tl.float32)
    idx = blk - 1 if N_W == 0 else blk - N_W  # the state this block reads
    if idx >= 0:
        state = bh.to(tl.int64) * N + idx
        for HALF in tl.static_range(2):
            logits = _half(proj_q, offset_q, HALF, MH, BLOCK_F)
            logits += _load_scale(scale_ptr, state, HALF, MH, BLOCK_F)[None, :]
            top = tl.maximum(top, tl.max(logits, 1))
        if N_W > 0:
            # block k0's keys j <= i - WINDOW, features on the state's scale R_{k0}
            k = _load_rows(k_base, stride_kl, idx * BLOCK, L, D, BLOCK, BLOCK_D)
            proj_k, offset_k = _projection(k, w, sqrt_tau, log_norm)
            near = tl.zeros((BLOCK, BLOCK), tl.float32)
        for HALF in tl.static_range(2):
            r = _load_scale(scale_ptr, state, HALF, MH, BLOCK_F)
            logits = _half(proj_q, offset_q, HALF, MH, BLOCK_F) + r[None, :]
            weights = tl.exp(logits - top[:, None])
            s, s1 = _load_state(state_ptr, ones_ptr, state, HALF, MH, D, BLOCK_F, BLOCK_D)
            acc = _fdot(weights, s, acc, tl.float32, PREC, UPCAST)
            denom += tl.sum(weights * s1[None, :], 1)
            if N_W > 0:
                key_weights = tl.exp(_half(proj_k, offset_k, HALF, MH, BLOCK_F) - r[None, :])
                near = _fdot(weights, tl.trans(key_weights), near, tl.float32, PREC, UPCAST)
        if N_W > 0:
            j = idx * BLOCK + tl.arange(0, BLOCK)
            near = tl.where(j[None, :] <= i[:, None] - WINDOW, near, 0.0)
            v = _load_rows(v_base, stride_vl, idx * BLOCK, L, D, BLOCK, BLOCK_D)
            acc = _fdot(near, v, acc, DTYPE, PREC, UPCAST)
            denom += tl.sum(near, 1)
    if N_W == 0:
        # block c's own keys j <= i, on the scale qtop_i + reach_i (see _intra_block_scales)
        k = _load_rows(k_base, stride_kl, start, L, D, BLOCK, BLOCK_D)
        proj_k, offset_k = _projection(k, w, sqrt_tau, log_norm)
        query_top, key_top, decay, intra_top = _intra_block_scales(
            proj_q, offset_q, proj_k, offset_k, i[None, :] <= i[:, None], MH, BLOCK_F
        )
        p = tl.zeros((BLOCK, BLOCK), tl.float32)
        for HALF in tl.static_range(2):
            qf = tl.exp(_half(proj_q, offset_q, HALF, MH, BLOCK_F) - query_top[:, None])
            kf = tl.exp(_half(proj_k, offset_k, HALF, MH, BLOCK_F) - key_top[:, None])
            p = _fdot(qf, tl.trans(kf), p, tl.float32, PREC, UPCAST)
        new_top = tl.maximum(top, intra_top)
        p = p * decay * tl.exp(intra_top - new_top)[:, None]
        rescale = tl.exp(top - new_top)
        v = _load_rows(v_base, stride_vl, start, L, D, BLOCK, BLOCK_D)
        acc = _fdot(p, v, acc * rescale[:, None], DTYPE, PREC, UPCAST)
        denom = denom * rescale + tl.sum(p, 1)
        top = new_top
    else:
        q_op = _operand(q, DTYPE, UPCAST)
        for kb in range(tl.maximum(blk - N_W, 0), blk + 1):
            k_op = _operand(_load_rows(k_base, stride_kl, kb * BLOCK, L, D, BLOCK, BLOCK_D),
                            DTYPE, UPCAST)  # fmt: skip
            j = kb * BLOCK + tl.arange(0, BLOCK)
            seen = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - WINDOW)
            scores = tl.dot(q_op, tl.trans(k_op), input_precision=PREC)
            scores = tl.where(seen, scores * tau, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            rescale = tl.exp(top - new_top)
            p = tl.exp(scores - new_top[:, None])
            v = _load_rows(v_base, stride_vl, kb * BLOCK, L, D, BLOCK, BLOCK_D)
            acc = _fdot(p, v, acc * rescale[:, None], DTYPE, PREC, UPCAST)
            denom = denom * rescale + tl.sum(p, 1)
            top = new_top
    _store_rows(
        out_ptr + bh.to(tl.int64) * L * D, start, L, D, acc / denom[:, None], BLOCK, BLOCK_D
    )
    tl.store(_row_stats(lse_ptr, bh, N, BLOCK) + i, top + tl.log(denom))


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def backward_query_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, w_ptr, state_ptr, ones_ptr, scale_ptr, lse_ptr,
    dq_ptr, delta_ptr, y_ptr, y1_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
    stride_db, stride_dh, stride_dl,
    H, L, N, tau, sqrt_tau, log_norm, WINDOW,
    D: tl.constexpr, MH: tl.constexpr, N_W: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Backward pass 1, grid (N, BH), query block c: dq, delta_i = dO_i . O_i, and the block's
    contribution to the reverse scan, Y = Σ_i Q_i [dO_i, -delta_i]^T with
    Q_i = exp(log phi(q_i) + R - lse_i), stored at the state index the block read.

    With A_ij = phi(q_i).phi(k_j) and dA_ij = (dO_i.v_j - delta_i) / normaliser_i,
    d loss / d log phi(q_i) = Q_i * Σ_j (dO_i.v_j - delta_i) exp(log phi(k_j) - R)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    k_base = _head(k_ptr, bh, H, stride_kb, stride_kh)
    v_base = _head(v_ptr, bh, H, stride_vb, stride_vh)
    start = blk * BLOCK
    i = start + tl.arange(0, BLOCK)
    q = _load_rows(_head(q_ptr, bh, H, stride_qb, stride_qh), stride_ql, start, L, D, BLOCK,
                   BLOCK_D)  # fmt: skip
    do = _load_rows(_head(do_ptr, bh, H, stride_db, stride_dh), stride_dl, start, L, D, BLOCK,
                    BLOCK_D)  # fmt: skip
    o = _load_rows(_head(o_ptr, bh, H, stride_ob, stride_oh), stride_ol, start, L, D, BLOCK,
                   BLOCK_D)  # fmt: skip
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(_row_stats(delta_ptr, bh, N, BLOCK) + i, delta)
    do_op = _operand(do, DTYPE, UPCAST)
    lse = _load_row_stat(lse_ptr, bh, N, i, L, float("inf"), BLOCK)
    w = _load_projection(w_ptr, MH, D, BLOCK_F, BLOCK_D)
    proj_q, offset_q = _projection(q, w, sqrt_tau, log_norm)
    dlin = tl.zeros((BLOCK, BLOCK_F), tl.float32)
    dsum = tl.zeros((BLOCK,), tl.float32)
    idx = blk - 1 if N_W == 0 else blk - N_W
    if idx >= 0:
        state = bh.to(tl.int64) * N + idx
        if N_W > 0:
            # block k0's keys j <= i - WINDOW
            k = _load_rows(k_base, stride_kl, idx * BLOCK, L, D, BLOCK, BLOCK_D)
            proj_k, offset_k = _projection(k, w, sqrt_tau, log_norm)
            v = _load_rows(v_base, stride_vl, idx * BLOCK, L, D, BLOCK, BLOCK_D)
            dp = tl.dot(do_op, tl.trans(_operand(v, DTYPE, UPCAST)), input_precision=PREC)
            j = idx * BLOCK + tl.arange(0, BLOCK)
            da = tl.where(j[None, :] <= i[:, None] - WINDOW, dp - delta[:, None], 0.0)
        for HALF in tl.static_range(2):
            r = _load_scale(scale_ptr, state, HALF, MH, BLOCK_F)
            big_q = tl.exp(_half(proj_q, offset_q, HALF, MH, BLOCK_F) + r[None, :] - lse[:, None])
            s, s1 = _load_state(state_ptr, ones_ptr, state, HALF, MH, D, BLOCK_F, BLOCK_D)
            g = (
                _fdot(do_op, tl.trans(s), None, tl.float32, PREC, UPCAST)
                - delta[:, None] * s1[None, :]
            )
            if N_W > 0:
                key_weights = tl.exp(_half(proj_k, offset_k, HALF, MH, BLOCK_F) - r[None, :])
                g = _fdot(da, key_weights, g, tl.float32, PREC, UPCAST)
            dlin, dsum = _accumulate(dlin, dsum, big_q * g, HALF)
            y = _fdot(tl.trans(big_q), do_op, None, tl.float32, PREC, UPCAST)
            y1 = -tl.sum(big_q * delta[:, None], 0)
            _store_state(y_ptr, y1_ptr, state, HALF, y, y1, MH, D, BLOCK_F, BLOCK_D)
    dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)  # from exact scores, times tau at the end
    q_op = _operand(q, DTYPE, UPCAST)
    if N_W == 0:
        k = _load_rows(k_base, stride_kl, start, L, D, BLOCK, BLOCK_D)
        proj_k, offset_k = _projection(k, w, sqrt_tau, log_norm)
        query_top, key_top, decay, intra_top = _intra_block_scales(
            proj_q, offset_q, proj_k, offset_k, i[None, :] <= i[:, None], MH, BLOCK_F
        )
        v = _load_rows(v_base, stride_vl, start, L, D, BLOCK, BLOCK_D)
        dp = tl.dot(do_op, tl.trans(_operand(v, DTYPE, UPCAST)), input_precision=PREC)
        z = (dp - delta[:, None]) * decay * tl.exp(intra_top - lse)[:, None]
        for HALF in tl.static_range(2):
            qf = tl.exp(_half(proj_q, offset_q, HALF, MH, BLOCK_F) - query_top[:, None])
            kf = tl.exp(_half(proj_k, offset_k, HALF, MH, BLOCK_F) - key_top[:, None])
            dlin, dsum = _accumulate(dlin, dsum, qf * _fdot(z, kf, None, tl.float32, PREC, UPCAST),
                                     HALF)  # fmt: skip
    else:
        for kb in range(tl.maximum(blk - N_W, 0), blk + 1):
            k_op = _operand(_load_rows(k_base, stride_kl, kb * BLOCK, L, D, BLOCK, BLOCK_D),
                            DTYPE, UPCAST)  # fmt: skip
            v_op = _operand(_load_rows(v_base, stride_vl, kb * BLOCK, L, D, BLOCK, BLOCK_D),
                            DTYPE, UPCAST)  # fmt: skip
            j = kb * BLOCK + tl.arange(0, BLOCK)
            seen = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - WINDOW)
            scores = tl.dot(q_op, tl.trans(k_op), input_precision=PREC) * tau
            p = tl.where(seen, tl.exp(scores - lse[:, None]), 0.0)
            dp = tl.dot(do_op, tl.trans(v_op), input_precision=PREC)
            dq = _fdot(p * (dp - delta[:, None]), k_op, dq, DTYPE, PREC, UPCAST)
    dq = dq * tau + _input_grad(dlin, dsum, q_op, w_ptr, sqrt_tau, MH, D, BLOCK_F, BLOCK_D, PREC)
    _store_rows(dq_ptr + bh.to(tl.int64) * L * D, start, L, D, dq, BLOCK, BLOCK_D)


@triton.jit
def reverse_scan_kernel(
    y_ptr, y1_ptr, scale_ptr, N, SHIFT,
    M: tl.constexpr, D: tl.constexpr, AFTER: tl.constexpr, BLOCK_FS: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    later = tl.load((scale_ptr + (bh * N + N - 1) * M) + f, mask=real, other=0.0)
    for step in tl.range(N, num_stages=3):
        blk = N - 1 - step
        idx = bh * N + blk
        tile = (y_ptr + idx * M * D) + f[:, None] * D + d[None, :]
        has = blk + SHIFT < N
        block_y = tl.load(tile, mask=mask & has, other=0.0).to(tl.float32)
        block_y1 = tl.load((y1_ptr + idx * M) + f, mask=real & has, other=0.0)
        running = tl.load((scale_ptr + idx * M) + f, mask=real, other=0.0)
        decay = tl.exp(running - later)
        carry *= decay[:, None]
        carry1 *= decay
        if AFTER:
            carry += block_y
            carry1 += block_y1
        tl.store(tile, carry.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store((y1_ptr + idx * M) + f, carry1, mask=real)
        if not AFTER:
            carry += block_y
            carry1 += block_y1
        later = running


@triton.jit
def backward_key_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, vstate_ptr, vones_ptr, scale_ptr, lse_ptr,
    delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_db, stride_dh, stride_dl,
    H, L, N, tau, sqrt_tau, log_norm, WINDOW,
    D: tl.constexpr, MH: tl.constexpr, N_W: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Backward pass 3, grid (N, BH), key block b: dk and dv from the suffix state V_b (every
    later query that sees block b through a state), the queries that see block b through
    features directly (block b + N_W's rows i >= j + WINDOW; Performer: block b's rows i >= j),
    and the exact scores of the query blocks whose window covers block b.

    d loss / d log phi(k_j) = kw_j * (V_b [v_j, 1] + Σ_i Q_i (dO_i.v_j - delta_i)) with
    kw_j = exp(log phi(k_j) - R_b) <= 1, and dv_j = V_b^T kw_j + Σ_i (Q_i.kw_j) dO_i."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    q_base = _head(q_ptr, bh, H, stride_qb, stride_qh)
    do_base = _head(do_ptr, bh, H, stride_db, stride_dh)
    start = blk * BLOCK
    j = start + tl.arange(0, BLOCK)
    k = _load_rows(_head(k_ptr, bh, H, stride_kb, stride_kh), stride_kl, start, L, D, BLOCK,
                   BLOCK_D)  # fmt: skip
    v = _load_rows(_head(v_ptr, bh, H, stride_vb, stride_vh), stride_vl, start, L, D, BLOCK,
                   BLOCK_D)  # fmt: skip
    v_op = _operand(v, DTYPE, UPCAST)
    w = _load_projection(w_ptr, MH, D, BLOCK_F, BLOCK_D)
    proj_k, offset_k = _projection(k, w, sqrt_tau, log_norm)
    state = bh.to(tl.int64) * N + blk
    dlin = tl.zeros((BLOCK, BLOCK_F), tl.float32)
    dsum = tl.zeros((BLOCK,), tl.float32)
    dv = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    if N_W > 0:
        # queries of block b + N_W with i >= j + WINDOW, through features on the scale R_b; past
        # the last block every load is masked and they add nothing
        near_start = (blk + N_W) * BLOCK
        i = near_start + tl.arange(0, BLOCK)
        q = _load_rows(q_base, stride_ql, near_start, L, D, BLOCK, BLOCK_D)
        do_op = _operand(_load_rows(do_base, stride_dl, near_start, L, D, BLOCK, BLOCK_D), DTYPE,
                         UPCAST)  # fmt: skip
        delta = _load_row_stat(delta_ptr, bh, N, i, L, 0.0, BLOCK)
        lse = _load_row_stat(lse_ptr, bh, N, i, L, float("inf"), BLOCK)
        proj_q, offset_q = _projection(q, w, sqrt_tau, log_norm)
        lower = j[None, :] <= i[:, None] - WINDOW
        da = tl.trans(tl.where(lower, tl.dot(do_op, tl.trans(v_op), input_precision=PREC)
                               - delta[:, None], 0.0))  # fmt: skip
        p = tl.zeros((BLOCK, BLOCK), tl.float32)  # normalised weights A_ij / normaliser_i
    for HALF in tl.static_range(2):
        r = _load_scale(scale_ptr, state, HALF, MH, BLOCK_F)
        key_weights = tl.exp(_half(proj_k, offset_k, HALF, MH, BLOCK_F) - r[None, :])  # <= 1
        u, u1 = _load_state(vstate_ptr, vones_ptr, state, HALF, MH, D, BLOCK_F, BLOCK_D)
        g = _fdot(v_op, tl.trans(u), None, tl.float32, PREC, UPCAST) + u1[None, :]
        dv = _fdot(key_weights, u, dv, tl.float32, PREC, UPCAST)
        if N_W > 0:
            big_q = tl.exp(_half(proj_q, offset_q, HALF, MH, BLOCK_F) + r[None, :] - lse[:, None])
            p = _fdot(big_q, tl.trans(key_weights), p, tl.float32, PREC, UPCAST)
            g = _fdot(da, big_q, g, tl.float32, PREC, UPCAST)
        dlin, dsum = _accumulate(dlin, dsum, key_weights * g, HALF)
    if N_W > 0:
        dv = _fdot(tl.trans(tl.where(lower, p, 0.0)), do_op, dv, DTYPE, PREC, UPCAST)
    dk = tl.zeros((BLOCK, BLOCK_D), tl.float32)  # from exact scores, times tau at the end
    k_op = _operand(k, DTYPE, UPCAST)
    if N_W == 0:
        # block b's own queries i >= j
        i = j
        q = _load_rows(q_base, stride_ql, start, L, D, BLOCK, BLOCK_D)
        do_op = _operand(_load_rows(do_base, stride_dl, start, L, D, BLOCK, BLOCK_D), DTYPE,
                         UPCAST)  # fmt: skip
        delta = _load_row_stat(delta_ptr, bh, N, i, L, 0.0, BLOCK)
        lse = _load_row_stat(lse_ptr, bh, N, i, L, float("inf"), BLOCK)
        proj_q, offset_q = _projection(q, w, sqrt_tau, log_norm)
        query_top, key_top, decay, intra_top = _intra_block_scales(
            proj_q, offset_q, proj_k, offset_k, j[None, :] <= i[:, None], MH, BLOCK_F
        )
        weight = decay * tl.exp(intra_top - lse)[:, None]
        dp = tl.dot(do_op, tl.trans(v_op), input_precision=PREC)
        z = tl.trans((dp - delta[:, None]) * weight)
        p = tl.zeros((BLOCK, BLOCK), tl.float32)
        for HALF in tl.static_range(2):
            qf = tl.exp(_half(proj_q, offset_q, HALF, MH, BLOCK_F) - query_top[:, None])
            kf = tl.exp(_half(proj_k, offset_k, HALF, MH, BLOCK_F) - key_top[:, None])
            p = _fdot(qf, tl.trans(kf), p, tl.float32, PREC, UPCAST)
            dlin, dsum = _accumulate(dlin, dsum, kf * _fdot(z, qf, None, tl.float32, PREC, UPCAST),
                                     HALF)  # fmt: skip
        dv = _fdot(tl.trans(p * weight), do_op, dv, DTYPE, PREC, UPCAST)
    else:
        for qb in range(blk, tl.minimum(blk + N_W + 1, N)):
            i = qb * BLOCK + tl.arange(0, BLOCK)
            q_op = _operand(_load_rows(q_base, stride_ql, qb * BLOCK, L, D, BLOCK, BLOCK_D),
                            DTYPE, UPCAST)  # fmt: skip
            do_op = _operand(_load_rows(do_base, stride_dl, qb * BLOCK, L, D, BLOCK, BLOCK_D),
                             DTYPE, UPCAST)  # fmt: skip
            delta = _load_row_stat(delta_ptr, bh, N, i, L, 0.0, BLOCK)
            lse = _load_row_stat(lse_ptr, bh, N, i, L, float("inf"), BLOCK)
            seen = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - WINDOW)
            scores = tl.dot(q_op, tl.trans(k_op), input_precision=PREC) * tau
            p = tl.where(seen, tl.exp(scores - lse[:, None]), 0.0)
            dp = tl.dot(do_op, tl.trans(v_op), input_precision=PREC)
            dv = _fdot(tl.trans(p), do_op, dv, DTYPE, PREC, UPCAST)
            dk = _fdot(tl.trans(p * (dp - delta[:, None])), q_op, dk, DTYPE, PREC, UPCAST)
    dk = dk * tau + _input_grad(dlin, dsum, k_op, w_ptr, sqrt_tau, MH, D, BLOCK_F, BLOCK_D, PREC)
    _store_rows(dk_ptr + bh.to(tl.int64) * L * D, start, L, D, dk, BLOCK, BLOCK_D)
    _store_rows(dv_ptr + bh.to(tl.int64) * L * D, start, L, D, dv, BLOCK, BLOCK_D)
