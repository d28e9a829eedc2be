"""
Causal flash attention, hand-written in Triton: forward and backward, never materialising the
T x T attention matrix.

Forward (one program per block of BLOCK_M queries of one (batch, head)): walk over the key/value
blocks up to the diagonal, keeping for every query row the running maximum m, the running sum of
exponentials l and the unnormalised output acc ("online softmax"); rescale acc whenever m grows.
It also stores lse = m + log(l), the log-sum-exp of every row, for the backward pass.

Backward (FlashAttention-2 style), with delta = rowsum(dO * O) precomputed:
    P  = exp(S - lse)              recomputed block by block from Q, K and the saved lse
    dV = P^T dO                    dP = dO V^T
    dS = P * (dP - delta)          dQ = dS K * scale,  dK = dS^T Q * scale
One kernel owns a block of keys (accumulates dK, dV over the query blocks at or after it), a second
owns a block of queries (accumulates dQ): no atomics.

Head dims 16-128 (powers of two); float32, bfloat16, float16 inputs with float32 accumulation
(float32 inputs use exact IEEE products, not TF32). Used by model.causal_attention on CUDA when
Triton is installed. On CPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1 set
before this module is imported), which is how the tests check them.
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """Matrix product with float32 accumulation; exact IEEE products for float32 inputs (no TF32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _forward_blocks(acc, l, m, q, K, V, base, stride_t, offs_m, offs_n, offs_d, start, end, T,
                    SCALE_LOG2: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax over the key blocks [start, end). MASKED: the blocks on the diagonal (causal
    mask and sequence end); the blocks before them are visible to every query row and skip both."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < T
        if MASKED:
            k = tl.load(K + base + cols[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V + base + cols[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(K + base + cols[:, None] * stride_t + offs_d[None, :])
            v = tl.load(V + base + cols[:, None] * stride_t + offs_d[None, :])
        s = _dot(q, tl.trans(k), IEEE) * SCALE_LOG2       # work in base 2: exp2 is cheaper than exp
        if MASKED:
            s = tl.where((offs_m[:, None] >= cols[None, :]) & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    return acc, l, m


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, stride_b, stride_h, stride_t, n_heads, T, SCALE_LOG2: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    block_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = (bh // n_heads) * stride_b + (bh % n_heads) * stride_h
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    diagonal = block_m * BLOCK_M                          # keys before the block's first query: all visible
    end = tl.minimum((block_m + 1) * BLOCK_M, T)          # causal: no key after the last query
    acc, l, m = _forward_blocks(acc, l, m, q, K, V, base, stride_t, offs_m, offs_n, offs_d, 0, diagonal, T,
                                SCALE_LOG2, False, BLOCK_N, IEEE)
    acc, l, m = _forward_blocks(acc, l, m, q, K, V, base, stride_t, offs_m, offs_n, offs_d, diagonal, end, T,
                                SCALE_LOG2, True, BLOCK_N, IEEE)
    acc = acc / l[:, None]
    tl.store(O + base + offs_m[:, None] * stride_t + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * T + offs_m, m + tl.log2(l), mask=row_ok)   # base-2 log-sum-exp


@triton.jit
def _delta_kernel(O, DO, DELTA, stride_b, stride_h, stride_t, n_heads, T,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    block_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = (bh // n_heads) * stride_b + (bh % n_heads) * stride_h
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < T
    o = tl.load(O + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, base, bh, stride_t, offs_n, offs_m, offs_d, start, end, T,
                 SCALE_LOG2: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [start, end). Rows past the sequence
    end load q = dO = delta = 0 and so add nothing; only the diagonal blocks need the causal mask."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        q = tl.load(Q + base + rows[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + base + rows[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * SCALE_LOG2 - lse[:, None])
        if MASKED:
            p = tl.where((rows[:, None] >= offs_n[None, :]) & row_ok[:, None], p, 0.0)
        dv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, stride_b, stride_h, stride_t, n_heads, T,
                          SCALE_LOG2: tl.constexpr, SCALE: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    block_n = tl.program_id(0)
    bh = tl.program_id(1)
    base = (bh // n_heads) * stride_b + (bh % n_heads) * stride_h
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    k = tl.load(K + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    first = (block_n * BLOCK_N // BLOCK_M) * BLOCK_M       # queries before this key block never see it
    past = tl.minimum(tl.cdiv((block_n + 1) * BLOCK_N, BLOCK_M) * BLOCK_M, T)  # queries from here see it all
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, base, bh, stride_t, offs_n, offs_m, offs_d, first, past, T,
                          SCALE_LOG2, True, BLOCK_M, IEEE)
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, base, bh, stride_t, offs_n, offs_m, offs_d, past, T, T,
                          SCALE_LOG2, False, BLOCK_M, IEEE)
    tl.store(DK + base + offs_n[:, None] * stride_t + offs_d[None, :], (dk * SCALE).to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + base + offs_n[:, None] * stride_t + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, K, V, base, stride_t, offs_m, offs_n, offs_d, start, end, T,
               SCALE_LOG2: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [start, end) (as _forward_blocks)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < T
        if MASKED:
            k = tl.load(K + base + cols[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V + base + cols[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(K + base + cols[:, None] * stride_t + offs_d[None, :])
            v = tl.load(V + base + cols[:, None] * stride_t + offs_d[None, :])
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * SCALE_LOG2 - lse[:, None])
        if MASKED:
            p = tl.where((offs_m[:, None] >= cols[None, :]) & col_ok[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    return dq


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, stride_b, stride_h, stride_t, n_heads, T,
                        SCALE_LOG2: tl.constexpr, SCALE: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    block_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = (bh // n_heads) * stride_b + (bh % n_heads) * stride_h
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    diagonal = block_m * BLOCK_M
    end = tl.minimum((block_m + 1) * BLOCK_M, T)
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, base, stride_t, offs_m, offs_n, offs_d, 0, diagonal, T, SCALE_LOG2,
                    False, BLOCK_N, IEEE)
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, base, stride_t, offs_m, offs_n, offs_d, diagonal, end, T, SCALE_LOG2,
                    True, BLOCK_N, IEEE)
    tl.store(DQ + base + offs_m[:, None] * stride_t + offs_d[None, :], (dq * SCALE).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


def _tiles(head_dim, T, dtype):
    """{kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}. The forward and dQ kernels need BLOCK_M
    a multiple of BLOCK_N (their unmasked blocks end where the diagonal starts). 16 x 16 for short
    sequences, which is also what keeps the interpreter tests fast. On an H100 in bfloat16, head dim
    64, 64 x 64 tiles with 3 pipeline stages were the fastest of 23 tilings tried for every kernel at
    T = 1024-4096 (README, "Speed"); float32 (exact products) and head dim 128 need more shared
    memory per tile, so they keep 2 stages and, at head dim 128, narrower key blocks."""
    if T <= 64:
        tile = (16, 16, 4, 2)
    elif dtype == torch.float32 or head_dim > 64:
        tile = (64, 64, 4, 2) if head_dim <= 64 else (64, 32, 4, 2)
    else:
        tile = (64, 64, 4, 3)
    return {"forward": tile, "dkdv": tile, "dq": tile}


def _launch(kernel, tile, blocks, bh, *args, **constants):
    block_m, block_n, warps, stages = tile
    kernel[(blocks, bh)](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **constants)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, D = q.shape
        if D not in (16, 32, 64, 128):
            raise ValueError(f"flash attention supports head_dim 16, 32, 64 or 128, not {D}")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty_like(q)
        lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        tiles = _tiles(D, T, q.dtype)
        scale = 1.0 / math.sqrt(D)
        _launch(_forward_kernel, tiles["forward"], triton.cdiv(T, tiles["forward"][0]), B * H,
                q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), H, T,
                SCALE_LOG2=scale * LOG2E, HEAD_DIM=D, IEEE=q.dtype == torch.float32)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        do = do.contiguous()
        tiles = _tiles(D, T, q.dtype)
        scale = 1.0 / math.sqrt(D)
        constants = dict(SCALE_LOG2=scale * LOG2E, SCALE=scale, HEAD_DIM=D, IEEE=q.dtype == torch.float32)
        strides = (q.stride(0), q.stride(1), q.stride(2), H, T)
        delta = torch.empty_like(lse)
        _delta_kernel[(triton.cdiv(T, 64), B * H)](o, do, delta, *strides, HEAD_DIM=D, BLOCK_M=64)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _launch(_backward_dkdv_kernel, tiles["dkdv"], triton.cdiv(T, tiles["dkdv"][1]), B * H,
                q, k, v, do, lse, delta, dk, dv, *strides, **constants)
        _launch(_backward_dq_kernel, tiles["dq"], triton.cdiv(T, tiles["dq"][0]), B * H,
                q, k, v, do, lse, delta, dq, *strides, **constants)
        return dq, dk, dv


def flash_attention(q, k, v):
    """Causal attention of (B, heads, T, head_dim) tensors; same result as
    F.scaled_dot_product_attention(q, k, v, is_causal=True)."""
    return FlashAttention.apply(q, k, v)
