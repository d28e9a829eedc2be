"""
Stage 1: pretrain a GPT from scratch, to saturation, on one dataset or a mixture.

    python pretrain.py                                   # toy: 2-layer model on the `add` task
    python pretrain.py --datasets=arithmetic/add,arithmetic/sort --mixture=0.5,0.5
    python pretrain.py --max_steps=500 --out_dir=out/quick

Every constant below can be overridden with --key=value. The run writes out_dir/ckpt.pt (weights,
model config, data metadata, and the optimizer / generator state to --resume from) at every
evaluation, atomically, and out_dir/log.jsonl (one line per evaluation). Several processes:
    torchrun --standalone --nproc_per_node=2 pretrain.py ...   (gloo on CPU, nccl on CUDA; same global batch)
"""
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (LOG_NAMES, Dataset, UserError, append_jsonl, check_compatible, check_diverged,
                    check_short_names, check_training_settings, claim_out_dir, config_snapshot, dataset_files,
                    evaluate_on, from_rank0, global_mean, input_fingerprints, load_for_resume, lr_at, max_weight,
                    pick_device, progress_bar, rank0_only, restore_rng, rng_state, run, run_end,
                    sample_mixture, save_checkpoint, set_seed, setup_distributed, shard, prepare_log)
from model import GPT, GPTConfig, count_parameters
from objective import ntp_loss

# -- I/O
out_dir = "out/pretrain_add"
datasets = "arithmetic/add"      # comma-separated dataset names under data/
mixture = ""                     # comma-separated fractions, same order as datasets; "" = equal shares
eval_datasets = ""               # extra datasets to evaluate (not train on), e.g. tasks still to come
# -- model (the toy default; the paper's text model is width=256 depth=6 head_dim=64 block_size=256)
width = 128                      # D, residual width
depth = 2                        # L, number of blocks
head_dim = 16                    # size of one attention head (heads = width // head_dim)
block_size = 0                   # 0 = the row length of toy data, else 256 for text
# -- optimisation (AdamW as in the paper: b1 0.9, weight decay 0.02 on every parameter)
batch_size = 256
learning_rate = 3e-3
warmup_steps = 100
schedule = "cosine"              # "constant" after warmup, or "cosine" decay to min_lr at the last step
min_lr = 0.0
beta1 = 0.9
beta2 = 0.99
weight_decay = 0.02
# -- when to stop: the first limit reached wins (0 = no such limit)
max_steps = 800
max_tokens = 0
tokens_per_param = 0.0           # tokens / (12 L D^2 + D V), the paper's saturation axis
target_val_loss = 0.0            # stop once the mean validation loss is at or below this
target_accuracy = 0.0            # toy tasks: stop once every dataset's greedy accuracy reaches this
cooldown_steps = 0               # with a target: once reached, this many more steps with the learning rate
                                 # falling linearly to 0 (settles a task learned at a high rate)
# -- evaluation
eval_interval = 100
eval_sequences = 1024            # validation sequences per dataset for loss (and accuracy on toy tasks)
# -- system
device = "auto"                  # "auto" = cuda if available, else cpu
compile = False                  # torch.compile the training step (measured: see README)
resume = False                   # continue from out_dir/ckpt.pt (same settings and inputs) instead of starting over
overwrite = False                # a fresh run into a folder holding another run's outputs replaces them
dtype = "float32"                # "bfloat16" = autocast matmuls to bf16
seed = 1337

SETTINGS = [k for k in list(globals()) if not k.startswith("_") and isinstance(globals()[k], (int, float, str, bool))]


