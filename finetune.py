"""
Stage 3: finetune a pretrained checkpoint on new data, optionally held close to the model it
started from, so that it does not forget the old data.

The checkpoint is loaded twice: the model theta, which is trained, and the reference pi, the same
model frozen (no_grad, never updated). Each step minimises (objective.py)

    NTP(theta, new batch)
      + replay_coeff * R(theta, replay batch)      R = KL(pi || theta) ("kl") or NTP ("ntp")
      + lwf_coeff * KL(pi || theta) on the new batch (Learning without Forgetting)

Old data comes in three ways:
- self-generated replay: replay batches from a replay corpus that the reference sampled itself
  (sample_replay.py; replay_source=<corpus file>), never a sequence twice (replay.py's ReplayStream);
- real replay: replay batches of real old data (replay_source=data:<dataset>), through the same stream;
- mixing: mix_fraction of every new batch replaced by real old rows (mix_dataset), no replay term.

    python finetune.py --init_from=out/pretrain_add/ckpt.pt --dataset=arithmetic/sort
    python finetune.py --replay=kl --replay_coeff=1 --replay_source=out/replay_add.pt

On a chat dataset (data/text/prepare.py from conversations), --answers_only=True restricts the new
data's next-token loss to the assistant's answers, as instruction tuning does.

Writes out_dir/ckpt.pt and out_dir/log.jsonl (new- and old-data metrics every eval_interval steps,
starting at step 0).
"""
import os
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from evaluate import evaluate_sets, log_names
from objective import Objective
from replay import ReplayStream
from support.checkpoint import load_checkpoint, resume_run, save_checkpoint, train_state
from support.config import UserError, check_training_settings, config_snapshot, pick_device, pick_dtype, run, set_seed
from support.dataset import Dataset, check_compatible, check_short_names, dataset_files, open_eval_set
from support.distributed import finish_distributed, global_mean, rank0_only, setup_distributed, shard
from support.files import claim_out_dir, input_fingerprints
from support.progress import progress_bar
from support.training import Evaluations, Stopping, TrainingLog, check_step_fits

# -- I/O
init_from = "out/pretrain_add/ckpt.pt"
out_dir = "out/finetune"
dataset = "arithmetic/sort"      # the new data
eval_datasets = ""               # extra datasets (or corpus:<path>) to track; the checkpoint's own are
                                 # always tracked
block_size = 0                   # text windows of this many tokens; 0 = the model's block_size
answers_only = False             # a chat dataset (data/text/prepare.py): the new data's next-token loss on
                                 # the assistant's answers only, as instruction tuning does; replay unchanged
# -- replay: old-distribution sequences under a term of their own
replay = "none"                  # "none", "kl" = KL(reference || model), "ntp" = next-token loss
replay_coeff = 1.0
replay_source = ""               # a replay corpus from sample_replay.py, or "data:<dataset>" for real replay
replay_batch_size = 0            # 0 = same as batch_size
replay_reuse = False             # False = no replay sequence is used twice (the study's protocol): when the
                                 # corpus runs out, the reference samples more; True = cycle the corpus
lwf_coeff = 0.0                  # KL(reference || model) on the new data (LwF); 0 = off
# -- mixing: real old rows in the new batches (no replay term)
mix_dataset = ""                 # the real old data
mix_fraction = 0.0               # fraction of the new batches replaced by mix_dataset rows, on average: a
                                 # share under one row a step (1/256 of 32) puts a row in every 8th batch
# -- LoRA baseline: train only low-rank adapters on every linear layer of the blocks
lora_rank = 0                    # 0 = full finetuning
lora_alpha = 0.0                 # adapter scale alpha / rank; 0 = alpha equal to the rank (scale 1)
lora_embeddings = False          # also train the input and output embeddings in full: needed when the new
                                 # data is written in tokens the model never saw (English -> Spanish)
# -- optimisation (a fresh AdamW, as the paper resets the optimizer for each new task)
batch_size = 256
learning_rate = 1e-3
warmup_steps = 50
schedule = "constant"            # "constant" after warmup (as the paper), or "cosine" decay to 0 at max_steps
beta1 = 0.9
beta2 = 0.99
weight_decay = 0.02
max_steps = 500
target_val_loss = 0.0            # stop once the new data's validation loss is at or below this
target_accuracy = 0.0            # toy tasks: stop once the new task's exact-match accuracy
                                 # is at or above this
cooldown_steps = 0               # with a target: once reached, this many more steps with the learning rate
                                 # falling linearly to 0, then stop (a high constant LR leaves
                                 # the model noisy)
