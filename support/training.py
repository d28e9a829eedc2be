"""
The training loop's shared parts (pretrain.py and finetune.py): the learning-rate schedule, when a
run ends (Stopping), the tail of every step: evaluate, save, stop (Evaluations), and the run's
log, whose guard stops a diverging run before it writes anything.
"""
import json
import math
import os
import time

from tqdm import tqdm

from support.config import ON_OUT_OF_MEMORY, UserError, memory_bytes
from support.distributed import from_rank0
from support.files import append_jsonl, atomic_write_text, read_jsonl


def check_step_fits(config, n_params, rows, T, device, fix="use a smaller --batch_size"):
    """Refuse, before anything is written, a training step that cannot fit in this machine's memory:
    a lower bound of what it needs (weights, gradients and AdamW's two moments in float32, and the
    activations a backward pass keeps for `rows` sequences of T tokens, logits included). On a GPU
    its own memory decides (and says so itself)."""
    if not str(device).startswith("cpu"):
        return
    per_token = (config.depth * (4 * config.width + 2 * config.mlp_width) + 2 * config.vocab_size) * 4
    needed = n_params * 4 * 4 + rows * T * per_token
    if needed > memory_bytes():
        raise UserError(f"{rows:,} sequences of {T} tokens a step need at least {needed / 2**30:,.1f} GiB, more "
                        f"than this machine's {memory_bytes() / 2**30:.1f} GiB: {fix}")


def lr_at(step, total_steps, peak_lr, warmup_steps, schedule="constant", min_lr=0.0, target_reached_at=None,
          cooldown_steps=0):
    """Linear warmup to peak_lr, then constant or cosine decay to min_lr at total_steps. A run that
    reached its target at step target_reached_at cools down: from there the rate falls linearly from
    where the schedule had it to 0 over cooldown_steps steps (the run ends at the last of them)."""
    if target_reached_at is not None and step >= target_reached_at:
        return (lr_at(target_reached_at, total_steps, peak_lr, warmup_steps, schedule, min_lr)
                * (run_end(total_steps, target_reached_at, cooldown_steps) - step) / (cooldown_steps + 1))
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def run_end(total_steps, target_reached_at, cooldown_steps):
    """The step a run ends at: total_steps, or cooldown_steps after the step its target was reached at
    (None: not reached)."""
    return total_steps if target_reached_at is None else min(total_steps, target_reached_at + cooldown_steps)


class Stopping:
    """When a run ends, and the learning rate on the way: at total_steps, or, once its target is
    reached (target_reached_at, None until then; `reason` says which target), cooldown_steps later,
    the rate falling linearly to 0 meanwhile. A resumed run continues with the saved target_reached_at."""

    def __init__(self, total_steps, cooldown_steps, target_reached_at=None, reason=None):
        self.total_steps, self.cooldown_steps = total_steps, cooldown_steps
        self.target_reached_at, self.reason = target_reached_at, reason

    @property
    def last_step(self):
        return run_end(self.total_steps, self.target_reached_at, self.cooldown_steps)

    def ends_after(self, steps, reached):
        """Does the run end once `steps` steps are done, if `reached` (a target met there) starts the
        cooldown, as it does when none has started?"""
        reached_at = steps if reached and self.target_reached_at is None else self.target_reached_at
        return steps >= run_end(self.total_steps, reached_at, self.cooldown_steps)

    def lr(self, step, peak_lr, warmup_steps, schedule, min_lr=0.0):
        return lr_at(step, self.total_steps, peak_lr, warmup_steps, schedule, min_lr, self.target_reached_at,
                     self.cooldown_steps)


class Evaluations:
    """The tail of every training step, shared by pretrain.py and finetune.py. Every eval_interval
    steps and at the run's last step, the processes that evaluate (rank 0; every process of a sharded
    run) measure and log (evaluate(steps, losses) -> the record), start the cooldown where a record
    first reaches the target (target_reached(record) -> the target's name, or None) and save
    (save(steps, finished)); then every process follows rank 0's decision."""

    def __init__(self, eval_interval, stopping, evaluate, target_reached, save, world_size, evaluates=True,
                 is_main=True):
        self.eval_interval, self.stopping, self.world_size = eval_interval, stopping, world_size
        self.evaluate, self.target_reached, self.save = evaluate, target_reached, save
        self.evaluates, self.is_main = evaluates, is_main
        self.record = None   # the last evaluation's numbers (on the processes that evaluate)

    def after_step(self, steps, losses):
        """Evaluate and save if `steps` steps done call for it. Returns whether the run is finished."""
        stopping = self.stopping
        if steps % self.eval_interval and steps != stopping.last_step:
            return False
        finished = False
        if self.evaluates:
            self.record = self.evaluate(steps, losses)   # checked for divergence before it is logged
            reason = self.target_reached(self.record)
            finished = stopping.ends_after(steps, reason)
            if reason and stopping.target_reached_at is None:
                stopping.target_reached_at, stopping.reason = steps, reason
                if self.is_main:
                    tqdm.write(f"{reason} reached at step {steps}"
                               + (f"; {stopping.cooldown_steps} steps of cooldown" if stopping.cooldown_steps else ""))
            self.save(steps, finished)
        reached_at, finished = from_rank0([-1 if stopping.target_reached_at is None else stopping.target_reached_at,
                                           finished], self.world_size)
        stopping.target_reached_at = None if reached_at < 0 else reached_at
        return bool(finished)


