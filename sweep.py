"""
Capacity and learning-rate studies: the paper's claims that forgetting is bounded below by spare
capacity, and that the learning rate trades forgetting against compute (a trade replay breaks).
Every point is a plain call of pretrain.py / sample_replay.py / finetune.py with overrides.

    python sweep.py --study=size       # forgetting vs model width, all pretrained to one English loss
    python sweep.py --study=tpp        # forgetting vs pretraining length (tokens per parameter)
    python sweep.py --study=mixture    # English/Spanish mixture frontier, Chinchilla vs over-trained
    python sweep.py --study=lr         # pretraining LR x finetuning LR, with and without KL replay
    python sweep.py --study=compute    # lower LR vs high LR + growing replay fraction: time to match
    python sweep.py --study=all

Each run lives in its own folder under out/sweeps/, named by its settings, so studies share the
runs they have in common (the base model is pretrained once). A finished run is skipped and an
interrupted one resumes (--resume=True), so a study can be stopped at any point and started again,
in a later session too. Folder names hold only what the studies vary: after changing any other
constant (block_size, finetune_lr, ...) give a fresh --out_root, or old runs will be reused. Each study writes results/sweep_<study>.json (the numbers, and the seconds
its runs took) and results/sweep_<study>.png (via plot.py).

The protocol, shared by every study: pretrain on English (cosine LR to the end of a token budget),
sample a replay corpus from the model itself (prompted by the English dataset token), then finetune
on Spanish until the Spanish validation loss reaches a target, capped at a maximum number of steps.
The target is the Spanish loss that a reference run (plain finetuning of the study's reference
model for a fixed number of steps) reaches, so every run is compared at the same new-data loss.
Forgetting = English validation loss at that point minus English loss before finetuning.

Needs the 512-token data: python data/bible/prepare.py --vocab_size=512 --out=bible512
(a 4096-token embedding would hold most of the parameters of a width-32 model).
"""
import json
import math
import os
import subprocess
import sys
import time

from common import UserError, apply_overrides, atomic_write_text, load_checkpoint_dict, read_jsonl, run

study = "all"                   # size, tpp, mixture, lr, compute or all
out_root = "out/sweeps"
results_dir = "results"
profile = "cpu"                 # "cpu" (CPU-mini, minutes on 2 cores) or "gpu" (larger, for one GPU; untested)

# CPU-mini profile: depth 2, heads of 16, 64-token windows, batches of 32 sequences.
data_name = "bible512"
depth = 2
head_dim = 16
block_size = 64
batch_size = 32
base_width = 32                 # the reference model of every study
base_tpp = 500.0                # its pretraining length: far past Chinchilla's 20 tokens/param
pretrain_lr = 3e-3
finetune_lr = 1e-3
reference_steps = 300           # plain finetuning steps that set a study's Spanish target
cap_factor = 4                  # other runs may take up to cap_factor x reference_steps to reach it
replay_samples = 1024           # self-generated English sequences per model
eval_sequences = 256
widths = "32,48,64,96"          # size study
coeffs = "0,1,3,10"             # KL replay coefficients (0 = plain finetuning)
tpps = "10,30,100,500,1000"     # tpp study
chinchilla_tpp = 20.0           # mixture study: the compute-optimal length...
es_shares = "0,0.25,0.5,0.75,1"  # ... and the Spanish shares of the pretraining mixtures
pretrain_lrs = "1e-3,3e-3,1e-2"  # lr study
finetune_lrs = "3e-4,1e-3,3e-3"
high_lr = 3e-3                  # compute study: the fast learning rate...
low_lrs = "1e-3,3e-4,1e-4,3e-5"  # ... the slower ones that forget less...
replay_fractions = "0.25,0.5,0.75"  # ... and the share of each batch that is replay at high_lr
compute_reference_steps = 100   # plain steps at high_lr that set the compute study's target
compute_cap_steps = 8000        # enough for the lowest learning rate to get there

GPU_PROFILE = {  # the paper's text model scale, for one GPU (untested here); --key=value still wins
    "data_name": "bible", "depth": 6, "head_dim": 64, "block_size": 256, "batch_size": 256, "base_width": 128,
    "widths": "64,128,256,512", "replay_samples": 8192, "eval_sequences": 1024}

EN, ES = "bible512/en", "bible512/es"   # set from data_name in main()
timings = {}   # run folder -> seconds, kept in out_root/timings.json across invocations
used = []      # the runs the current study relied on (run now or earlier), for its total time


