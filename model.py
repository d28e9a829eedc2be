"""
The one GPT definition of nanoreplay, in the architecture of the paper we reproduce
(Marek et al., "Forgetting in Language Models", arXiv 2605.26097):

- pre-norm blocks; RMSNorm *without* a learnable gain (eps 1e-6) on block inputs, on queries and
  keys (QK-norm, per head) and before the output head;
- rotary position embeddings (RoPE, theta 10_000) applied to q and k after QK-norm;
- MLP: Linear(D, 4D) -> tanh-approximate GELU -> Linear(4D, D);
- no biases anywhere, untied input and output embeddings;
- init: normal(0, D^-0.5) everywhere except the MLP down-projection, normal(0, (4D)^-0.5).

Naming: `width` is the residual width D, `depth` the number of blocks L, and `head_dim` the size of
one attention head. The number of heads is derived (`width // head_dim`). The paper's config calls
the head size "H", which is easy to misread as a head count; here nothing is called H.

Released models. The same GPT also runs Llama-family checkpoints (SmolLM2, Llama 3.2, Qwen3; see
convert.py) through a few switches in GPTConfig, all off by default: learnable RMSNorm gains, a
SwiGLU MLP of its own width, grouped-query attention (fewer key/value heads than query heads), tied
input/output embeddings, another RoPE base (and Llama 3's frequency scaling), QK-norm on or off.
"""
import math
import sys
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256   # longest sequence the model sees (RoPE table size)
    width: int = 256        # D, the residual stream width
    depth: int = 6          # L, the number of transformer blocks
    head_dim: int = 64      # size of one attention head; n_heads = width // head_dim
    # -- switches for released Llama-family models; the defaults are the paper's architecture, and a
    #    checkpoint saved before these existed loads with them
    n_heads: int = 0        # query heads; 0 = width // head_dim (Qwen3 has n_heads * head_dim != width)
    n_kv_heads: int = 0     # key/value heads, shared by groups of query heads (GQA); 0 = n_heads
    mlp: str = "gelu"       # "gelu": down(gelu(up x)); "swiglu": down(silu(gate x) * up x)
    mlp_width: int = 0      # hidden width of the MLP; 0 = 4 * width
    norm_gain: bool = False  # learnable RMSNorm gains (Llama) or a pure normalisation (the paper)
    norm_eps: float = 1e-6
    qk_norm: bool = True    # RMSNorm on every query and key head before RoPE
    rope_theta: float = 10_000.0
    rope_scaling: dict = None  # Llama 3's long-context frequency scaling: {"factor", "low_freq_factor", ...}
    tie_embeddings: bool = False  # the output head reuses the input embedding matrix

    def __post_init__(self):
        if not self.n_heads:
            if self.width % self.head_dim != 0:
                raise ValueError(f"width={self.width} is not a multiple of head_dim={self.head_dim}")
            self.n_heads = self.width // self.head_dim
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.mlp_width = self.mlp_width or 4 * self.width
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp={self.mlp!r} must be gelu or swiglu")

    def to_dict(self):
        return asdict(self)


class RMSNorm(nn.Module):
    """x / rms(x), times a learnable gain only where the model has one: the paper's RMSNorm has no
    gain (a pure normalisation, nothing to learn, no entry in the state dict), Llama's has."""

    def __init__(self, dim, config):
        super().__init__()
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(dim)) if config.norm_gain else None

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


# "sdpa": PyTorch's fused attention, the default: on an H100 it ran causal forward+backward faster
# than our kernel at every length tried (README, "Speed"); "flash": our Triton kernel (flash_attention.py)
ATTENTION = "sdpa"
_flash = None


