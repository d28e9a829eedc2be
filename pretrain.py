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

from evaluate import evaluate_sets, log_names
from model import GPT, GPTConfig, count_parameters
from objective import ntp_loss
from support.checkpoint import resume_run, save_checkpoint, train_state
from support.config import UserError, check_training_settings, config_snapshot, pick_device, pick_dtype, run, set_seed
from support.dataset import Dataset, check_compatible, check_short_names, dataset_files, sample_mixture
from support.distributed import finish_distributed, global_mean, rank0_only, setup_distributed, shard
from support.files import claim_out_dir, input_fingerprints
from support.progress import progress_bar
from support.training import Evaluations, Stopping, TrainingLog, check_step_fits

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
resume = False                   # continue from out_dir/ckpt.pt (same settings and inputs) instead of
                                 # starting over
overwrite = False                # a fresh run into a folder holding another run's outputs replaces them
dtype = "float32"                # "bfloat16" = autocast matmuls to bf16; "auto": bf16 where this CPU is fast in it
seed = 1337

# the settings above: what a run records, and what --resume compares
SETTINGS = [k for k, v in list(globals().items())
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))]


def check_settings():
    """Refuse, before any work, the settings that would fail later with a traceback or train
    otherwise than asked (the data files are checked when they are read)."""
    check_training_settings(globals())
    if min(max_steps, max_tokens, tokens_per_param, block_size, cooldown_steps) < 0:
        raise UserError("--max_steps, --max_tokens, --tokens_per_param, --block_size and --cooldown_steps "
                        "must be >= 0")
    if not (max_steps or max_tokens or tokens_per_param):
        raise UserError("no stopping rule: set --max_steps, --max_tokens or --tokens_per_param")
    if min(width, depth, head_dim) < 1:
        raise UserError("--width, --depth and --head_dim must be positive")
    if width % head_dim or head_dim % 2:
        problem = f"is not a multiple of --head_dim={head_dim}" if width % head_dim else "has an odd --head_dim"
        raise UserError(f"--width={width} {problem}: choose --width a multiple of an even --head_dim "
                        "(rotary embeddings rotate pairs)")
    if not [n for n in datasets.split(",") if n]:
        raise UserError("--datasets is empty: name at least one dataset under data/, e.g. arithmetic/add")


def mixture_fractions(n_datasets):
    """--mixture as one fraction per dataset (equal shares when it is empty)."""
    if not mixture:
        return [1.0 / n_datasets] * n_datasets
    try:
        fractions = [float(f) for f in mixture.split(",")]
    except ValueError:
        fractions = []
    if len(fractions) != n_datasets or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise UserError(f"--mixture={mixture!r} must give one non-negative fraction per dataset, "
                        f"summing to 1")
    return fractions


def read_inputs():
    """The datasets trained on (each a fixed share of every batch) and those only evaluated, read and
    checked against each other and the model to build, before any work. Returns (data, fractions,
    extra, model config)."""
    names = [n for n in datasets.split(",") if n]
    data = [Dataset(n) for n in names]
    fractions = mixture_fractions(len(data))
    tokenizers = {d.meta["tokenizer"] for d in data}
    if len(tokenizers) > 1:
        raise UserError(f"datasets {names} come from different tokenizers {sorted(tokenizers)}: "
                        f"re-prepare them together")
    if len({d.row_len for d in data}) > 1:
        raise UserError(f"datasets {names} mix row lengths {sorted({d.row_len or 0 for d in data})}: "
                        f"use datasets of one layout")
    extra = [Dataset(n) for n in eval_datasets.split(",") if n and n not in names]
    T = block_size or data[0].row_len or 256
    config = GPTConfig(vocab_size=data[0].meta["vocab_size"], block_size=T, width=width, depth=depth,
                       head_dim=head_dim)
    for d in data + extra:
        check_compatible(d.meta, config.to_dict(), d.dir)
        d.check_length(T)
    check_short_names(data + extra)
    return data, fractions, extra, config


