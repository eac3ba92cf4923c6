"""Fused Triton forward and backward for causal Scatterbrain (`sparse: local`) and Performer.

    out = scatterbrain_local(q, k, v, projection, window)   # (B, H, L, D) each -> (B, H, L, D)
    out = performer(q, k, v, projection)

Same semantics as `ScatterbrainAttention` / `PerformerAttention` (and their float64 twins in
reference.py): tau = D**-0.5, x' = tau**0.5 x, log phi(x) = [W x', -W x'] - |x'|²/2 - log(m)/2
with W = module.projection (m/2, D). Scatterbrain: query i sees keys j in (i - window, i] through
exp(tau q.k) and keys j <= i - window through phi(q_i).phi(k_j); Performer: phi.phi for all j <= i.
Inputs fp32/bf16/fp16 (the output has v's dtype); everything accumulates in fp32.

The algorithm: positions are cut into blocks of BLOCK rows (BLOCK divides the window, so the
window is N_W = window / BLOCK whole blocks; Performer is N_W = 0); N = ceil(L / BLOCK). Three
forward and three backward launches, all with one (batch, head) per program along one grid axis:

1. `key_block_sums` (grid N x BH): per key block b, per feature, the block max mk_b of
   log phi(k) and S_b = Σ_j exp(log phi(k_j) - mk_b) [v_j, 1].
2. `state_scan` (grid BH x 16-feature tiles, sequential over blocks, in place over pass 1's
   output): the running max R_b = max(R_{b-1}, mk_b), which covers blocks <= b only, never the
   future, and the prefix state on the scale R_b: the keys of blocks < b for Scatterbrain
   ("before"), of blocks <= b for Performer ("after").
3. `forward` (grid N x BH), query block c, in two phases merged like online softmax:
   - low-rank, on the per-row scale top_i = max_f(log phi(q_i)_f + R_f): Scatterbrain reads the
     state before block k0 = c - N_W and adds block k0's keys with j <= i - window (the lower
     triangle; their features are scaled by R_{k0}, which covers only keys before block c);
     Performer reads the state after block c-1.
   - Scatterbrain: exact scores exp(tau q.k) on key blocks k0..c under the window and causal masks,
     flash-attention style. Performer: block c's own causal feature products, where a per-feature
     key scale would include later keys; instead each key is scaled by its own max over features
     s_j and query i by reach_i = max_{j<=i} s_j, so every factor exp(s_j - reach_i) <= 1 and
     depends only on keys j <= i.
   Every term is a positive weight on one shared per-row log-scale, so nothing overflows and the
   normaliser stays > 0. Stored per row: lse = log(normaliser).
   Saved for backward: q, k, v, out, the states (m x D numerators + m denominators per block, fp32),
   their scales R (m per block) and lse.

Backward, with delta_i = dO_i . O_i, A_ij the unnormalised weight and
dA_ij = (dO_i . v_j - delta_i) / normaliser_i:

4. `backward_query` (grid N x BH): delta; dq from the exact scores (P = exp(s - lse), flash style)
   and from the features: d loss / d log phi(q_i) = Q_i * (T_c [dO_i, -delta_i] + the near block's
   Σ_j (dO_i.v_j - delta_i) kw_j) with Q_i = exp(log phi(q_i) + R - lse_i), kw_j = exp(log phi(k_j)
   - R) (Performer: block c's products on the per-key scales); and the block's query sum
   Y_c = Σ_i Q_i [dO_i, -delta_i]^T, stored at the state index the block read.
5. `reverse_scan` (grid BH x feature tiles, sequential, in place over Y): V_b = the sum of the Y
   of every later state index that includes block b, rescaled by exp(R_b - R_b') <= 1 (R only
   grows): the mirror of pass 2.
6. `backward_key` (grid N x BH): dk, dv of key block b from V_b (d loss / d log phi(k_j) =
   kw_j * (V_b [v_j, 1]) and dv_j = V_b^T kw_j, kw_j = exp(log phi(k_j) - R_b) <= 1), from the
   queries that see block b through features directly (block b + N_W's rows i >= j + window;
   Performer: block b's rows i >= j), and from the exact scores of the query blocks b..b+N_W.
Gradients w.r.t. log-features become input gradients through d log phi_f(x) / d x' = ±W_f - x'.
Log-features are recomputed from q and k where needed (a (BLOCK x D) @ (D x m/2) product, 3-pass
tf32) rather than stored.

Memory traffic per (batch, head) and position, D = 64, m = 128 features, bf16 inputs: q, k, v,
out and dO (128 B each) are read by 2-3 passes each, the exact part re-reading the N_W + 1 key
blocks of a query block (and the query blocks of a key block) as flash attention does: ~2 KiB.
The states dominate: m (D + 2) x 4 B per block, i.e. 33 KiB / BLOCK per position (1 KiB at
BLOCK = 32, 0.5 KiB at 64), moved 8 times (pass 1 writes, 2 reads and writes, 3 reads, 4 reads
and writes Y, 5 reads and writes, 6 reads): ~8 KiB at BLOCK = 32, ~4 KiB at 64. Row statistics
(lse, delta) add 16 B. Storing states in bf16 would halve that stream but costs bf16 results
about 1e-2 relative error in the Performer's gradients (measured), so they are fp32.

Dots: exact scores and P @ V use the inputs' dtype (bf16/fp16 tensor cores, fp32 accumulate);
every dot with a feature or state operand uses fp32 operands as tf32 (fp32 inputs: 3-pass tf32,
≈ fp32, for 1e-4 accuracy); rounding features to bf16 would cost ~1e-2 as well. On a GPU,
num_warps and num_stages of the four per-block kernels are autotuned (`TUNING_CONFIGS`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

# Default block sizes: for a window the largest of BLOCKS that divides it (tl.dot needs >= 16).
# 32 rather than 64: at 64 rows with m = 128 and D = 64 the backward kernels spill ~1 KiB of
# registers per thread on sm_90 (ahead-of-time compile), at 32 almost nothing; 32 doubles the
# state traffic, though (see above), so `sbtrain.bench.kernels` times 32, 64 and 128.
BLOCKS = (32, 16)
PERFORMER_BLOCK = 32
SCAN_FEATURES = 16  # features per program of the scans


def available(device: torch.device | str) -> bool:
    """Whether the kernels run on `device`: triton importable and CUDA, or TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.device(device).type == "cuda" or interpreting()