def max_weight(model):
    """The largest weight's magnitude (of a sharded model's too: its shards' largest, compared)."""
    largest = [p.detach().abs().max() for p in model.parameters()]
    return max((t.full_tensor() if hasattr(t, "full_tensor") else t).item() for t in largest)


def prepare_log(path, start_step):
    """A fresh run starts a fresh log; a resumed run keeps the records up to its checkpoint and
    drops those the interrupted run wrote after it. Returns the last record kept (None if none), from
    which a resumed run continues its running totals."""
    if not os.path.exists(path):
        return None
    if start_step == 0:
        os.remove(path)
        return None
    kept = [r for r in read_jsonl(path) if r["step"] <= start_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept[-1] if kept else None


class TrainingLog:
    """A training run's log.jsonl, one record per evaluation, and its clocks: seconds in training
    steps alone (the compute axis of the learning-rate study) and in evaluations, both carried over
    a resume. Every record is checked for divergence before it is written (hint: what to change)."""

    def __init__(self, path, start_step, model, ckpt_path, hint, is_main=True):
        self.path, self.model, self.ckpt_path, self.hint, self.is_main = path, model, ckpt_path, hint, is_main
        kept = (prepare_log(path, start_step) if is_main else None) or {}
        self.train_seconds, self.eval_seconds = kept.get("train_seconds", 0.0), kept.get("eval_seconds", 0.0)
        self.start_weight = max_weight(model)
        self.last_saved = start_step or None  # the step of the last checkpoint, named when a run diverges
        self.started = time.time()
        if is_main and not start_step:
            ON_OUT_OF_MEMORY.append(self.discard)

    def discard(self):
        """Out of memory before this fresh run saved a checkpoint: its log goes too (nothing is left)."""
        if self.last_saved is None and os.path.exists(self.path):
            os.remove(self.path)
            return f"{self.path} removed, nothing of this run is left"
        return f"the last good checkpoint is {self.ckpt_path} (step {self.last_saved})" if self.last_saved else ""

    def evaluation(self, step, fields, measure):
        """Log step's training numbers (fields) and measure()'s validation numbers, timing
        measure() as evaluation. Returns the record."""
        started = time.time()
        # to the millisecond: a tiny run's evaluation takes a few milliseconds
        record = {"step": step, **fields, "seconds": round(started - self.started, 3),
                  "train_seconds": round(self.train_seconds, 3), **measure()}
        self.eval_seconds += time.time() - started
        record["eval_seconds"] = round(self.eval_seconds, 3)
        self.check(record)
        if not self.is_main:   # (a sharded run's other processes measure along, rank 0 writes)
            return record
        append_jsonl(self.path, record)
        if step:  # shown between the progress bar's updates
            tqdm.write(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in record.items()
                                                 if "/" in k and isinstance(v, float)))
        return record

    def check(self, record, weights=True):
        """Stop a diverging run before it writes anything: a loss that is not finite, or weights that
        are not finite or have grown a thousandfold (a learning rate far too high can keep the loss
        finite while the weights explode). weights=False: the loss alone (every step, cheaply). Names
        the checkpoint this run saved last, if any."""
        bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
        weight = max_weight(self.model) if weights else 0.0
        if not math.isfinite(weight) or weight > 1000 * max(1.0, self.start_weight):
            bad["max |weight|"] = weight
        if bad:
            last = (f"the last good checkpoint is {self.ckpt_path} (step {self.last_saved})"
                    if self.last_saved else "this run wrote no checkpoint")
            numbers = ", ".join(f"{k}={v:.3g}" for k, v in bad.items())
            raise UserError(f"training diverged at step {record['step']} ({numbers}): {self.hint}; {last}")

    def saved(self, step):
        self.last_saved = step

    def done(self):
        seconds = time.time() - self.started
        print(f"done in {seconds:.1f}s, {self.last_saved} steps; checkpoint {self.ckpt_path}")
