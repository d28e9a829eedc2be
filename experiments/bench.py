"""
Speed, measured side by side in one run on the same model dims:

1. training step tokens/s: our hot path (torch.compile + bf16 autocast) against a plain
   nanoGPT-style baseline (eager, float32), plus the two in between, attention through PyTorch's
   SDPA (on CUDA also the hot path with our Triton flash attention); also the finetuning step with
   the KL replay term;
2. sampling tokens/s: KV-cache decoding (model.generate), eager and with its compiled fixed-shape
   decode step, against recomputing the whole prefix for every new token; and sampling against a
   teacher-forced forward pass of the same model, batch and length ("sample_vs_forward": a decode
   step does the same work per token, so 1.0 is the goal) for the toy model, the CPU-mini text model
   and SmolLM2-135M (convert.py's checkpoint, or its shape with random weights), at the batch sizes
   the scripts sample with;
3. the hardware's peak, measured here: a large float32 and bfloat16 matrix product, and every
   training step (toy, text, SmolLM2) and sampling row as a fraction of the peak of the dtype it runs
   in (model FLOP utilisation, "MFU": the model's matmul FLOPs per second / the product's);
4. on CUDA only: causal attention forward+backward, flash (ours) vs SDPA vs naive (materialised
   T x T), at T = 256 ... 4096 with head dim 64, in ms and TFLOP/s.

Prints markdown tables and writes results/bench.json (train_speedup_vs_baseline,
sample_speedup_vs_naive, sample_vs_forward, ...).

    python experiments/bench.py                          # 4 layers, D=128, T=128, V=4096 (the CPU-mini text model)
    python experiments/bench.py --width=128 --depth=2 --head_dim=16 --block_size=14 --vocab_size=19 --batch_size=256
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: model.py, support/

import model as model_module
from model import GPT, GPTConfig
from objective import kl_loss, ntp_loss
from support.checkpoint import load_checkpoint
from support.config import pick_device, pick_dtype, run
from support.files import write_json

width = 128
depth = 4
head_dim = 32
block_size = 128
vocab_size = 4096
batch_size = 32
warmup_steps = 3         # untimed steps first (compilation happens here)
timed_steps = 30
sample_batch = 64          # replay corpora are sampled in large batches (sample_replay.py: 1024)
new_tokens = 128
sample_repeats = 3         # sample_vs_forward: the median of this many timed runs of each
smollm2_checkpoint = "out/smollm2/ckpt.pt"  # convert.py's output; without it: SmolLM2's shape, random weights
profile = False            # print where the SmolLM2 training step's time goes (torch.profiler, top operators)
device = "auto"
out_json = "results/bench.json"

# SmolLM2-135M's architecture (as convert.py reads it from the GGUF metadata), for the smollm2 row when
# convert.py's checkpoint is absent
SMOLLM2_SHAPE = GPTConfig(vocab_size=49152, block_size=8192, width=576, depth=30, head_dim=64, n_kv_heads=3,
                          mlp="swiglu", mlp_width=1536, norm_gain=True, norm_eps=1e-5, qk_norm=False,
                          rope_theta=100_000.0, tie_embeddings=True)


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, dev, warmup, steps):
    """Seconds per call after `warmup` untimed calls, and the seconds the warmup took."""
    t0 = time.time()
    for _ in range(warmup):
        fn()
    sync(dev)
    warm = time.time() - t0
    t0 = time.time()
    for _ in range(steps):
        fn()
    sync(dev)
    return (time.time() - t0) / steps, warm


def new_model(dev, block=None, config=None):
    torch.manual_seed(0)
    config = config or GPTConfig(vocab_size, block or block_size, width, depth, head_dim)
    return GPT(config).to(dev)


def flops_per_token(config, T, training=True):
    """Matmul FLOPs per token of a (B, T) forward (x3 for forward + backward): 2 per weight of every
    matrix a token passes through (the blocks' and the unembedding; the embedding is a lookup), and
    the attention's scores and weighted sum, 2 * 2 * T * n_heads * head_dim per block, halved as
    causal. Sampling with a KV cache does the forward's work per new token."""
    matrices = sum(p.numel() for name, p in GPT(config).named_parameters()
                   if name.startswith("blocks.") and p.dim() == 2) + config.vocab_size * config.width
    forward = 2 * matrices + 2 * config.depth * T * config.n_heads * config.head_dim
    return 3 * forward if training else forward


def matmul_peak(dev, dtype):
    """FLOP/s of one large square matrix product in dtype on random data (8192 on a GPU, 2048 on a
    CPU): the practical peak to measure a model against, the median of up to 5 timings (fewer where
    one product is slow: bf16 on a CPU without native support takes seconds)."""
    n = 8192 if dev.startswith("cuda") else 2048
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    first = timed(lambda: a @ b, dev, 1, 1)[0]
    repeats = max(1, min(5, int(3 / first)))
    times = sorted(timed(lambda: a @ b, dev, 0, max(1, min(10, int(0.5 / first))))[0] for _ in range(repeats))
    return 2 * n ** 3 / times[len(times) // 2]


def train_step_speed(dev, compiled, bf16, attention, with_kl=False, config=None, batch=None, steps=None, warmup=None):
    """Tokens/s of pretrain.py's step (or finetune.py's step with KL replay: the model on a new and a
    replay batch, the frozen reference on the replay batch); by default on the dims at the top."""
    default, model_module.ATTENTION = model_module.ATTENTION, attention
    model = new_model(dev, config=config)
    reference = new_model(dev, config=config).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if compiled else model
    batch, T, V = batch or batch_size, model.config.block_size, model.config.vocab_size
    x = torch.randint(0, V, (batch, T), device=dev)
    replay = torch.randint(0, V, (batch, T), device=dev)
    autocast = torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            loss = ntp_loss(step_model(x), x)
            if with_kl:
                with torch.no_grad():
                    reference_logits = reference(replay)
                loss = loss + kl_loss(step_model(replay), reference_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, warm = timed(step, dev, warmup or warmup_steps, steps or timed_steps)
    model_module.ATTENTION = default
    tokens = batch * T * (2 if with_kl else 1)
    return tokens / seconds, warm


# the models the scripts train and sample, at the batches they use on a CPU (on a GPU: more sequences)
TOY = GPTConfig(vocab_size=19, block_size=14, width=128, depth=2, head_dim=16)
TEXT = GPTConfig(vocab_size=4096, block_size=128, width=128, depth=4, head_dim=32)


def sampling_speed(dev):
    """Tokens/s of KV-cache decoding, eager and with the compiled fixed-shape step (a CUDA graph on
    GPU), and of naive prefix recomputation, for sample_batch sequences of new_tokens new tokens."""
    model = new_model(dev, block=new_tokens + 1).eval()
    prompt = torch.zeros(sample_batch, 1, dtype=torch.long, device=dev)

    @torch.no_grad()
    def naive():
        seq = prompt
        for _ in range(new_tokens):
            probs = F.softmax(model(seq)[:, -1].float(), dim=-1)
            seq = torch.cat([seq, torch.multinomial(probs, 1)], dim=1)
        return seq

    cached_s, _ = timed(lambda: model.generate(prompt, new_tokens), dev, 1, 3)
    compiled_s, _ = timed(lambda: model.generate(prompt, new_tokens, compile_step=True), dev, 1, 3)
    naive_s, _ = timed(naive, dev, 1, 2)
    tokens = sample_batch * new_tokens
    return tokens / cached_s, tokens / compiled_s, tokens / naive_s


def sample_vs_forward(dev):
    """{model: (sampling tokens/s, forward tokens/s, forward FLOPs per token)} for B sequences of T
    tokens: model.generate from
    one prompt token against one teacher-forced forward pass over (B, T) tokens, same dtype. The
    batches are the scripts': toy_continual.sh samples 4096 at a time, english_spanish.sh 512,
    released_model.py 256."""
    models = {"toy": (TOY, 4096, 14), "text": (TEXT, 512, 128), "smollm2": (smollm2_checkpoint, 256, 128)}
    speeds = {}
    for name, (config, batch, length) in models.items():
        torch.manual_seed(0)
        if isinstance(config, GPTConfig):
            model = GPT(config).to(dev).eval()
        elif os.path.exists(config):
            model = load_checkpoint(config, dev)[0].eval()
        else:  # the cost of a step does not depend on the weights' values, only on the architecture
            print(f"{name}: {config} not found (python experiments/convert.py makes it): SmolLM2-135M's "
                  "shape, random weights")
            model = GPT(SMOLLM2_SHAPE).to(dev).eval()
        x = torch.randint(0, model.config.vocab_size, (batch, length), device=dev)

        def forward():
            with torch.no_grad():
                model(x)

        def sample():
            model.generate(x[:, :1], length - 1, generator=torch.Generator(device=dev).manual_seed(0))

        tokens = batch * length
        rates = []
        for fn in (sample, forward):  # the median of sample_repeats timed runs, after one untimed
            fn()
            times = sorted(timed(fn, dev, 0, 1)[0] for _ in range(sample_repeats))
            rates.append(tokens / times[len(times) // 2])
        speeds[name] = (*rates, flops_per_token(model.config, length, training=False))
    return speeds


def smollm2_config():
    """SmolLM2-135M's architecture: from convert.py's checkpoint where there is one."""
    if os.path.exists(smollm2_checkpoint):
        return GPTConfig(**load_checkpoint(smollm2_checkpoint)[1]["model_config"])
    return SMOLLM2_SHAPE


def where_the_time_goes(dev, config, batch, bf16):
    """The SmolLM2 training step's top operators by their own time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    model = new_model(dev, config=config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (batch, config.block_size), device=dev)

    def step():
        with torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            ntp_loss(model(x), x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(2):
            step()
    sort = "self_cuda_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=40))


def attention_speeds(dev):
    """CUDA: forward+backward milliseconds of flash vs SDPA vs naive causal attention, bf16."""
    rows = []
    flash = model_module._flash_attention(dev)
    for T in (256, 512, 1024, 2048, 4096):
        B, H = max(1, 16384 // T), 8
        q, k, v = (torch.randn(B, H, T, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        mask = torch.ones(T, T, dtype=torch.bool, device=dev).triu(1)

        def naive():
            s = (q @ k.transpose(-1, -2)) / 8.0
            return torch.softmax(s.masked_fill(mask, float("-inf")).float(), -1).to(q.dtype) @ v

        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), "naive": naive}
        if flash is not None:
            fns["flash"] = lambda: flash(q, k, v)
        # FlashAttention-2's convention: a causal forward does 2 B H T^2 d FLOPs, the backward 2.5 times that
        flops = 3.5 * 2 * B * H * T * T * 64
        row = {"T": T}
        for name, fn in fns.items():
            row[name] = timed(lambda: fn().sum().backward(), dev, 3, 20)[0] * 1000
            row[f"{name}_tflops"] = flops / row[name] / 1e9
        rows.append(row)
    return rows


def main():
    dev = pick_device(device)
    on_cuda = dev.startswith("cuda")
    hot_attention = model_module.ATTENTION  # the default: PyTorch's SDPA
    print(f"model: width {width}, depth {depth}, head_dim {head_dim}, block {block_size}, vocab {vocab_size}; "
          f"batch {batch_size}; device {dev}" + ("" if on_cuda else f" ({torch.get_num_threads()} threads)"))

    variants = {  # name: (compiled, bf16, attention)
        "baseline: eager fp32 SDPA": (False, False, "sdpa"),
        "eager bf16": (False, True, hot_attention),
        "compiled fp32": (True, False, hot_attention),
        "hot path: compiled bf16": (True, True, hot_attention),
    }
    if on_cuda:
        variants["compiled bf16, our flash kernel"] = (True, True, "flash")
    # the peak to measure against: a large matrix product in each dtype, timed here
    peaks = {"float32": matmul_peak(dev, torch.float32), "bfloat16": matmul_peak(dev, torch.bfloat16)}
    print("matrix product peak: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items())
          + ("" if on_cuda else f"; CPU capability {torch.backends.cpu.get_cpu_capability()}"))
    bf16_fast = pick_dtype("auto", dev) == "bfloat16"

    def mfu(tokens_per_second, config, bf16, training=True):
        return tokens_per_second * flops_per_token(config, config.block_size, training) / \
            peaks["bfloat16" if bf16 else "float32"]

    bench_config = new_model("cpu").config
    train = {name: train_step_speed(dev, *v) for name, v in variants.items()}
    base = train["baseline: eager fp32 SDPA"][0]
    print("\n| training step | tokens/s | vs baseline | MFU | first steps (s) |\n|---|---|---|---|---|")
    for name, (tps, warm) in train.items():
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f}x | {mfu(tps, bench_config, variants[name][1]):.1%} "
              f"| {warm:.1f} |")

    # the training step of each model the scripts train, as they run it here: eager on a CPU (compiled
    # on CUDA), in float32 and, where this machine multiplies in it fast, bf16 (finetune.py's step
    # with KL replay for SmolLM2, at released_verilog.py's CPU batch of 8 + 8 windows of 64 tokens;
    # its MFU leaves out the frozen reference's forward pass on the replay batch: a lower bound)
    smollm2 = smollm2_config()
    steps = {"toy": (TOY, 192, False), "text": (TEXT, 32, False),
             "smollm2": (GPTConfig(**{**smollm2.to_dict(), "block_size": 64}), 8, True)}
    model_mfu = {}
    print("\n| model | dtype | training tokens/s | MFU |\n|---|---|---|---|")
    for name, (config, batch, with_kl) in steps.items():
        for bf16 in ([False, True] if bf16_fast else [False]):
            slow = name == "smollm2" and not on_cuda   # seconds a step: fewer of them
            tps = train_step_speed(dev, on_cuda, bf16, hot_attention, with_kl, config, batch,
                                   steps=3 if slow else None, warmup=1 if slow else None)[0]
            dtype = "bfloat16" if bf16 else "float32"
            model_mfu[f"{name}/{dtype}"] = {"tokens_per_second": tps, "mfu": mfu(tps, config, bf16)}
            print(f"| {name} | {dtype} | {tps:,.0f} | {model_mfu[f'{name}/{dtype}']['mfu']:.1%} |")
    if not bf16_fast:
        print("(no bf16 rows: this machine multiplies in bf16 more slowly than in float32)")
    if profile:
        where_the_time_goes(dev, steps["smollm2"][0], steps["smollm2"][1], bf16_fast)

    kl_base = train_step_speed(dev, False, False, "sdpa", with_kl=True)[0]
    kl_hot = train_step_speed(dev, True, True, hot_attention, with_kl=True)[0]
    print(f"\nfinetuning step with KL replay: baseline {kl_base:,.0f} tokens/s, hot path {kl_hot:,.0f} "
          f"tokens/s ({kl_hot / kl_base:.2f}x)")

    cached, compiled, naive = sampling_speed(dev)
    print(f"\nsampling {sample_batch} x {new_tokens} new tokens: KV cache {cached:,.0f} tokens/s "
          f"({cached / naive:.1f}x), compiled decode step {compiled:,.0f} tokens/s "
          f"({compiled / naive:.1f}x), naive prefix recomputation {naive:,.0f} tokens/s")

    ratios = sample_vs_forward(dev)
    print("\n| model | sampling tokens/s | forward tokens/s | sampling / forward | sampling MFU | forward MFU |"
          "\n|---|---|---|---|---|---|")
    for name, r in ratios.items():
        print(f"| {name} | {r[0]:,.0f} | {r[1]:,.0f} | {r[0] / r[1]:.2f}x | {r[0] * r[2] / peaks['float32']:.1%} "
              f"| {r[1] * r[2] / peaks['float32']:.1%} |")

    report = {
        "device": torch.cuda.get_device_name() if on_cuda else f"cpu, {torch.get_num_threads()} threads",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
        "train_mfu": {name: mfu(v[0], bench_config, variants[name][1]) for name, v in train.items()},
        "model_train": model_mfu,
        "config": {k: globals()[k]
                   for k in ("width", "depth", "head_dim", "block_size", "vocab_size", "batch_size")},
        "train_tokens_per_second": {name: v[0] for name, v in train.items()},
        "train_speedup_vs_baseline": train["hot path: compiled bf16"][0] / base,
        "finetune_kl_speedup_vs_baseline": kl_hot / kl_base,
        "sample_tokens_per_second": {"kv_cache": cached, "kv_cache_compiled_step": compiled, "naive": naive},
        "sample_speedup_vs_naive": cached / naive,
        "sample_compiled_speedup_vs_naive": compiled / naive,
        "sample_vs_forward": {k: None if r is None else r[0] / r[1] for k, r in ratios.items()},
        "sample_vs_forward_tokens_per_second": {k: None if r is None else {"sample": r[0], "forward": r[1]}
                                                for k, r in ratios.items()},
        "sample_mfu": {k: r[0] * r[2] / peaks["float32"] for k, r in ratios.items()},
    }
    if on_cuda:
        rows = attention_speeds(dev)
        print("\n| T | flash fwd+bwd ms (TFLOP/s) | SDPA ms (TFLOP/s) | naive ms (TFLOP/s) | flash vs SDPA |"
              "\n|---|---|---|---|---|")
        for r in rows:
            cells = [f"{r[k]:.3f} ({r[k + '_tflops']:.0f})" if k in r else "-" for k in ("flash", "sdpa", "naive")]
            print(f"| {r['T']} | {' | '.join(cells)} | {r['sdpa'] / r.get('flash', float('nan')):.2f}x |")
        report["attention_ms"] = rows
    write_json(out_json, report)
    print(f"\nwrote {out_json}")


if __name__ == "__main__":
    run(main, globals())