def scatterbrain_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    window: int,
    block: int | None = None,
    on_backward_error: Callable | None = None,
) -> torch.Tensor:
    """Causal Scatterbrain with a local window: q, k, v (B, H, L, D) -> (B, H, L, D), v's dtype.

    projection: W (m/2, D); window: a multiple of 16 (0: Performer); block: the block size (a
    power of 2 >= 16 dividing the window), by default the largest of BLOCKS that divides it.
    on_backward_error(error, q, k, v, grad_out) -> (dq, dk, dv): the gradients when the fused
    backward raises (default: the error propagates); see dispatch.py.
    """
    if window == 0:
        return performer(q, k, v, projection, block, on_backward_error)
    if block is None:
        block = next((b for b in BLOCKS if window % b == 0), None)
    if block is None or window % block or block < 16 or block & (block - 1):
        raise ValueError(
            f"scatterbrain_local: window {window} needs a block size, a power of 2 >= 16 that "
            f"divides it (got block={block})"
        )
    return _FusedAttention.apply(q, k, v, projection, window, block, on_backward_error)


def performer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    block: int | None = None,
    on_backward_error: Callable | None = None,
) -> torch.Tensor:
    """Causal Performer (FAVOR+): q, k, v (B, H, L, D) -> (B, H, L, D), v's dtype."""
    block = PERFORMER_BLOCK if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"performer: block must be a power of 2 >= 16, got {block}")
    return _FusedAttention.apply(q, k, v, projection, 0, block, on_backward_error)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter() -> None:
    """Make triton 3.6's interpreter run loops with runtime bounds under numpy >= 2.3.

    The interpreter keeps scalars as 1-element arrays and converts them with `int(array)`, which
    newer numpy refuses for arrays of ndim 1. This replaces that conversion (interpreter only).
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "sbtrain_patched", False):
        return

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch.sbtrain_patched = True
    interpreter._patch_lang_tensor = patch


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _rows_last(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along head_dim (the kernels take any batch/head/length strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


# Launch settings tried on a GPU for each per-block kernel (they write only their outputs, so
# the autotuner may run them repeatedly); chosen again when a key value changes.
TUNING_CONFIGS = tuple((warps, stages) for warps in (4, 8) for stages in (1, 2))
TUNING_KEY = ["N", "N_W", "D", "MH", "BLOCK", "DTYPE", "PREC"]
_tuned_kernels: dict = {}


def _tuned(name: str):
    """Kernel `name` of triton_jit; on a GPU wrapped in an autotuner over num_warps and
    num_stages (register pressure and pipelining depend on the card and the sizes)."""
    from sbtrain.attention import triton_jit as jit

    kernel = getattr(jit, name)
    if interpreting():
        return kernel
    if name not in _tuned_kernels:
        import triton

        configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in TUNING_CONFIGS]
        _tuned_kernels[name] = triton.autotune(configs, key=TUNING_KEY)(kernel)
    return _tuned_kernels[name]


class _Config:
    """Sizes and compile-time constants of one call."""

    def __init__(self, q: torch.Tensor, projection: torch.Tensor, window: int, block: int):
        import triton
        import triton.language as tl

        self.batch, self.heads, self.length, self.head_dim = q.shape
        self.half = projection.shape[0]  # m/2
        if projection.shape[1] != self.head_dim:
            raise ValueError(
                f"projection {tuple(projection.shape)} does not match D = {q.shape[-1]}"
            )
        self.window, self.block = window, block
        self.n_blocks = triton.cdiv(self.length, block)
        self.bh = self.batch * self.heads
        tau = self.head_dim**-0.5
        self.scalars = (tau, tau**0.5, 0.5 * math.log(2 * self.half))
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.block_f = max(16, triton.next_power_of_2(self.half))
        dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
        self.constants = dict(
            D=self.head_dim,
            MH=self.half,
            N_W=window // block,
            BLOCK=block,
            BLOCK_D=self.block_d,
            BLOCK_F=self.block_f,
            DTYPE=dtype[q.dtype],
            PREC="tf32x3" if q.dtype == torch.float32 else "tf32",
            UPCAST=interpreting(),
        )
        if interpreting():
            _patch_interpreter()

    def sizes(self) -> tuple[int, int, int]:
        return self.heads, self.length, self.n_blocks

    def state_buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block: the m x D state numerators and the m denominators, fp32."""
        shape = (self.bh, self.n_blocks, 2 * self.half)
        return (
            _empty((*shape, self.head_dim), torch.float32, device),
            _empty(shape, torch.float32, device),
        )

    def scan(self, kernel, state, ones, scale, *extra, after: bool) -> None:
        m = 2 * self.half
        grid = (self.bh, (m + SCAN_FEATURES - 1) // SCAN_FEATURES)
        kernel[grid](
            state, ones, scale, self.n_blocks, *extra,
            M=m, D=self.head_dim, AFTER=after, BLOCK_FS=SCAN_FEATURES, BLOCK_D=self.block_d,
        )  # fmt: skip


def _forward(q, k, v, projection, config: _Config):
    from sbtrain.attention import triton_jit as jit

    device = q.device
    state, ones = config.state_buffers(device)
    scale = _empty(ones.shape, torch.float32, device)
    heads, length, n_blocks = config.sizes()
    tau, sqrt_tau, log_norm = config.scalars
    c = config.constants
    grid = (n_blocks, config.bh)
    _tuned("key_block_sums_kernel")[grid](
        k, v, projection, state, ones, scale, *_strides(k), *_strides(v),
        heads, length, n_blocks, sqrt_tau, log_norm,
        **{name: c[name] for name in ("D", "MH", "BLOCK", "BLOCK_D", "BLOCK_F", "PREC",
                                      "UPCAST")},
    )  # fmt: skip
    config.scan(jit.state_scan_kernel, state, ones, scale, after=c["N_W"] == 0)
    out = _empty(v.shape, v.dtype, device)
    lse = _empty((config.bh, n_blocks * config.block), torch.float32, device)
    _tuned("forward_kernel")[grid](
        q, k, v, projection, state, ones, scale, out, lse,
        *_strides(q), *_strides(k), *_strides(v),
        heads, length, n_blocks, tau, sqrt_tau, log_norm, config.window,
        **c,
    )  # fmt: skip
    return out, state, ones, scale, lse


def _backward(grad_out, saved, projection, config: _Config):
    from sbtrain.attention import triton_jit as jit

    q, k, v, out, state, ones, scale, lse = saved
    device = q.device
    heads, length, n_blocks = config.sizes()
    tau, sqrt_tau, log_norm = config.scalars
    c = config.constants
    grid = (n_blocks, config.bh)
    dq = _empty(q.shape, q.dtype, device)
    dk = _empty(k.shape, k.dtype, device)
    dv = _empty(v.shape, v.dtype, device)
    delta = _empty(lse.shape, torch.float32, device)
    ystate, yones = config.state_buffers(device)
    _tuned("backward_query_kernel")[grid](
        q, k, v, out, grad_out, projection, state, ones, scale, lse, dq, delta, ystate, yones,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out),
        heads, length, n_blocks, tau, sqrt_tau, log_norm, config.window,
        **c,
    )  # fmt: skip
    shift = c["N_W"] if c["N_W"] else 1
    config.scan(jit.reverse_scan_kernel, ystate, yones, scale, shift, after=c["N_W"] == 0)
    _tuned("backward_key_kernel")[grid](
        q, k, v, grad_out, projection, ystate, yones, scale, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        heads, length, n_blocks, tau, sqrt_tau, log_norm, config.window,
        **c,
    )  # fmt: skip
    return dq, dk, dv


