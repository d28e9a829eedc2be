"""The hand-written Triton flash attention against a float64 reference: forward output and the
three input gradients. Without a GPU (CI) the kernels run on CPU tensors in Triton's interpreter,
at tiny sizes; on a CUDA machine the same tests run the compiled kernels on the GPU, and the
bfloat16 / real-size case at the end runs too (it needs a GPU; it is not part of CI's coverage)."""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are defined (module import)

pytest.importorskip("triton", reason="the kernel tests need triton (tests/requirements.txt installs it)")
from support.flash_attention import flash_attention  # noqa: E402


def reference(q, k, v):
    """Causal attention written out in float64: softmax(q k^T / sqrt(d) + mask) v."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.size(-2)
    scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def errors_against_float64(B, H, T, head_dim, dtype):
    """Run the kernel forward and backward on random inputs; returns the relative error of its
    output and of the three input gradients (q, k, v) against the float64 reference."""
    q, k, v = (torch.randn(B, H, T, head_dim, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = reference(q64, k64, v64)
    ref.backward(grad_out.double())
    grads = ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad))
    return relative_error(out, ref), [relative_error(ours, theirs) for ours, theirs in grads]


@pytest.mark.parametrize("T,head_dim", [(16, 16), (37, 16), (50, 32), (70, 16)])  # 37, 50, 70: not block multiples
def test_forward_and_gradients_match_float64(T, head_dim):
    torch.manual_seed(T)
    out_error, grad_errors = errors_against_float64(2, 2, T, head_dim, torch.float32)
    assert out_error < 1e-4
    assert all(e < 1e-4 for e in grad_errors)


def test_matches_pytorch_sdpa_in_the_model_layout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 24, 32, device=DEVICE) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert relative_error(flash_attention(q, k, v), expected) < 1e-5


def test_unsupported_head_dim_is_refused():
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(*(torch.randn(1, 1, 16, 24, device=DEVICE) for _ in range(3)))


@pytest.mark.parametrize("kv_heads", [0, 1], ids=["paper", "grouped-query"])
def test_the_model_runs_on_the_kernel_when_asked(monkeypatch, kv_heads):
    import model
    monkeypatch.setattr(model, "ATTENTION", "flash")   # the default is SDPA; the kernel runs on request
    torch.manual_seed(0)
    config = model.GPTConfig(vocab_size=50, block_size=32, width=64, depth=1, head_dim=32, n_kv_heads=kv_heads)
    gpt = model.GPT(config).to(DEVICE)
    x = torch.randint(0, 50, (2, 24), device=DEVICE)
    with_kernel = gpt(x)
    assert model._flash is not None and model._flash is not False   # passed its self-check
    monkeypatch.setattr(model, "ATTENTION", "sdpa")
    assert relative_error(with_kernel, gpt(x)) < 1e-5


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: bfloat16 at real sizes is too slow for the interpreter")
@pytest.mark.parametrize("T", [1024, 1000])
def test_bfloat16_at_real_sizes_on_the_gpu(T):
    torch.manual_seed(0)
    out_error, grad_errors = errors_against_float64(4, 8, T, 64, torch.bfloat16)
    assert out_error < 2e-2  # bfloat16 inputs: about 3 significant digits
    assert all(e < 5e-2 for e in grad_errors)


@pytest.mark.parametrize("T", [37, 70, 96])
def test_unequal_tiles_split_the_diagonal_correctly(monkeypatch, T):
    """The kernels skip the causal mask on blocks wholly below the diagonal; with query and key tiles
    of different sizes (as the GPU's bfloat16 tiles are) the diagonal must still be found exactly."""
    from support import flash_attention as module
    monkeypatch.setattr(module, "_tiles", lambda head_dim, T, dtype: {
        "forward": (32, 16, 4, 2), "dkdv": (16, 32, 4, 2), "dq": (32, 16, 4, 2)})
    torch.manual_seed(T)
    out_error, grad_errors = errors_against_float64(1, 2, T, 16, torch.float32)
    assert out_error < 1e-4
    assert all(e < 1e-4 for e in grad_errors)
