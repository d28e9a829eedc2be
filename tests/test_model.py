"""The GPT definition: architecture facts, KV-cache decoding, parameter counting."""
import pytest
import torch
import torch.nn.functional as F

from conftest import greedy_by_recomputing
from model import GPT, GPTConfig, KVCache, count_parameters, decode_attention, sample_next


def tiny(vocab_size=23, block_size=16, width=32, depth=2, head_dim=8, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, width=width, depth=depth, head_dim=head_dim)).eval()


def test_head_count_is_derived_from_width_and_head_dim():
    config = GPTConfig(width=256, head_dim=64)
    assert config.n_heads == 4  # the paper's "H=64" is a head size: D=256 means 4 heads
    with pytest.raises(ValueError):
        GPTConfig(width=100, head_dim=64)


def test_no_biases_and_untied_embeddings():
    model = tiny()
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.embed.weight.data_ptr() != model.unembed.weight.data_ptr()


def test_init_scales_follow_the_paper():
    model = tiny(width=256, depth=2, head_dim=64, vocab_size=4096)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(256 ** -0.5, rel=0.02)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(1024 ** -0.5, rel=0.02)
    assert model.embed.weight.std().item() == pytest.approx(256 ** -0.5, rel=0.02)


def test_model_is_causal():
    model = tiny()
    x = torch.randint(0, 23, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 23  # change the future
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :7], model(y)[:, :7], atol=1e-6)


def model_tokens_and_full_logits():
    """A tiny model, three rows of 16 tokens, and the logits of one full forward pass over them."""
    model = tiny()
    x = torch.randint(0, 23, (3, 16))
    with torch.no_grad():
        return model, x, model(x)


def test_kv_cache_decoding_matches_full_forward():
    model, x, full = model_tokens_and_full_logits()
    cache = KVCache(model.config, 3, "cpu", torch.float32)
    with torch.no_grad():
        pieces = [model(x[:, :5], cache)]                      # a prompt chunk
        pieces += [model(x[:, t:t + 1], cache) for t in range(5, 12)]  # one token at a time
        pieces.append(model(x[:, 12:], cache))                 # a chunk on top of a cache
    incremental = torch.cat(pieces, dim=1)
    assert (incremental - full).abs().max().item() < 1e-5


def test_generate_greedy_matches_recomputing_the_prefix():
    model = tiny()
    prompt = torch.randint(0, 23, (4, 3))
    assert torch.equal(model.generate(prompt, 10, temperature=0), greedy_by_recomputing(model, prompt, 10))


def test_sampling_is_deterministic_given_a_generator_seed():
    model = tiny()
    prompt = torch.zeros(8, 1, dtype=torch.long)
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(1))
    c = model.generate(prompt, 12, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_restricts_samples_to_the_k_most_likely_tokens():
    model = tiny()
    prompt = torch.zeros(64, 1, dtype=torch.long)
    out = model.generate(prompt, 1, top_k=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        allowed = model(prompt)[:, -1].topk(2).indices
    assert (out[:, 1:] == allowed).any(dim=1).all()


def test_generate_refuses_to_run_past_block_size():
    model = tiny(block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 5)


def test_parameter_count_reports_actual_and_paper_formula():
    model = tiny(vocab_size=4096, width=256, depth=6, head_dim=64)
    actual, paper = count_parameters(model)
    assert paper == 12 * 6 * 256 ** 2 + 256 * 4096 == 5_767_168  # "5.8M" in the paper
    # the formula leaves out the second (untied) embedding matrix, nothing else
    assert actual == paper + 256 * 4096


def test_fixed_shape_decode_step_matches_full_forward_logits():
    model, x, full = model_tokens_and_full_logits()
    cache = KVCache(model.config, 3, "cpu", torch.float32)
    with torch.no_grad():
        model(x[:, :4], cache)
        cache.fix_shapes()
        for t in range(4, 16):
            step_logits = model.decode_step(x[:, t:t + 1], cache)
            cache.position += 1
            assert (step_logits - full[:, t]).abs().max().item() < 1e-5


LLAMA_SWITCHES = dict(n_heads=4, n_kv_heads=2, mlp="swiglu", mlp_width=48, norm_gain=True, qk_norm=False,
                      rope_theta=1e5, tie_embeddings=True)


@pytest.mark.parametrize("switches", [{}, LLAMA_SWITCHES], ids=["paper", "llama"])
def test_compiled_decode_step_generates_the_same_tokens(switches):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=23, block_size=16, width=32, depth=2, head_dim=8, **switches)).eval()
    prompt = torch.randint(0, 23, (4, 2))
    eager = model.generate(prompt, 12, generator=torch.Generator().manual_seed(3))
    compiled = model.generate(prompt, 12, generator=torch.Generator().manual_seed(3), compile_step=True)
    assert torch.equal(eager, compiled)


def test_sampling_draws_each_token_with_its_softmax_probability():
    # one uniform number per row inverts the cumulative distribution; the frequencies over 400k
    # rows must match the float64 softmax, rare tokens included, and an impossible token never appears
    logits = torch.tensor([2.0, 0.0, -1.0, -6.0, 1.0, float("-inf"), -9.0, 0.5])
    draws = sample_next(logits.expand(400_000, -1), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=8).double()
    probs = F.softmax(logits.double(), dim=-1)
    expected = probs * len(draws)
    sigma = (expected * (1 - probs)).sqrt()
    assert counts[5] == 0
    assert ((counts - expected).abs() <= 5 * sigma + 1).all(), (counts, expected)
    chi2 = ((counts - expected) ** 2 / expected.clamp(min=1e-9))[probs > 0].sum()
    assert chi2 < 30  # 6 degrees of freedom: 30 is far in the tail (p < 1e-4)


def test_decode_attention_matches_sdpa_with_grouped_heads_and_a_mask():
    # the decoding path's plain-matmul attention against PyTorch's SDPA, in float64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 10, 16, generator=g, dtype=torch.float64) for _ in range(2))
    visible = (torch.arange(10) <= 6).view(1, -1)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, visible), expected, rtol=1e-12, atol=1e-12)