def main():
    rank, world_size, dev = setup_distributed(pick_device(device))
    is_main = rank == 0
    rng = set_seed(seed)
    names = [n for n in datasets.split(",") if n]
    data = [Dataset(n) for n in names]
    fractions = [float(f) for f in mixture.split(",")] if mixture else [1.0 / len(data)] * len(data)
    if len(fractions) != len(data) or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise UserError(f"--mixture={mixture!r} must give one non-negative fraction per dataset, summing to 1")
    tokenizers = {d.meta["tokenizer"] for d in data}
    if len(tokenizers) > 1:
        raise UserError(f"datasets {names} come from different tokenizers {sorted(tokenizers)}: re-prepare them together")
    row_lens = {d.row_len for d in data}
    if len(row_lens) > 1:
        raise UserError(f"datasets {names} mix row lengths {row_lens}: use datasets of one layout")
    check_training_settings(globals())
    if min(max_steps, max_tokens, tokens_per_param, block_size, cooldown_steps) < 0:
        raise UserError("--max_steps, --max_tokens, --tokens_per_param, --block_size and --cooldown_steps must be >= 0")
    if min(width, depth, head_dim) < 1:
        raise UserError("--width, --depth and --head_dim must be positive")
    T = block_size or data[0].row_len or 256
    try:
        config = GPTConfig(vocab_size=data[0].meta["vocab_size"], block_size=T, width=width, depth=depth,
                           head_dim=head_dim)
    except ValueError as e:
        raise UserError(f"{e}: choose --width a multiple of an even --head_dim") from None
    extra = [Dataset(n) for n in eval_datasets.split(",") if n and n not in names]
    for d in data + extra:
        check_compatible(d.meta, config.to_dict(), d.dir)
        d.check_length(T)
    check_short_names(data + extra)
    seq_len = data[0].seq_len(T)

    model = GPT(config).to(dev)
    n_actual, n_paper = count_parameters(model)
    tokens_per_step = batch_size * seq_len
    limits = [max_steps] if max_steps else []
    if max_tokens:
        limits.append(math.ceil(max_tokens / tokens_per_step))
    if tokens_per_param:
        limits.append(math.ceil(tokens_per_param * n_paper / tokens_per_step))
    if not limits:
        raise UserError("no stopping rule: set --max_steps, --max_tokens or --tokens_per_param")
    total_steps = min(limits)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)

    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    log_path = os.path.join(out_dir, "log.jsonl")
    run_config = config_snapshot(globals(), SETTINGS)
    input_files = [f for d in data + extra for f in dataset_files(d.name)]
    inputs = input_fingerprints({"datasets": input_files})
    # one run per folder: lock it, and never replace another run's outputs unasked
    rank0_only(rank, world_size, lambda: claim_out_dir(out_dir, resume, overwrite, input_files))
    start_step = 0
    if resume and (ckpt := load_for_resume(ckpt_path, run_config, inputs)) is not None:
        if ckpt.get("finished"):
            print(f"{ckpt_path} is a finished run ({ckpt['step']} steps): nothing to do")
            return
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
        restore_rng(rng, ckpt["train_state"]["rng"])
        start_step = ckpt["step"]
        print(f"resuming {ckpt_path} at step {start_step}")
    if is_main:
        print(f"model: width {width}, depth {depth}, {config.n_heads} heads of {head_dim}, block {T}; "
              f"{n_actual:,} parameters ({n_paper:,} by 12LD^2+DV)")
        print(f"data: {', '.join(f'{n} ({f:.0%})' for n, f in zip(names, fractions))}; "
              f"{total_steps} steps x {tokens_per_step:,} tokens = {total_steps * tokens_per_step / n_paper:.1f} tokens/param"
              + (f"; {world_size} processes" if world_size > 1 else ""))
        os.makedirs(out_dir, exist_ok=True)
    # seconds in training steps alone and in evaluations (the current one included), carried over a resume
    kept = (prepare_log(log_path, start_step) if is_main else None) or {}
    train_seconds, eval_seconds = kept.get("train_seconds", 0.0), kept.get("eval_seconds", 0.0)

    train_model = torch.compile(model) if compile else model
    if world_size > 1:
        train_model = DistributedDataParallel(train_model)
    autocast = torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def evaluate(step, train_loss, t0):
        nonlocal eval_seconds
        started = time.time()
        model.eval()
        record = {"step": step, "tokens": step * tokens_per_step, "train_loss": train_loss,
                  "seconds": round(time.time() - t0, 2), "train_seconds": round(train_seconds, 2)}
        for d in data + extra:
            numbers = evaluate_on(model, d, T, max_sequences=eval_sequences, device=dev)
            record.update({f"{LOG_NAMES[k]}/{d.short_name}": v for k, v in numbers.items()})
        model.train()
        eval_seconds += time.time() - started
        record["eval_seconds"] = round(eval_seconds, 2)
        check_diverged(record, model, start_weight, last_saved, "lower --learning_rate")
        append_jsonl(log_path, record)
        return record

    # a diverging run is stopped before it logs or saves anything, naming the last good checkpoint
    start_weight, last_saved = max_weight(model), (ckpt_path, start_step) if start_step else None
    t0 = time.time()
    if is_main and start_step == 0:
        evaluate(0, None, t0)  # the untrained model, so curves start at chance
    pbar = progress_bar(range(start_step, total_steps), "pretrain", disable=not is_main)
    # a reached target starts the cooldown (total_steps: none yet), and the run ends cooldown_steps later
    cooldown_from = total_steps
    if start_step and ckpt["train_state"].get("cooldown_from") is not None:
        cooldown_from = ckpt["train_state"]["cooldown_from"]
    last_step = run_end(total_steps, cooldown_from, cooldown_steps)
    for step in pbar:
        step_started = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, learning_rate, warmup_steps, schedule, min_lr,
                                cooldown_from=cooldown_from, cooldown_steps=cooldown_steps)
        x = shard(sample_mixture(data, fractions, batch_size, T, rng), rank, world_size).to(dev)
        with autocast:
            loss = ntp_loss(train_model(x), x)
        if not torch.isfinite(loss):
            check_diverged({"step": step, "train_loss": loss.item()}, None, 0.0, last_saved, "lower --learning_rate")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = global_mean(loss, world_size).item()
        train_seconds += time.time() - step_started
        pbar.set_postfix(loss=f"{train_loss:.4f}")

        if (step + 1) % eval_interval == 0 or step + 1 == last_step:
            if not is_main:  # wait for rank 0's verdict on the targets
                cooldown_from = from_rank0(0, world_size)
                last_step = run_end(total_steps, cooldown_from, cooldown_steps)
                if from_rank0(False, world_size):
                    break
                continue
            record = evaluate(step + 1, train_loss, t0)  # checked for divergence before it is logged

            tqdm.write(f"step {step + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in record.items() if "/" in k))
            trained = [d.short_name for d in data]
            val_losses = [record[f"val_loss/{n}"] for n in trained]
            accuracies = [record[f"accuracy/{n}"] for n in trained if f"accuracy/{n}" in record]
            reached = ((target_val_loss and sum(val_losses) / len(val_losses) <= target_val_loss)
                       or (target_accuracy and accuracies and min(accuracies) >= target_accuracy))
            if reached and step + 1 < cooldown_from:
                tqdm.write("target reached" + (f"; {cooldown_steps} steps of cooldown" if cooldown_steps else ""))
                cooldown_from = step + 1
            last_step = run_end(total_steps, from_rank0(cooldown_from, world_size), cooldown_steps)
            finished = step + 1 >= last_step
            save_checkpoint(ckpt_path, model, data={d.name: d.meta for d in data}, config=run_config,
                            step=step + 1, finished=finished, inputs=inputs,
                            train_state={"optimizer": optimizer.state_dict(), "rng": rng_state(rng),
                                         "cooldown_from": cooldown_from if cooldown_from < total_steps else None})
            last_saved = (ckpt_path, step + 1)
            if from_rank0(finished, world_size):
                break
    pbar.close()
    if not is_main:
        return
    print(f"done in {time.time() - t0:.1f}s, {record['step']} steps; checkpoint {ckpt_path}")
    for key, value in record.items():
        if key.startswith("accuracy/"):
            print(f"{key.split('/')[1]} validation accuracy (greedy exact match): {value:.4f}")
        elif key.startswith("val_loss/"):
            print(f"{key.split('/')[1]} validation loss: {value:.4f}")


if __name__ == "__main__":
    run(main, globals())
