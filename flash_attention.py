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
def _forward_kernel(Q, K, V, O, LSE, stride_b, stride_h, stride_t, n_heads, T, scale_log2,
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
    end = tl.minimum((block_m + 1) * BLOCK_M, T)          # causal: no key after the last query
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < T
        k = tl.load(K + base + cols[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + base + cols[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2       # work in base 2: exp2 is cheaper than exp
        keep = (offs_m[:, None] >= cols[None, :]) & col_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
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
def _backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, stride_b, stride_h, stride_t, n_heads, T, scale_log2, scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
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
    for start_m in range(first, T, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        q = tl.load(Q + base + rows[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + base + rows[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2
        keep = (rows[:, None] >= offs_n[None, :]) & row_ok[:, None] & col_ok[None, :]
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
    tl.store(DK + base + offs_n[:, None] * stride_t + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + base + offs_n[:, None] * stride_t + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, stride_b, stride_h, stride_t, n_heads, T, scale_log2, scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
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
    end = tl.minimum((block_m + 1) * BLOCK_M, T)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < T
        k = tl.load(K + base + cols[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + base + cols[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2
        keep = (offs_m[:, None] >= cols[None, :]) & row_ok[:, None] & col_ok[None, :]
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ + base + offs_m[:, None] * stride_t + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


def _blocks(head_dim, T):
    """Tile sizes: 64 x 64 on the GPU (smaller for the largest heads, to fit shared memory);
    16 x 16 for short sequences, which is also what keeps the interpreter tests fast."""
    if T <= 64:
        return 16, 16
    return (64, 64) if head_dim <= 64 else (64, 32)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, D = q.shape
        if D not in (16, 32, 64, 128):
            raise ValueError(f"flash attention supports head_dim 16, 32, 64 or 128, not {D}")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty_like(q)
        lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        block_m, block_n = _blocks(D, T)
        scale = 1.0 / math.sqrt(D)
        ieee = q.dtype == torch.float32
        grid = (triton.cdiv(T, block_m), B * H)
        _forward_kernel[grid](q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), H, T, scale * LOG2E,
                              HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        do = do.contiguous()
        block_m, block_n = _blocks(D, T)
        scale = 1.0 / math.sqrt(D)
        ieee = q.dtype == torch.float32
        strides = (q.stride(0), q.stride(1), q.stride(2), H, T)
        delta = torch.empty_like(lse)
        _delta_kernel[(triton.cdiv(T, block_m), B * H)](o, do, delta, *strides, HEAD_DIM=D, BLOCK_M=block_m)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _backward_dkdv_kernel[(triton.cdiv(T, block_n), B * H)](
            q, k, v, do, lse, delta, dk, dv, *strides, scale * LOG2E, scale,
            HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee)
        _backward_dq_kernel[(triton.cdiv(T, block_m), B * H)](
            q, k, v, do, lse, delta, dq, *strides, scale * LOG2E, scale,
            HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee)
        return dq, dk, dv


def flash_attention(q, k, v):
    """Causal attention of (B, heads, T, head_dim) tensors; same result as
    F.scaled_dot_product_attention(q, k, v, is_causal=True)."""
    return FlashAttention.apply(q, k, v)