def floats(text):
    return [float(x) for x in text.split(",") if x]


# ----------------------------------------------------------------------------------------------
# running stages: skip what is finished, resume what was interrupted

def is_finished(out_dir):
    path = os.path.join(out_dir, "ckpt.pt")
    return os.path.exists(path) and bool(load_checkpoint_dict(path).get("finished"))


def launch(script, out_dir, args, fresh=True):
    """Run one pipeline script and record how long it took (added to the time so far when resuming)."""
    if fresh:
        timings.pop(out_dir, None)
    started = time.time()
    command = [sys.executable, script, *[f"--{k}={v}" for k, v in args.items()]]
    print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise UserError(f"{script} failed for {out_dir} (exit {result.returncode}): fix the cause and run "
                        f"sweep.py again; finished runs are skipped")
    timings[out_dir] = timings.get(out_dir, 0.0) + time.time() - started
    atomic_write_text(os.path.join(out_root, "timings.json"), json.dumps(timings, indent=1))


def train(script, out_dir, **args):
    used.append(out_dir)
    if is_finished(out_dir):
        return out_dir
    resume = os.path.exists(os.path.join(out_dir, "ckpt.pt"))
    launch(script, out_dir, {**args, "out_dir": out_dir, "resume": resume}, fresh=not resume)
    return out_dir


def paper_params(width):
    """12 L D^2 + D V: the parameter count tokens-per-parameter is measured against (as pretrain.py)."""
    vocab = json.load(open(os.path.join("data", EN, "meta.json")))["vocab_size"]
    return 12 * depth * width ** 2 + width * vocab


def model_args(width):
    return {"width": width, "depth": depth, "head_dim": head_dim, "block_size": block_size}