# -- evaluation
eval_interval = 50
eval_sequences = 512
eval_kl = False                  # also log KL(reference || model) on every tracked dataset (val_kl/<name>)
bench_datasets = ""              # costly sets, measured only every bench_interval steps and where the run
                                 # ends: benchmarks (bench:<name>), any dataset or corpus:<path>; at step 0
                                 # the model is the init checkpoint, which evaluate.py measures once instead
bench_interval = 0               # 0 = only where the run ends
save_interval = 0                # steps between checkpoints (0 = at every evaluation); the last is always
                                 # saved
# -- system
device = "auto"
fsdp = False                     # under torchrun: split the weights, gradients and AdamW's moments over the
                                 # processes (FSDP2) instead of a whole copy on each (DDP): for a model that
                                 # does not fit one device
compile = False
dtype = "float32"                # "bfloat16" autocasts the training step's matmuls; "auto": bf16 where fast
eval_dtype = "float32"           # and the evaluations' ("bfloat16": 2x faster where the CPU has native bf16)
seed = 1337
resume = False                   # continue from out_dir/ckpt.pt (same settings and inputs) instead of
                                 # starting over
overwrite = False                # a fresh run into a folder holding another run's outputs replaces them

# the settings above: what a run records, and what --resume compares
SETTINGS = [k for k, v in list(globals().items())
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))]


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: W x + (alpha / r) B A x.
    B starts at zero, so the wrapped model starts exactly where the checkpoint was."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.weight.device
        self.A = nn.Parameter(torch.randn(rank, base.in_features, device=device) * base.in_features ** -0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale



def add_lora(model, rank, alpha):
    """Freeze the model and wrap the attention and MLP projections of every block with LoRA (q/k/v
    and output; up, down and, in a SwiGLU MLP, gate)."""
    model.requires_grad_(False)
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    return model


def plain_state_dict(model):
    """The weights of a plain GPT: LoRA updates folded into their base layers (W + scale B A), so
    every later stage loads a finetuned checkpoint like any other."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.base.weight + module.scale * module.B @ module.A
    for key, value in model.state_dict().items():
        if not key.endswith((".A", ".B", ".base.weight")):
            state[key] = value
    return {k: v.detach() for k, v in state.items()}


def full_state(model, optimizer, with_optimizer):
    """A sharded (FSDP2) model's whole weights, and AdamW's whole state if asked, gathered from
    every process onto rank 0 (collective: every process calls it; the others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    return weights, get_optimizer_state_dict(model, optimizer, options=options) if with_optimizer else None


def load_full_state(model, optimizer, weights, optimizer_state):
    """full_state's inverse, for --resume: every process reads the checkpoint and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def mix_rows(step, per_step):
    """Old rows mixed into step's batch: the step's share of the running total, so a fractional
    share adds up exactly (0.125 a step: one row in every 8th batch) and a whole one is the same
    every step."""
    return int(np.floor((step + 1) * per_step + 1e-9) - np.floor(step * per_step + 1e-9))


def check_settings():
    """Refuse, before any work, the settings that would fail later with a traceback or train
    otherwise than asked (the files they name are checked when they are read)."""
    check_training_settings(globals())
    if replay not in ("none", "kl", "ntp"):
        raise UserError(f"--replay={replay!r} must be none, kl or ntp")
    if min(replay_coeff, lwf_coeff, mix_fraction) < 0 or mix_fraction >= 1:
        raise UserError("--replay_coeff and --lwf_coeff must be >= 0 and --mix_fraction in [0, 1)")
    if mix_fraction > 0 and not mix_dataset:
        raise UserError(f"--mix_fraction={mix_fraction} needs --mix_dataset (the real old data to mix in)")
    if lora_rank < 0 or lora_alpha < 0:
        raise UserError("--lora_rank and --lora_alpha must be >= 0 (alpha 0 = the rank)")
    if max_steps <= 0 or replay_batch_size < 0 or min(cooldown_steps, target_val_loss, target_accuracy) < 0:
        raise UserError("--max_steps must be positive; --replay_batch_size, --cooldown_steps "
                        "and the targets >= 0")
    if replay != "none" and not replay_source:
        raise UserError(f"--replay={replay} needs --replay_source (a replay corpus from sample_replay.py, or "
                        f"data:<dataset> for real replay)")
    if block_size < 0:
        raise UserError(f"--block_size={block_size} must be >= 0 (0 = the model's)")
    if fsdp and lora_rank:
        raise UserError("--fsdp=True splits full finetuning over the processes; LoRA trains few weights: "
                        "drop --fsdp (each process keeps a copy, as DDP)")
    if eval_dtype not in ("float32", "bfloat16", "auto") or min(bench_interval, save_interval) < 0:
        raise UserError(f"--eval_dtype={eval_dtype!r} must be float32, bfloat16 or auto; --bench_interval and "
                        "--save_interval >= 0")


def read_inputs(dev, world_size):
    """Everything the run reads, checked against each other before any work: the checkpoint, loaded
    twice (theta, trained, and the frozen reference pi), the new data, the datasets tracked (the
    checkpoint's own among them), the benchmarks, the old rows to mix in, and the replay stream."""
    model, ckpt = load_checkpoint(init_from, dev)
    reference, _ = load_checkpoint(init_from, dev)
    reference.eval().requires_grad_(False)  # it never receives a gradient or an update
    model_config = ckpt["model_config"]
    if block_size > model_config["block_size"]:
        raise UserError(f"--block_size={block_size} must be at most the model's {model_config['block_size']} "
                        f"(0 = the model's)")
    T = block_size or model_config["block_size"]
    new_data = Dataset(dataset)
    if answers_only and not new_data.masks:
        raise UserError(f"--answers_only=True needs a chat dataset, whose answers are marked: {new_data.dir} "
                        "has no loss mask (prepare conversations with data/text/prepare.py)")
    names = list(dict.fromkeys(list(ckpt.get("data", {})) + [dataset] + [n for n in eval_datasets.split(",") if n]))
    tracked = {name: new_data if name == dataset else open_eval_set(name) for name in names}
    costly = {name: open_eval_set(name) for name in bench_datasets.split(",") if name and name not in tracked}
    mix = Dataset(mix_dataset) if mix_fraction > 0 else None
    for d in [*tracked.values(), *costly.values(), *([mix] if mix else [])]:
        check_compatible(d.meta, model_config, d.dir, ckpt)
        d.check_length(T)
    check_short_names([*tracked.values(), *costly.values()])
    # replay draws from its own random stream, so adding replay (even with coeff 0) leaves the
    # sequence of new-data batches unchanged: runs differ only by the regulariser
    replay_stream = None
    if replay != "none":
        replay_stream = ReplayStream(replay_source, init_from, ckpt, np.random.default_rng(seed + 1),
                                     replay_batch_size or batch_size, T, max_steps, replay_reuse, reference, dev,
                                     compile_step=compile)
        if fsdp and world_size > 1 and replay_stream.may_sample:
            raise UserError(f"--fsdp=True cannot sample fresh replay mid-run: sample a corpus of "
                            f"{max_steps * (replay_batch_size or batch_size)} sequences (no sequence used twice) "
                            "or allow reuse")
    return model, reference, ckpt, T, new_data, tracked, costly, mix, replay_stream


def main():
    check_settings()
    rank, world_size, dev = setup_distributed(pick_device(device))
    global dtype, eval_dtype   # "auto": bf16 only where this machine multiplies in it fast (not AVX2 alone)
    dtype, eval_dtype = pick_dtype(dtype, dev), pick_dtype(eval_dtype, dev)
    is_main = rank == 0  # rank 0 alone evaluates and writes files
    rng = set_seed(seed)

    # -- inputs: the models theta (trained) and pi (the frozen reference), the data, the replay stream
    model, reference, ckpt, T, new_data, tracked, costly, mix, replay_stream = read_inputs(dev, world_size)
    mix_per_step = mix_fraction * batch_size   # old rows a step, on average
    n_replay = replay_batch_size or batch_size
    if is_main:
        print(f"finetune {init_from} on {dataset}: {max_steps} steps, batch {batch_size}, "
              f"lr {learning_rate}; replay {replay}"
              + (f" x{replay_coeff} from {replay_stream.description}" if replay_stream else "")
              + (f"; LwF x{lwf_coeff}" if lwf_coeff else "")
              + (f"; {mix_per_step:g} rows of {mix_dataset} a step" if mix else "")
              + (f"; LoRA rank {lora_rank}" if lora_rank else "")
              + (" + embeddings" if lora_rank and lora_embeddings else "")
              + (f"; {world_size} processes" if world_size > 1 else ""))

    # -- what is trained: every weight, or LoRA adapters (and optionally the embeddings)
    if lora_rank:
        add_lora(model, lora_rank, lora_alpha or float(lora_rank))
        if lora_embeddings:
            model.embed.requires_grad_(True)
            model.unembed.requires_grad_(True)
    # -- several processes: DDP keeps a whole model, its gradients and AdamW's moments on every
    # process; --fsdp=True (FSDP2) splits all three, and also the reference, each block's weights
    # gathered only while it computes. Every process then takes part in every forward pass, the
    # evaluations' too, and gathers the whole weights for rank 0 to save
    sharded = fsdp and world_size > 1
    if sharded:
        from torch.distributed.fsdp import fully_shard   # (imported here: it takes a second to import)
        for m in (model, reference):
            for block in m.blocks:
                fully_shard(block)
            fully_shard(m)
    trainable = [p for p in model.parameters() if p.requires_grad]
    check_step_fits(model.config, sum(p.numel() for p in model.parameters()),
                    (batch_size + (n_replay if replay_stream else 0)) // world_size, T, dev,
                    "use a smaller --batch_size or --replay_batch_size, or a shorter --block_size")
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, betas=(beta1, beta2),
                                  weight_decay=weight_decay)

    # -- output folder and resume: what the run reads is checked by content (a resumed run must find
    # the same files, wherever they now are); one run per folder, never where an input lives
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    run_config = config_snapshot(globals(), SETTINGS)
    corpus = replay_source if replay != "none" and not replay_source.startswith("data:") else ""
    input_files = {"init_from": [init_from], "replay_source": [corpus] if corpus else
                   dataset_files(replay_source[len("data:"):]) if replay != "none" else [],
                   "datasets": [f for n in list(tracked) + list(costly) + ([mix_dataset] if mix else [])
                                for f in dataset_files(n)]}
    inputs = input_fingerprints(input_files)
    rank0_only(rank, world_size, lambda: claim_out_dir(out_dir, resume, overwrite,
                                                        [p for paths in input_files.values() for p in paths]))
    saved = (resume_run(ckpt_path, run_config, inputs, model, optimizer, rng,
                        ("init_from", "replay_source", "dataset", "eval_datasets", "mix_dataset", "bench_datasets"),
                        load=load_full_state if sharded else None)
             if resume else None)
    if saved and saved.get("finished"):
        print(f"{ckpt_path} is a finished run ({saved['step']} steps): nothing to do")
        return
    start_step = saved["step"] if saved else 0
    if saved and replay_stream:
        replay_stream.load_state(saved["train_state"]["replay"])
    stopping = Stopping(max_steps, cooldown_steps)
    if saved and saved["train_state"].get("target_reached_at") is not None:
        stopping.target_reached_at, stopping.reason = saved["train_state"]["target_reached_at"], saved["stop_reason"]
    if is_main:
        n_total = sum(p.numel() for p in model.parameters())
        print(f"training {sum(p.numel() for p in trainable):,} of {n_total:,} parameters")
        os.makedirs(out_dir, exist_ok=True)
    log = TrainingLog(os.path.join(out_dir, "log.jsonl"), start_step, model, ckpt_path,
                      "lower --learning_rate or --replay_coeff", is_main)
    evaluates = is_main or sharded   # sharded weights: every process runs the evaluations' forward passes
    reference_cache = {}  # the reference's side of the KL on the fixed validation sequences, computed once

    # -- what happens at an evaluation: measure and log, see whether the target is reached, save
    def target_reached(numbers):
        """The target these numbers reach ("target_val_loss" or "target_accuracy"), or None."""
        if target_val_loss and numbers[f"val_loss/{new_data.short_name}"] <= target_val_loss:
            return "target_val_loss"
        if target_accuracy and numbers.get(f"accuracy/{new_data.short_name}", 0) >= target_accuracy:
            return "target_accuracy"
        return None

    def evaluate_and_log(step, losses):
        record = {"replay_passes": replay_stream.passes if replay_stream else 0, **losses}
        if replay_stream and replay_stream.dataset is None:
            # seconds spent sampling fresh replay inside this run
            record["replay_sample_seconds"] = round(replay_stream.sample_seconds, 3)

        # at step 0 theta is still pi (LoRA's B starts at zero): the model's logits serve as the reference's
        kl_to = (model if step == 0 else reference) if eval_kl else None

        @torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=eval_dtype == "bfloat16")
        def measure():
            numbers = log_names(evaluate_sets(model, tracked, T, eval_sequences, dev, kl_to, reference_cache))
            ends = stopping.ends_after(step, target_reached(numbers))   # does the run end here?
            if costly and step and (ends or bench_interval and step % bench_interval == 0):
                if sharded:   # a benchmark is scored by hidden() and unembed, not by a whole forward
                    model.unshard()   # pass: gather the top-level weights (the blocks gather their own)
                numbers.update(log_names(evaluate_sets(model, costly, T, eval_sequences, dev, kl_to,
                                                       reference_cache)))
                if sharded:
                    model.reshard()
            return numbers
        return log.evaluation(step, record, measure)

    def save(step, finished):
        if not (finished or not save_interval or step % save_interval == 0):
            return
        # what resuming needs; a finished run is never resumed. The trained weights are kept apart
        # from the plain ones only where they differ (LoRA's adapters). A sharded run's processes
        # all help gather the whole weights and moments
        weights, optimizer_state = (full_state(model, optimizer, not finished) if sharded else
                                    (plain_state_dict(model), None))
        if not is_main:
            return
        # replay_passes: the most any replay sequence was seen, in this run or the runs it continues
        passes = max(replay_stream.passes if replay_stream else 0, ckpt.get("replay_passes", 0))
        state = None if finished else train_state(
            optimizer_state or optimizer.state_dict(), rng, stopping.target_reached_at,
            replay=replay_stream.state() if replay_stream else None,
            **({"model": model.state_dict()} if lora_rank else {}))
        save_checkpoint(ckpt_path, model, state_dict=weights, step=step,
                        data={**ckpt.get("data", {}), dataset: new_data.meta}, config=run_config,
                        finished=finished,
                        stop_reason=stopping.reason or ("target not reached" if target_val_loss or target_accuracy
                                                        else "max_steps"),
                        reference_checkpoint=os.path.abspath(init_from), replay_passes=passes, inputs=inputs,
                        **({"train_state": state} if state else {}),
                        **({"tokenizer": ckpt["tokenizer"]} if "tokenizer" in ckpt else {}))
        log.saved(step)

    evaluations = Evaluations(eval_interval, stopping, evaluate_and_log, target_reached, save, world_size,
                              evaluates, is_main)

    # -- training loop
    step_model = torch.compile(model) if compile else model
    objective = Objective(step_model, reference, replay, replay_coeff, lwf_coeff)
    step_objective = DistributedDataParallel(objective) if world_size > 1 and not sharded else objective
    autocast = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if evaluates and start_step == 0:
        evaluate_and_log(0, {})
    pbar = progress_bar(range(start_step, max_steps), "finetune", disable=not is_main)
    for step in pbar:
        step_started = time.time()
        for group in optimizer.param_groups:
            group["lr"] = stopping.lr(step, learning_rate, warmup_steps, schedule)
        # every rank draws the same global batches and keeps its own slice
        n_mix = mix_rows(step, mix_per_step)
        x_new, mask_new = new_data.sample("train", batch_size - n_mix, T, rng, with_mask=True)
        mask_new = mask_new if answers_only else None
        if mix is not None and n_mix:
            x_new = torch.cat([x_new, mix.sample("train", n_mix, T, rng)])
            if mask_new is not None:  # mixed-in old rows count whole
                mask_new = torch.cat([mask_new, torch.ones(n_mix, T, dtype=mask_new.dtype)])
        x_new = shard(x_new, rank, world_size).to(dev)
        mask_new = None if mask_new is None else shard(mask_new, rank, world_size).to(dev)
        sampled_before = replay_stream.sample_seconds if replay_stream else 0.0
        x_replay = shard(replay_stream.next(n_replay, T), rank, world_size).to(dev) if replay_stream else None
        with autocast:
            loss, parts = step_objective(x_new, x_replay, mask_new)
        if not torch.isfinite(loss):
            log.check({"step": step, "loss": loss.item()}, weights=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        parts = {k: global_mean(v, world_size).item() for k, v in parts.items()}  # .item() waits for the step
        # replay sampled mid-run is logged on its own (replay_sample_seconds), not as training
        sampled = (replay_stream.sample_seconds if replay_stream else 0.0) - sampled_before
        log.train_seconds += time.time() - step_started - sampled
        pbar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})

        # -- evaluation and checkpoint, every eval_interval steps and at the end: rank 0 evaluates
        # (every process of a sharded run), decides whether to stop, and saves; every rank follows
        if evaluations.after_step(step + 1, parts):
            break
    pbar.close()
    if is_main:
        log.done()


if __name__ == "__main__":
    run(main, globals())
    finish_distributed()  # reached only when the run succeeded