def _flash_attention(device="cuda"):
    """flash_attention.flash_attention, or None where Triton is missing (it is optional) or where the
    kernel fails a one-time check against SDPA on this device (then a warning says so, once)."""
    global _flash
    if _flash is None:
        _flash = False
        try:
            from support.flash_attention import flash_attention
            generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG untouched
            q, k, v = (torch.randn(1, 2, 80, 64, device=device, generator=generator) for _ in range(3))
            # in float32 whatever the caller's autocast says (under bfloat16 autocast SDPA would round)
            with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
                expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                error = (flash_attention(q, k, v) - expected).abs().max()
            if error > 1e-3:
                raise RuntimeError(f"differs from SDPA by {error.item():.2e}")
            _flash = flash_attention
        except ImportError:
            pass
        except Exception as e:  # a GPU/Triton combination the kernel was not built for
            print(f"warning: flash attention unavailable ({type(e).__name__}: {e}); using SDPA",
                  file=sys.stderr)
    return _flash or None


def causal_attention(q, k, v, visible=None):
    """Causal self-attention, the single place attention is computed.

    q: (B, heads, Tq, head_dim), k and v: (B, heads, Tk, head_dim) with Tq <= Tk. The Tq queries are
    the *last* Tq positions of the Tk keys (this covers training, where Tq == Tk, and KV-cache
    decoding, where new queries attend to everything cached before them). Fixed-shape decoding
    instead passes the whole cache and `visible`, a (1, Tk) mask of the positions filled so far.
    """
    Tq, Tk = q.size(-2), k.size(-2)
    gqa = q.size(1) != k.size(1)  # grouped-query attention: each key/value head serves a group of queries
    if visible is not None:  # fixed-shape decoding: one query per row over the whole cache
        return decode_attention(q, k, v, visible)
    if Tq == Tk:
        if ATTENTION == "flash" and _flash_attention(q.device) is not None:
            if gqa:  # the kernel takes one key/value head per query head
                group = q.size(1) // k.size(1)
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            return _flash(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == 1:  # one new token may look at every cached position: no mask needed
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # a chunk of new queries on top of a cache: query i sits at absolute position Tk - Tq + i
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    k_pos = torch.arange(Tk, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, enable_gqa=gqa)


def decode_attention(q, k, v, visible):
    """One new query per row (Tq = 1) over the cache's keys, masked to the `visible` positions. Plain
    matmuls: for a single query they are ~1.3-2x faster on CPU than SDPA, whose fused kernels are
    built for many queries at once. Grouped-query attention is a reshape: each key/value head
    serves `group` query heads."""
    B, H, _, D = q.shape
    group = H // k.size(1)
    q = q.reshape(B, k.size(1), group, D)                           # (B, kv heads, group, D)
    scores = (q @ k.transpose(-2, -1)) * D ** -0.5                  # (B, kv heads, group, Tk)
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(dim=-1) @ v).reshape(B, H, 1, D)