def pretrain(width=None, tpp=None, es_share=0.0, lr=None, target_loss=0.0):
    """An English (or English/Spanish mixture) model, cosine LR over `tpp` tokens per parameter;
    with target_loss it stops as soon as its English validation loss gets there."""
    width, tpp, lr = width or base_width, tpp or base_tpp, lr or pretrain_lr
    name = f"w{width}_tpp{tpp:g}_es{es_share:g}_lr{lr:g}" + (f"_to{target_loss:.4f}" if target_loss else "")
    if es_share == 0:
        mix = {"datasets": EN, "eval_datasets": ES}
    elif es_share == 1:
        mix = {"datasets": ES, "eval_datasets": EN}
    else:
        mix = {"datasets": f"{EN},{ES}", "mixture": f"{1 - es_share:g},{es_share:g}"}
    steps = math.ceil(tpp * paper_params(width) / (batch_size * block_size))
    return train("pretrain.py", f"{out_root}/pretrain/{name}", **mix, **model_args(width), batch_size=batch_size,
                 tokens_per_param=tpp, max_steps=0, learning_rate=lr, schedule="cosine",
                 warmup_steps=min(100, steps // 10), target_val_loss=target_loss,
                 eval_interval=50 if target_loss else max(50, steps // 20), eval_sequences=eval_sequences)


def replay_corpus(model_dir):
    path = os.path.join(model_dir, "replay_en.pt")
    used.append(path)
    if not os.path.exists(path):
        args = {"init_from": f"{model_dir}/ckpt.pt", "prompts": EN, "num_samples": replay_samples,
                "batch_size": 512, "out": path, "resume": True}  # resume: continue a killed run's .partial
        launch("sample_replay.py", path, args, fresh=not os.path.exists(path + ".partial"))
    return path


def finetune(model_dir, name, target=0.0, max_steps=None, lr=None, coeff=0.0, replay_fraction=0.0,
             eval_interval=25):
    """Finetune on Spanish; with coeff > 0, KL(pretrained || model) on the model's own English samples.
    replay_fraction f splits each batch of batch_size sequences into (1 - f) Spanish and f replay,
    and weighs the KL by the ratio of the two, so the loss is the mean over all sequences."""
    args = {"init_from": f"{model_dir}/ckpt.pt", "dataset": ES, "learning_rate": lr or finetune_lr,
            "batch_size": batch_size, "max_steps": max_steps or cap_factor * reference_steps,
            "target_val_loss": target, "eval_interval": eval_interval, "eval_sequences": eval_sequences}
    if replay_fraction:
        n_replay = round(replay_fraction * batch_size)
        args.update(batch_size=batch_size - n_replay, replay_batch_size=n_replay)
        coeff = n_replay / (batch_size - n_replay)
    if coeff:
        args.update(replay="kl", replay_coeff=coeff, replay_source=replay_corpus(model_dir))
    return train("finetune.py", f"{model_dir}/ft/{name}", **args)


# ----------------------------------------------------------------------------------------------
# reading results back

def log(run_dir):
    return read_jsonl(os.path.join(run_dir, "log.jsonl"))


def final_loss(model_dir, name="en"):
    return log(model_dir)[-1][f"val_loss/{name}"]


def outcome(run_dir, target):
    """Where a finetuning run ended: English loss before and after, Spanish loss, cost."""
    records = log(run_dir)
    first, last = records[0], records[-1]
    return {"steps": last["step"], "train_seconds": last["train_seconds"],
            "en_before": first["val_loss/en"], "en_after": last["val_loss/en"], "es_after": last["val_loss/es"],
            "forgetting": last["val_loss/en"] - first["val_loss/en"], "reached": last["val_loss/es"] <= target}


def spanish_target(model_dir, steps=None, lr=None):
    """The Spanish loss plain finetuning of model_dir reaches in `steps` steps at `lr`."""
    steps = steps or reference_steps
    ref = finetune(model_dir, f"reference_lr{lr or finetune_lr:g}_{steps}", max_steps=steps, lr=lr)
    return log(ref)[-1]["val_loss/es"]


def model_info(model_dir, width):
    last, params = log(model_dir)[-1], paper_params(width)
    return {"dir": model_dir, "steps": last["step"], "en_loss": last.get("val_loss/en"),
            "es_loss": last.get("val_loss/es"), "paper_params": params, "tokens_per_param": last["tokens"] / params}


def save(name, result):
    runs = sorted(set(used))
    result["seconds"] = round(sum(timings.get(r, 0.0) for r in runs), 1)
    result["runs"] = {"total": len(runs), "timed": sum(r in timings for r in runs)}
    used.clear()
    path = os.path.join(results_dir, f"sweep_{name}.json")
    atomic_write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path} ({result['seconds'] / 60:.1f} min of runs)")
    subprocess.run([sys.executable, "plot.py", f"--figure=sweep_{name}", f"--results={path}",
                    f"--out={os.path.join(results_dir, f'sweep_{name}.png')}"], check=True)


# ----------------------------------------------------------------------------------------------
# the studies

def replay_coefficients(model_dir, target):
    """Finetune one model to the Spanish target at every KL coefficient: {coeff: outcome}."""
    return {f"{c:g}": outcome(finetune(model_dir, f"kl{c:g}_to{target:.4f}", target=target, coeff=c), target)
            for c in floats(coeffs)}


def size_study():
    base = pretrain()
    target_en = final_loss(base)
    models = {base_width: base}
    for width in [int(w) for w in widths.split(",") if int(w) != base_width]:
        # wider models reach the base model's English loss sooner: they stop there, under-trained
        models[width] = pretrain(width=width, target_loss=target_en + 1e-4)
    target = spanish_target(base)
    rows = [{"width": width, **model_info(model_dir, width), "finetune": replay_coefficients(model_dir, target)}
            for width, model_dir in sorted(models.items())]
    save("size", {"study": "size", "spanish_target": target, "english_target": target_en, "models": rows})


def tpp_study():
    models = {tpp: pretrain(tpp=tpp) for tpp in floats(tpps)}
    target = spanish_target(models[base_tpp] if base_tpp in models else models[max(models)])
    rows = [{"tpp": tpp, **model_info(model_dir, base_width), "finetune": replay_coefficients(model_dir, target)}
            for tpp, model_dir in sorted(models.items())]
    save("tpp", {"study": "tpp", "spanish_target": target, "width": base_width, "models": rows})


def mixture_study():
    result = {"study": "mixture", "width": base_width, "lengths": {}}
    for label, tpp in (("chinchilla", chinchilla_tpp), ("over-trained", base_tpp)):
        mixtures = {share: pretrain(tpp=tpp, es_share=share) for share in floats(es_shares)}
        frontier = [{"es_share": s, "en_loss": final_loss(d, "en"), "es_loss": final_loss(d, "es")}
                    for s, d in sorted(mixtures.items())]
        english = mixtures[0.0]
        trajectories = {}
        for name, c in (("plain", 0.0), ("kl_self", 1.0)):
            ft = finetune(english, f"trajectory_kl{c:g}", coeff=c, max_steps=cap_factor * reference_steps)
            trajectories[name] = [{"step": r["step"], "en_loss": r["val_loss/en"], "es_loss": r["val_loss/es"]}
                                  for r in log(ft)]
        result["lengths"][label] = {"tpp": tpp, "frontier": frontier, "finetune": trajectories}
    save("mixture", result)


def lr_study():
    models = {lr: pretrain(lr=lr) for lr in floats(pretrain_lrs)}
    target = spanish_target(models[pretrain_lr])
    rows = []
    for plr, model_dir in sorted(models.items()):
        for flr in floats(finetune_lrs):
            for c in (0.0, 1.0):
                # a lower finetuning LR needs proportionally more steps to reach the target
                cap = math.ceil(cap_factor * reference_steps * max(1.0, finetune_lr / flr))
                ft = finetune(model_dir, f"lr{flr:g}_kl{c:g}_to{target:.4f}", target=target, lr=flr, coeff=c,
                              max_steps=cap)
                rows.append({"pretrain_lr": plr, "finetune_lr": flr, "kl_coeff": c,
                             "pretrain_en_loss": final_loss(model_dir), **outcome(ft, target)})
    save("lr", {"study": "lr", "spanish_target": target, "runs_table": rows})


def compute_study():
    base = pretrain()
    target = spanish_target(base, steps=compute_reference_steps, lr=high_lr)
    arms = []
    for lr in [high_lr] + floats(low_lrs):
        ft = finetune(base, f"lr{lr:g}_to{target:.4f}", target=target, lr=lr, max_steps=compute_cap_steps,
                      eval_interval=10)
        arms.append({"arm": f"lr {lr:g}", "learning_rate": lr, "replay_fraction": 0.0, **outcome(ft, target),
                     "curve": [(r["train_seconds"], r["val_loss/en"]) for r in log(ft)]})
    for f in floats(replay_fractions):
        ft = finetune(base, f"lr{high_lr:g}_replay{f:g}_to{target:.4f}", target=target, lr=high_lr,
                      replay_fraction=f, max_steps=compute_cap_steps, eval_interval=10)
        arms.append({"arm": f"lr {high_lr:g} + replay {f:g}", "learning_rate": high_lr, "replay_fraction": f,
                     **outcome(ft, target), "curve": [(r["train_seconds"], r["val_loss/en"]) for r in log(ft)]})
    save("compute", {"study": "compute", "spanish_target": target, "arms": arms, "summary": match_old_loss(arms)})


def match_old_loss(arms):
    """The slowest learning rate without replay sets the English loss to match; the replay run that
    reaches the Spanish target with English loss at least as low in the least training time gives
    the compute ratio (None when no replay run matches)."""
    slow = min((a for a in arms if not a["replay_fraction"]), key=lambda a: a["learning_rate"])
    matched = [a for a in arms if a["replay_fraction"] and a["reached"] and a["en_after"] <= slow["en_after"]]
    fastest = min(matched, key=lambda a: a["train_seconds"]) if matched else None
    return {"slow_arm": slow["arm"], "slow_reached": slow["reached"], "matched_arm": fastest and fastest["arm"],
            "time_ratio": fastest and slow["train_seconds"] / fastest["train_seconds"],
            "step_ratio": fastest and slow["steps"] / fastest["steps"]}


STUDIES = {"size": size_study, "tpp": tpp_study, "mixture": mixture_study, "lr": lr_study, "compute": compute_study}


def main():
    global timings, EN, ES
    if profile == "gpu":
        globals().update(GPU_PROFILE)
        apply_overrides(globals(), sys.argv[1:])
    EN, ES = f"{data_name}/en", f"{data_name}/es"
    if not os.path.exists(os.path.join("data", EN, "meta.json")):
        raise UserError(f"data/{EN} not found: run python data/bible/prepare.py --vocab_size=512 --out={data_name}")
    if study != "all" and study not in STUDIES:
        raise UserError(f"--study={study!r} must be one of {', '.join(STUDIES)} or all")
    timings_path = os.path.join(out_root, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    for name, function in STUDIES.items():
        if study in (name, "all"):
            function()


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    run(main, globals())