def main():
    check_settings()
    rank, world_size, dev = setup_distributed(pick_device(device))
    global dtype   # "auto": bf16 only where this machine multiplies in it fast (an AVX2-only CPU does not)
    dtype = pick_dtype(dtype, dev)
    is_main = rank == 0  # rank 0 alone evaluates and writes files
    rng = set_seed(seed)

    # -- data and model: how long to train is counted in steps, tokens or tokens per parameter
    data, fractions, extra, config = read_inputs()
    T = config.block_size
    seq_len = data[0].seq_len(T)
    model = GPT(config).to(dev)
    n_actual, n_paper = count_parameters(model)
    check_step_fits(config, n_actual, batch_size // world_size, seq_len, dev)
    tokens_per_step = batch_size * seq_len
    limits = [max_steps] if max_steps else []
    if max_tokens:
        limits.append(math.ceil(max_tokens / tokens_per_step))
    if tokens_per_param:
        limits.append(math.ceil(tokens_per_param * n_paper / tokens_per_step))
    total_steps = min(limits)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2),
                                  weight_decay=weight_decay)

    # -- output folder and resume: one run per folder, never over another run's outputs unasked
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    run_config = config_snapshot(globals(), SETTINGS)
    input_files = [f for d in data + extra for f in dataset_files(d.name)]
    inputs = input_fingerprints({"datasets": input_files})
    rank0_only(rank, world_size, lambda: claim_out_dir(out_dir, resume, overwrite, input_files))
    saved = (resume_run(ckpt_path, run_config, inputs, model, optimizer, rng, ("datasets", "eval_datasets"))
             if resume else None)
    if saved and saved.get("finished"):
        print(f"{ckpt_path} is a finished run ({saved['step']} steps): nothing to do")
        return
    start_step = saved["step"] if saved else 0
    stopping = Stopping(total_steps, cooldown_steps, saved and saved["train_state"].get("target_reached_at"))
    if is_main:
        print(f"model: width {width}, depth {depth}, {config.n_heads} heads of {head_dim}, block {T}; "
              f"{n_actual:,} parameters ({n_paper:,} by 12LD^2+DV)")
        print(f"data: {', '.join(f'{d.name} ({f:.0%})' for d, f in zip(data, fractions))}; {total_steps} steps x "
              f"{tokens_per_step:,} tokens = {total_steps * tokens_per_step / n_paper:.1f} tokens/param"
              + (f"; {world_size} processes" if world_size > 1 else ""))
        os.makedirs(out_dir, exist_ok=True)
    log = TrainingLog(os.path.join(out_dir, "log.jsonl"), start_step, model, ckpt_path,
                      hint="lower --learning_rate", is_main=is_main)

    # -- what happens at an evaluation: measure and log, see whether the target is reached, save
    def evaluate_and_log(step, train_loss):
        record = {"tokens": step * tokens_per_step, "train_loss": train_loss}
        return log.evaluation(step, record, lambda: log_names(
            evaluate_sets(model, {d.name: d for d in data + extra}, T, eval_sequences, dev)))

    def target_reached(record):
        """The target this evaluation reaches ("target_val_loss" or "target_accuracy"), or None."""
        val_losses = [record[f"val_loss/{d.short_name}"] for d in data]
        accuracies = [record[k] for d in data if (k := f"accuracy/{d.short_name}") in record]
        if target_val_loss and sum(val_losses) / len(val_losses) <= target_val_loss:
            return "target_val_loss"
        if target_accuracy and accuracies and min(accuracies) >= target_accuracy:
            return "target_accuracy"
        return None

    def save(step, finished):
        save_checkpoint(ckpt_path, model, data={d.name: d.meta for d in data}, config=run_config, step=step,
                        finished=finished, inputs=inputs,
                        train_state=train_state(optimizer.state_dict(), rng, stopping.target_reached_at))
        log.saved(step)

    evaluations = Evaluations(eval_interval, stopping, evaluate_and_log, target_reached, save, world_size,
                              is_main, is_main)

    # -- training loop
    train_model = torch.compile(model) if compile else model
    if world_size > 1:
        train_model = DistributedDataParallel(train_model)
    autocast = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if is_main and start_step == 0:
        evaluate_and_log(0, None)  # the untrained model, so curves start at chance
    pbar = progress_bar(range(start_step, total_steps), "pretrain", disable=not is_main)
    for step in pbar:
        step_started = time.time()
        for group in optimizer.param_groups:
            group["lr"] = stopping.lr(step, learning_rate, warmup_steps, schedule, min_lr)
        x = shard(sample_mixture(data, fractions, batch_size, T, rng), rank, world_size).to(dev)
        with autocast:
            loss = ntp_loss(train_model(x), x)
        if not torch.isfinite(loss):
            log.check({"step": step, "train_loss": loss.item()}, weights=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = global_mean(loss, world_size).item()
        log.train_seconds += time.time() - step_started
        pbar.set_postfix(loss=f"{train_loss:.4f}")

        # -- evaluation and checkpoint, every eval_interval steps and at the end: rank 0 evaluates,
        # decides whether to stop, and saves; every rank then follows its decision
        if evaluations.after_step(step + 1, train_loss):
            break
    pbar.close()

    # -- summary: the last evaluation, dataset by dataset
    if not is_main:
        return
    log.done()
    for key, value in evaluations.record.items():
        if key.startswith("accuracy/"):
            print(f"{key.split('/')[1]} validation accuracy (greedy exact match): {value:.4f}")
        elif key.startswith("val_loss/"):
            print(f"{key.split('/')[1]} validation loss: {value:.4f}")


if __name__ == "__main__":
    run(main, globals())
    finish_distributed()  # reached only when the run succeeded