def rope_tables(block_size, head_dim, theta=10_000.0, scaling=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling:
        inv_freq = llama3_scaled(inv_freq, **scaling)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3's RoPE frequency scaling: rotations slower than the original context (long
    wavelengths) are slowed by `factor`, fast ones are kept, and those in between are blended
    linearly in 1/wavelength, so the model reads positions beyond its original context."""
    wavelength = 2 * math.pi / inv_freq
    context = original_max_position_embeddings
    blend = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    scaled = torch.where(wavelength > context / low_freq_factor, inv_freq / factor, inv_freq)
    in_between = (wavelength <= context / low_freq_factor) & (wavelength >= context / high_freq_factor)
    return torch.where(in_between, blended, scaled)


def apply_rope(x, cos, sin):
    # rotate pairs (first half, second half) of every head by a position-dependent angle
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Preallocated keys and values for incremental decoding: one (B, key/value heads, max_length,
    head_dim) buffer per layer, filled left to right, allocated once (max_length: the longest
    sequence this cache will hold, at most block_size). `length` is how many positions hold valid
    entries. After `fix_shapes()`, decoding writes at `position`, a tensor, and attends over the
    whole buffer under a mask: every step then has the same shapes, whatever the position."""

    def __init__(self, config, batch_size, device, dtype, max_length=None):
        max_length = max_length or config.block_size
        shape = (batch_size, config.n_kv_heads, max_length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.depth)]
        self.length = 0
        self.positions = torch.arange(max_length, device=device)
        self.position = None

    def copy_to(self, batch_size, max_length):
        """A new cache of batch_size rows with room for max_length positions, every row holding this
        cache's entries (one row: a prompt shared by several continuations, computed once)."""
        shape = (batch_size, *self.k[0].shape[1:2], max_length, self.k[0].size(-1))
        copy = KVCache.__new__(KVCache)
        copy.k = [self.k[0].new_zeros(shape) for _ in self.k]
        copy.v = [self.v[0].new_zeros(shape) for _ in self.v]
        for mine, theirs in zip(self.k + self.v, copy.k + copy.v):
            theirs[:, :, :self.length] = mine[:, :, :self.length]
        copy.length, copy.position = self.length, None
        copy.positions = torch.arange(max_length, device=self.positions.device)
        return copy

    def fix_shapes(self):
        self.position = torch.tensor([self.length], device=self.positions.device)

    def update(self, layer, k, v):
        """Store new keys/values; returns (keys, values, visible mask or None) to attend over."""
        if self.position is not None:  # (under autocast k and v come in its dtype)
            self.k[layer].index_copy_(2, self.position, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.position, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer], (self.positions <= self.position).view(1, -1)
        start, end = self.length, self.length + k.size(-2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], None