class _FusedAttention(torch.autograd.Function):
    """Scatterbrain (window > 0) or Performer (window 0); the projection gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, projection, window: int, block: int, on_backward_error=None):
        if not (q.dtype == k.dtype == v.dtype) or q.shape != k.shape or q.shape != v.shape:
            raise ValueError(
                f"q, k, v must share shape and dtype, got {tuple(q.shape)} {q.dtype}, "
                f"{tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}"
            )
        if q.shape[2] == 0:
            return torch.empty_like(v)
        q, k, v = (_rows_last(x) for x in (q, k, v))
        projection = projection.detach().to(device=q.device, dtype=torch.float32).contiguous()
        config = _Config(q, projection, window, block)
        out, *saved = _forward(q, k, v, projection, config)
        ctx.save_for_backward(q, k, v, out, *saved, projection)
        ctx.config, ctx.on_backward_error = config, on_backward_error
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *saved, projection = ctx.saved_tensors
        grad_out = _rows_last(grad_out)
        try:
            dq, dk, dv = _backward(grad_out, saved, projection, ctx.config)
        except Exception as error:
            if ctx.on_backward_error is None or isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            dq, dk, dv = ctx.on_backward_error(error, *saved[:3], grad_out)
        return dq, dk, dv, None, None, None, None
