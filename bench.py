"""
Training throughput, measured side by side in one run: eager vs torch.compile, float32 vs bf16
autocast, on the same model dims and batches. Prints a markdown table of tokens/s and the ratio to
eager float32, and writes results/bench.json.

    python bench.py                                  # the toy model of toy_continual.sh
    python bench.py --width=128 --depth=4 --block_size=128 --vocab_size=4096 --batch_size=32
"""
import sys
import time

import torch

from common import UserError, apply_overrides, fail, ntp_loss, pick_device, write_json
from model import GPT, GPTConfig

width = 128
depth = 2
head_dim = 16
block_size = 14
vocab_size = 19
batch_size = 256
warmup_steps = 5        # untimed steps first (compilation happens here)
timed_steps = 30
device = "auto"
out_json = "results/bench.json"


def train_tokens_per_second(compiled, bf16, dev):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size, block_size, width, depth, head_dim)).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if compiled else model
    x = torch.randint(0, vocab_size, (batch_size, block_size), device=dev)
    autocast = torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            loss = ntp_loss(step_model(x), x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.time()
    for _ in range(warmup_steps):
        step()
    warmup_seconds = time.time() - t0
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(timed_steps):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    return timed_steps * batch_size * block_size / (time.time() - t0), warmup_seconds


def main():
    dev = pick_device(device)
    print(f"model width {width} depth {depth} head_dim {head_dim}, batch {batch_size} x {block_size} tokens, "
          f"{torch.get_num_threads()} threads on {dev}")
    rows = {}
    for compiled in (False, True):
        for bf16 in (False, True):
            name = f"{'compiled' if compiled else 'eager'} {'bf16' if bf16 else 'fp32'}"
            rows[name] = train_tokens_per_second(compiled, bf16, dev)
            print(f"  {name}: {rows[name][0]:,.0f} tokens/s (first {warmup_steps} steps took {rows[name][1]:.1f}s)")
    base = rows["eager fp32"][0]
    print("\n| training step | tokens/s | vs eager fp32 | first steps (s) |\n|---|---|---|---|")
    for name, (tps, warm) in rows.items():
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f}x | {warm:.1f} |")
    write_json(out_json, {"device": dev, "threads": torch.get_num_threads(),
                          "config": {k: globals()[k] for k in ("width", "depth", "head_dim", "block_size",
                                                               "vocab_size", "batch_size")},
                          "train_tokens_per_second": {k: v[0] for k, v in rows.items()},
                          "compile_speedup": rows["compiled fp32"][0] / base})


if __name__ == "__main__":
    try:
        apply_overrides(globals(), sys.argv[1:])
        main()
    except UserError as e:
        fail(e)