class Attention(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        c = config
        # one fused projection: n_heads query heads, then n_kv_heads key heads and value heads
        self.qkv = nn.Linear(c.width, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.out = nn.Linear(c.n_heads * c.head_dim, c.width, bias=False)
        if c.qk_norm:  # QK-norm keeps attention logits bounded
            self.q_norm, self.k_norm = RMSNorm(c.head_dim, c), RMSNorm(c.head_dim, c)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        c = self.config
        q, k, v = self.qkv(x).split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim,
                                     c.n_kv_heads * c.head_dim], dim=2)
        heads = lambda t: t.view(B, T, -1, c.head_dim).transpose(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        visible = None
        if cache is not None:
            k, v, visible = cache.update(self.layer_index, k, v)
        y = causal_attention(q, k, v, visible)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(config.width, config.mlp_width, bias=False)
        self.up = nn.Linear(config.width, config.mlp_width, bias=False)
        self.down = nn.Linear(config.mlp_width, config.width, bias=False)

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.attn_norm = RMSNorm(config.width, config)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.width, config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.depth)])
        self.norm_out = RMSNorm(config.width, config)
        self.unembed = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.unembed.weight = self.embed.weight
        cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.width ** -0.5
        for name, p in self.named_parameters():
            if p.ndim == 1:  # RMSNorm gains start at 1: the plain normalisation
                nn.init.ones_(p)
            else:  # the MLP down-projection reads a wider input (4D), so it gets that width's scale
                down = name.endswith("mlp.down.weight")
                nn.init.normal_(p, mean=0.0, std=self.config.mlp_width ** -0.5 if down else std)

    def forward(self, idx, cache=None):
        """idx: (B, T) token ids -> logits (B, T, vocab_size). With a cache, idx holds only the new
        tokens, which continue the sequence at position cache.length."""
        return self.unembed(self.hidden(idx, cache))

    def hidden(self, idx, cache=None):
        """The final (normalised) hidden states (B, T, width), from which unembed gives the logits:
        scoring needs the logits at a few positions only, and a large vocabulary makes the others
        costly (SmolLM2's output layer is a fifth of its forward pass)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.norm_out(x)

    def decode_step(self, token, cache):
        """Logits (B, V) for one new token per row, token (B, 1), at position cache.position. All
        shapes are fixed, so this step compiles once (and becomes a CUDA graph on GPU)."""
        cos = self.rope_cos.index_select(0, cache.position)
        sin = self.rope_sin.index_select(0, cache.position)
        x = self.embed(token)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        return self.unembed(self.norm_out(x))[:, -1]

    def compiled_decode_step(self):
        """decode_step compiled once per model (CUDA graphs on GPU: "reduce-overhead")."""
        if getattr(self, "_compiled_step", None) is None:
            mode = "reduce-overhead" if self.embed.weight.is_cuda else None
            self._compiled_step = torch.compile(self.decode_step, mode=mode, dynamic=False)
        return self._compiled_step

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, compile_step=False):
        """Continue every row of idx (B, T0) by max_new_tokens tokens, decoding one token at a time
        with a KV cache. temperature=0 means greedy; top_k=None samples from the full distribution
        (what self-generated replay wants: the model's own distribution, untruncated).
        compile_step=True compiles the fixed-shape decode step (pays off for long sampling runs)."""
        total = idx.size(1) + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(f"prompt + new tokens = {total} exceeds block_size={self.config.block_size}")
        device = idx.device.type  # under autocast (bfloat16 sampling) the cache holds autocast's dtype
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else self.embed.weight.dtype)
        cache = KVCache(self.config, idx.size(0), idx.device, dtype, max_length=total)
        out = torch.empty(idx.size(0), total, dtype=idx.dtype, device=idx.device)
        out[:, :idx.size(1)] = idx
        logits = self(idx, cache)[:, -1]          # the prompt in one pass
        cache.fix_shapes()
        step = self.compiled_decode_step() if compile_step else self.decode_step
        for pos in range(idx.size(1), total):
            out[:, pos] = sample_next(logits, temperature, top_k, generator)
            if pos + 1 < total:
                logits = step(out[:, pos:pos + 1], cache)
                cache.position += 1
        return out


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Pick one token per row from (B, V) logits. A row's token is where one uniform number falls in
    its cumulative distribution (float64, so even the rarest tokens keep their exact share). This is
    exact sampling, and it draws one random number per row where torch.multinomial draws V of them:
    those draws were a third of all decoding time on CPU."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    u = row_uniforms(logits.size(0), generator, logits.device)
    cdf = F.softmax(logits, dim=-1).to(u.dtype).cumsum(dim=-1)
    u = u * cdf[:, -1:]
    # the first position whose cumulative probability exceeds u: token i has an interval of width p_i
    return torch.searchsorted(cdf, u, right=True).clamp_(max=logits.size(-1) - 1).squeeze(-1)


def skip_draws(rows, steps, generator, device, temperature=1.0):
    """Move generator on exactly as `steps` calls of sample_next on `rows` rows would (one uniform
    number per row each), without sampling: a process that samples only some chunks of a corpus
    passes over the others' draws and gets the very numbers one process would."""
    if temperature == 0:
        return
    for _ in range(steps):
        row_uniforms(rows, generator, device)


def row_uniforms(rows, generator, device):
    """sample_next's random draw: one uniform number per row, in float64 (float32 on MPS, which has
    no float64). skip_draws makes the same calls, so the two cannot drift apart."""
    wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
    return torch.rand(rows, 1, generator=generator, device=device, dtype=wide)


def paper_parameter_count(depth, width, vocab_size):
    """The paper's 12*L*D^2 + D*V: attention (4 D^2) and MLP (8 D^2) weights per block plus one
    D x V embedding. The paper measures tokens-per-parameter against it, and so do we."""
    return 12 * depth * width ** 2 + width * vocab_size


def count_parameters(model):
    """Returns (actual parameter count, paper_parameter_count). The actual count also includes the
    second (untied) embedding; a tied embedding is counted once."""
    c = model.config
    actual = sum(p.numel() for p in model.parameters())
    return actual, paper_parameter_count(c.depth, c.width, c.vocab_size)
