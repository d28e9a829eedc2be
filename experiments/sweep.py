"""
Capacity and learning-rate studies: the paper's claims that forgetting is bounded below by spare
capacity, and that the learning rate trades forgetting against compute (a trade replay breaks); and
the method comparison again in the study's own regime (small forgetting, seeds).
Every point is a plain call of pretrain.py / sample_replay.py / finetune.py with overrides.

    python experiments/sweep.py --study=size       # forgetting vs model width, all pretrained to one English loss
    python experiments/sweep.py --study=tpp        # forgetting vs pretraining length (tokens per parameter)
    python experiments/sweep.py --study=mixture    # English/Spanish mixture frontier, Chinchilla vs over-trained
    python experiments/sweep.py --study=lr         # pretraining LR (all to one English loss) x finetuning LR
    python experiments/sweep.py --study=compute    # lower LR vs high LR + growing replay fraction: time to match
    python experiments/sweep.py --study=toy_orders # the toy continual demo in other task orders and seeds
    python experiments/sweep.py --study=methods    # the method comparison in the study's regime: small forgetting, seeds
    python experiments/sweep.py --study=all

Each run lives in its own folder under out/sweeps/, named by its settings, so studies share the
runs they have in common (the base model is pretrained once). A finished run is skipped and an
interrupted one resumes (--resume=True), so a study can be stopped at any point and started again,
in a later session too. Folder names hold only what the studies vary: after changing any other
constant (block_size, finetune_lr, ...) give a fresh --out_root, or old runs will be reused. Each
study writes results/sweep_<study>.json (the numbers, and the seconds its runs took) and
results/sweep_<study>.png (via plot.py).

The protocol, shared by every study: pretrain on English (cosine LR to the end of a token budget),
sample a replay corpus from the model itself (prompted by the English dataset token), then finetune
on Spanish until the Spanish validation loss reaches a target, capped at a maximum number of steps.
The target is the Spanish loss that a target run (plain finetuning of the study's base model for
a fixed number of steps) reaches, so every run is compared at the same new-data loss.
Forgetting = English validation loss at that point minus English loss before finetuning.

Needs the 512-token data: python data/bible/prepare.py --vocab_size=512 --out_dir=bible512
(a 4096-token embedding would hold most of the parameters of a width-32 model).
"""
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: model.py, support/

from evaluate import at_target
from model import paper_parameter_count
from replay import load_corpus
from support.checkpoint import load_checkpoint_dict
from support.config import UserError, apply_overrides, run
from support.files import atomic_write_text, read_jsonl

study = "all"                   # size, tpp, mixture, lr, compute or all
out_root = "out/sweeps"
results_dir = "results"
profile = "cpu"                 # "cpu" (CPU-mini, minutes on 2 cores) or "gpu"
                                # (larger, for one GPU; untested)

# CPU-mini profile: depth 2, heads of 16, 64-token windows, batches of 32 sequences.
data_name = "bible512"
depth = 2
head_dim = 16
block_size = 64
batch_size = 32
base_width = 32                 # the base model of every study
base_tpp = 500.0                # its pretraining length: far past Chinchilla's 20 tokens/param
pretrain_lr = 3e-3
finetune_lr = 1e-3
target_steps = 300           # plain finetuning steps that set a study's Spanish target
cap_factor = 4                  # other runs may take up to cap_factor x target_steps to reach it
eval_sequences = 256
corpus_steps = 100              # each replay corpus holds this many steps' worth; runs sample more as they go
widths = "32,48,64,96"          # size study
coeffs = "0,1,3,10"             # KL replay coefficients (0 = plain finetuning)...
coefficient_seeds = "1337,1,2"  # ... each at these finetuning seeds (size, tpp and mixture studies)
tpps = "10,30,100,500,1000"     # tpp study
chinchilla_tpp = 20.0           # mixture study: the compute-optimal length...
es_shares = "0,0.25,0.5,0.75,1"  # ... and the Spanish shares of the pretraining mixtures
pretrain_lrs = "1e-3,3e-3,1e-2,3e-2"  # lr study: pretraining learning rates, each model pretrained...
lr_target_loss = 3.1            # ... until its English validation loss reaches this (the study's
                                # stop.target_loss), so every model starts finetuning equally good...
lr_tpp = 300.0                  # ... within this many tokens per parameter (the cosine's length)...
finetune_lrs = "3e-4,1e-3,3e-3"  # ... then finetuned at each of these learning rates (plain) ...
seeds = "1,2,3"                 # ... and seeds (lr study: pretraining and finetuning; compute: finetuning)
high_lr = 3e-3                  # compute study: the fast learning rate...
low_lrs = "1e-3,3e-4,1e-4,3e-5"  # ... the slower ones, down to where forgetting stops falling...
replay_fractions = "0.03125,0.0625,0.125,0.25,0.5"  # ... the share of each batch given to self-generated
                                                    # replay at high_lr (at least one row a step)...
replace_fractions = "0.00390625,0.0078125,0.015625,0.03125,0.0625,0.125,0.25,0.5"  # ... and replaced by
                                # real English rows, down to 1/256 as the study (under one row a step:
                                # a row every few steps)
compute_target_steps = 100   # plain steps at high_lr that set the compute study's target
compute_cap_steps = 8000        # enough for the lowest learning rate to get there
toy_orders = "reversal sort add modadd;add reversal sort modadd;sort modadd reversal add"  # toy_orders study:
toy_seeds = "1,2"               # every order x seed is one run of toy_continual.sh (its default settings)
# methods study: the study's method comparison in its own regime, where standard finetuning forgets
# a little (its 205M model: 0.11 nats), not several nats
methods = "standard,lora,kl_self,kl_real,ntp_self,ntp_real"
methods_width = 64              # more capacity than the base model: not pretrained to saturation...
methods_tpp = 100.0
methods_es_share = 0.05         # ... on English with a little Spanish, so Spanish tokens are known
methods_lr = 1e-4               # a small finetuning LR, the same for every method (the study: 1e-5)
methods_coeff = 1.0             # replay coefficient; at the study's 10, KL self-replay was still 0.02 nats of
                                # Spanish short of the target at the step cap (2,400 steps, 4x standard's)
methods_replay_batch = 8        # replay rows beside batch_size new ones (the study's 64 beside 256)
methods_lora_rank = 16          # LoRA-16 as the study, on the blocks only (Spanish tokens are known, the
                                # embeddings stay frozen)...
methods_lora_lr = 1e-3          # ... at its own LR: at methods_lr the adapters (which start at zero) were
                                # still far from the target at the step cap (rank 4: Spanish 3.15 after 2,000
                                # steps against 2.98)
methods_target_steps = 600      # standard finetuning steps that set the Spanish target (forgetting ~0.15)

GPU_PROFILE = {  # the paper's text model scale, for one GPU (untested here); --key=value still wins
    "data_name": "bible", "depth": 6, "head_dim": 64, "block_size": 256, "batch_size": 256, "base_width": 128,
    "widths": "64,128,256,512", "eval_sequences": 1024}

EN, ES = "bible512/en", "bible512/es"   # set from data_name in main()
FINETUNE_DEFAULT_SEED = 1337    # finetune.py's (and sample_replay.py's) default --seed
timings = {}   # run folder -> seconds, kept in out_root/timings.json across invocations
used = []      # the runs the current study relied on (run now or earlier), for its total time


def floats(text):
    return [float(x) for x in text.split(",") if x]


def ints(text):
    return [int(x) for x in text.split(",") if x]


# ----------------------------------------------------------------------------------------------
# running stages: skip what is finished, resume what was interrupted

def is_finished(out_dir):
    path = os.path.join(out_dir, "ckpt.pt")
    return os.path.exists(path) and bool(load_checkpoint_dict(path).get("finished"))


def launch(script, out_dir, args, fresh=True, env=None):
    """Run one pipeline script (a .py with --key=value args, or a .sh with settings in `env`) and
    record how long it took (added to the time so far when resuming)."""
    if fresh:
        timings.pop(out_dir, None)
    started = time.time()
    if script.endswith(".sh"):
        command = ["bash", script]
        print("+ " + " ".join(f"{k}='{v}'" for k, v in (env or {}).items()) + f" bash {script}", flush=True)
    else:
        command = [sys.executable, script, *[f"--{k}={v}" for k, v in args.items()]]
        print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=env and {**os.environ, **env})
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
    # --resume=True either way: it continues an interrupted run, or starts one (over the log of a run
    # killed before its first checkpoint) where there is none
    launch(script, out_dir, {**args, "out_dir": out_dir, "resume": True}, fresh=not resume)
    return out_dir


def paper_params(width):
    """12 L D^2 + D V: the parameter count tokens-per-parameter is measured against (as pretrain.py)."""
    vocab = json.load(open(os.path.join("data", EN, "meta.json")))["vocab_size"]
    return paper_parameter_count(depth, width, vocab)


def model_args(width):
    return {"width": width, "depth": depth, "head_dim": head_dim, "block_size": block_size}


def pretrain(width=None, tpp=None, es_share=0.0, lr=None, target_loss=0.0, seed=None):
    """An English (or English/Spanish mixture) model, cosine LR over `tpp` tokens per parameter;
    with target_loss it stops as soon as its English validation loss gets there."""
    width, tpp, lr = width or base_width, tpp or base_tpp, lr or pretrain_lr
    name = (f"w{width}_tpp{tpp:g}_es{es_share:g}_lr{lr:g}" + (f"_to{target_loss:.4f}" if target_loss else "")
            + (f"_s{seed}" if seed else ""))
    seed_arg = {"seed": seed} if seed else {}
    if es_share == 0:
        mix = {"datasets": EN, "eval_datasets": ES}
    elif es_share == 1:
        mix = {"datasets": ES, "eval_datasets": EN}
    else:
        mix = {"datasets": f"{EN},{ES}", "mixture": f"{1 - es_share:g},{es_share:g}"}
    steps = math.ceil(tpp * paper_params(width) / (batch_size * block_size))
    return train("pretrain.py", f"{out_root}/pretrain/{name}", **mix, **model_args(width),
                 batch_size=batch_size, tokens_per_param=tpp, max_steps=0, learning_rate=lr, schedule="cosine",
                 warmup_steps=min(100, steps // 10), target_val_loss=target_loss,
                 eval_interval=50 if target_loss else max(50, steps // 20), eval_sequences=eval_sequences,
                 **seed_arg)


def replay_corpus(model_dir, count, seed=None):
    """The model's own English samples, `count` of them; finetune.py samples more from the same
    model when a run needs more, so no run sees one twice."""
    path = os.path.join(model_dir, f"replay_en_{count}" + (f"_s{seed}" if seed else "") + ".pt")
    used.append(path)
    if not os.path.exists(path):
        args = {"init_from": f"{model_dir}/ckpt.pt", "prompts": EN, "num_samples": count,
                "batch_size": 512, "out": path, "resume": True,  # resume: continue a killed run's .partial
                **({"seed": seed} if seed else {})}
        launch("sample_replay.py", path, args, fresh=not os.path.exists(path + ".partial"))
    return path


def finetune(model_dir, name, target=0.0, max_steps=None, lr=None, coeff=0.0, replay_fraction=0.0,
             replace_fraction=0.0, eval_interval=25, seed=None, corpus_size=0, corpus_seed=None, extra=None):
    """Finetune on Spanish; with coeff > 0, KL(pretrained || model) on the model's own English samples.
    replay_fraction f splits each batch of batch_size sequences into (1 - f) Spanish and f replay,
    and weighs the KL by the ratio of the two, so the loss is the mean over all sequences.
    replace_fraction f instead replaces f of each batch by real English rows (the study's variant).
    corpus_seed: draw the replay corpus with this seed (its own file) instead of sample_replay.py's.
    extra: any other finetune.py settings (the methods study's)."""
    max_steps = max_steps or cap_factor * target_steps
    args = {"init_from": f"{model_dir}/ckpt.pt", "dataset": ES, "learning_rate": lr or finetune_lr,
            "batch_size": batch_size, "max_steps": max_steps, "target_val_loss": target,
            "eval_interval": eval_interval, "eval_sequences": eval_sequences, **({"seed": seed} if seed else {})}
    n_replay = batch_size
    if replay_fraction:
        n_replay = round(replay_fraction * batch_size)
        args.update(batch_size=batch_size - n_replay, replay_batch_size=n_replay)
        coeff = n_replay / (batch_size - n_replay)
    if replace_fraction:
        args.update(mix_dataset=EN, mix_fraction=replace_fraction)
    if coeff:
        args.update(replay="kl", replay_coeff=coeff,
                    replay_source=replay_corpus(model_dir, corpus_size or corpus_steps * n_replay, corpus_seed))
    args.update(extra or {})
    return train("finetune.py", f"{model_dir}/ft/{name}" + (f"_s{seed}" if seed else ""), **args)


# ----------------------------------------------------------------------------------------------
# reading results back

def log(run_dir):
    return read_jsonl(os.path.join(run_dir, "log.jsonl"))


def final_loss(model_dir, name="en"):
    return log(model_dir)[-1][f"val_loss/{name}"]


def outcome(run_dir, target):
    """A finetuning run at exactly the Spanish target (interpolated between the two evaluations
    around it, as evaluate.py --logs): English loss before and after, cost, replay passes."""
    records = log(run_dir)
    at, how = at_target(records, "val_loss/es", target)
    return {"steps": round(at["step"], 1), "train_seconds": round(at["train_seconds"], 3),
            "en_before": records[0]["val_loss/en"], "en_after": at["val_loss/en"], "es_after": at["val_loss/es"],
            "forgetting": at["val_loss/en"] - records[0]["val_loss/en"], "reached": how != "not reached",
            "how": how, "replay_passes": records[-1]["replay_passes"]}


def spanish_target(model_dir, steps=None, lr=None):
    """The Spanish loss plain finetuning of model_dir reaches in `steps` steps at `lr`."""
    steps = steps or target_steps
    ref = finetune(model_dir, f"target_lr{lr or finetune_lr:g}_{steps}", max_steps=steps, lr=lr)
    return log(ref)[-1]["val_loss/es"]


def model_info(model_dir, width):
    last, params = log(model_dir)[-1], paper_params(width)
    return {"dir": model_dir, "steps": last["step"], "en_loss": last.get("val_loss/en"),
            "es_loss": last.get("val_loss/es"), "paper_params": params, "tokens_per_param": last["tokens"] / params}


def write_results(stem, result, table):
    """results/<stem>.json (every number, and the seconds of the runs the study used) and .md (its
    table, from the same numbers)."""
    runs = sorted(set(used))
    result["seconds"] = round(sum(timings.get(r, 0.0) for r in runs), 1)
    result["runs"] = {"total": len(runs), "timed": sum(r in timings for r in runs)}
    used.clear()
    path = os.path.join(results_dir, f"{stem}.json")
    atomic_write_text(path, json.dumps(result, indent=1))
    text = table(result)
    atomic_write_text(path.replace(".json", ".md"), text)
    print(text + f"wrote {path} and .md ({result['seconds'] / 60:.1f} min of runs)")
    return path


def save(name, result, table):
    """A sweep study's results/sweep_<name>.json and .md, and its figure .png (plot.py)."""
    path = write_results(f"sweep_{name}", result, table)
    subprocess.run([sys.executable, "plot.py", f"--figure=sweep_{name}", f"--results={path}",
                    f"--out={os.path.join(results_dir, f'sweep_{name}.png')}"], check=True)


def lr_text(lr):
    """3e-4 rather than 0.0003."""
    return f"{lr:.0e}".replace("e-0", "e-")


def markdown(rows):
    """A list of rows (the first is the header) as a markdown table."""
    lines = ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join([lines[0], "|---" * len(rows[0]) + "|", *lines[1:]]) + "\n"


def forgetting_cell(o):
    """Forgetting over the seeds, mean (min..max); where a run hit its step cap, the highest Spanish
    loss such a run was read at."""
    return (f"{o['forgetting']:+.3f} ({o['forgetting_min']:+.3f}..{o['forgetting_max']:+.3f})"
            + ("" if o["reached"] else f" (cap: Spanish {o['es_after']:.2f})"))


def coefficient_table(models, columns):
    """size and tpp studies: a row per model, its forgetting at every KL coefficient.
    columns: {header: function(model row) -> cell} for the columns that describe the model."""
    cs = list(models[0]["finetune"])
    header = [*columns, "English before", *["plain" if c == "0" else f"KL coeff {c}" for c in cs], "replay passes"]
    return markdown([header] + [[*(cell(m) for cell in columns.values()), f"{m['en_loss']:.3f}",
                                 *(forgetting_cell(m["finetune"][c]) for c in cs),
                                 max(o["replay_passes"] for o in m["finetune"].values())] for m in models])


def mixture_table(result):
    rows = [["length", "English-only model", "25% Spanish mixture", "plain, at the end", "KL self-replay, at the end",
             "steps", "replay passes"]]
    for label, length in result["lengths"].items():
        shares = {f["es_share"]: f for f in length["frontier"]}
        english, mixed = shares[0.0], shares.get(0.25)
        def cell(ends, key, shift=0.0, sign=""):   # every seed's end: mean (min..max)
            mean, low, high = spread([e[key] - shift for e in ends])
            return f"{mean:{sign}.3f} ({low:{sign}.3f}..{high:{sign}.3f})"
        plain, kl = length["ends"]["plain"], length["ends"]["kl_self"]
        rows.append([f"{label}, {length['tpp']:g} TPP", f"en {english['en_loss']:.3f}, es "
                                                        f"{english['es_loss']:.3f}",
                     f"en {mixed['en_loss']:.3f}, es {mixed['es_loss']:.3f}" if mixed else "",
                     f"en {cell(plain, 'en_loss')}, es {cell(plain, 'es_loss')}",
                     f"en {cell(kl, 'en_loss')}, change {cell(kl, 'en_loss', english['en_loss'], '+')}, "
                     f"es {cell(kl, 'es_loss')}",
                     kl[0]["step"], max(e["replay_passes"] for e in kl)])
    return markdown(rows)


def lr_table(result):
    rows = [["pretrain LR", "tokens/param to reach the target", "English before",
             *[f"finetune LR {lr_text(f)}" for f in result["finetune_lrs"]]]]
    groups = {}
    for g in result["summary"]:
        groups.setdefault(g["pretrain_lr"], {})[g["finetune_lr"]] = g
    cell = lambda x: (f"{x['forgetting']:+.3f} ({x['forgetting_min']:+.3f}..{x['forgetting_max']:+.3f})"
                      + ("" if x["all_reached"] else " (not all reached)"))
    for plr, g in sorted(groups.items()):
        models = [m for m in result["models"] if m["pretrain_lr"] == plr]
        tpp = [m["tokens_per_param"] for m in models]
        before = f"{min(m['en_loss'] for m in models):.3f}..{max(m['en_loss'] for m in models):.3f}"
        rows.append([lr_text(plr), f"{min(tpp):.0f}..{max(tpp):.0f}" + ("" if all(m["reached"] for m in models)
                                                                      else " (not all reached)"),
                     before, *[cell(g[f]) for f in result["finetune_lrs"]]])
    return markdown(rows)


def compute_table(result):
    first = result["seeds"][0]
    arms = [["run", "steps", "seconds", "English after", "forgetting", "how", "replay passes"]]
    arms += [[a["arm"], f"{a['steps']:g}", f"{a['train_seconds']:.2f}", f"{a['en_after']:.3f}",
              f"{a['forgetting']:+.3f}", a["how"], a["replay_passes"]] for a in first["arms"]]
    ratios = [["lower LR", "its English loss", "self-generated replay", "real rows"]]
    for low_lr in dict.fromkeys(s["low_lr"] for s in result["summary"]):
        ends = [m["en_after"] for s in result["seeds"] for m in s["matches"] if m["low_lr"] == low_lr]
        cells = []
        for variant in ("self", "replace"):
            s = next(x for x in result["summary"] if x["low_lr"] == low_lr and x["variant"] == variant)
            cells.append(f"{'>= ' if s['at_least'] else ''}{s['median']:.3g}x "
                         f"({s['min']:.3g}..{s['max']:.3g})"
                         if s["median"] else "not matched")
        ratios.append([lr_text(low_lr), f"{min(ends):.2f}-{max(ends):.2f}", *cells])
    return (f"Seed {first['seed']}, every arm at the Spanish target:\n\n" + markdown(arms) +
            "\nTime for replay to end at each lower LR's English loss (median of the seeds, min..max):\n\n"
            + markdown(ratios))


# ----------------------------------------------------------------------------------------------
# the studies

def seed_args(seed):
    """finetune() arguments for one of coefficient_seeds: finetune.py's own default seed names its
    run without a seed (the studies' first runs, made before they had seeds) and uses the shared
    corpus; every other seed gets its own run and its own replay corpus."""
    return {} if seed == FINETUNE_DEFAULT_SEED else {"seed": seed, "corpus_seed": seed}


def replay_coefficients(model_dir, target):
    """Finetune one model to the Spanish target at every KL coefficient and finetuning seed:
    {coeff: forgetting's mean, min and max over the seeds, and every seed's outcome}."""
    result = {}
    for c in floats(coeffs):
        runs = []
        for seed in ints(coefficient_seeds):
            ft = finetune(model_dir, f"kl{c:g}_to{target:.4f}", target=target, coeff=c, **seed_args(seed))
            runs.append({"seed": seed, **outcome(ft, target)})
        mean, low, high = spread([r["forgetting"] for r in runs])
        result[f"{c:g}"] = {"forgetting": mean, "forgetting_min": low, "forgetting_max": high,
                            "reached": all(r["reached"] for r in runs),
                            "es_after": max(r["es_after"] for r in runs),
                            "replay_passes": max(r["replay_passes"] for r in runs), "seeds": runs}
    return result


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
    save("size", {"study": "size", "spanish_target": target, "english_target": target_en, "models": rows},
         lambda r: coefficient_table(r["models"], {"width": lambda m: m["width"],
                                                   "parameters": lambda m: f"{m['paper_params']:,}",
                                                   "tokens/param": lambda m: f"{m['tokens_per_param']:.0f}"}))


def tpp_study():
    models = {tpp: pretrain(tpp=tpp) for tpp in floats(tpps)}
    target = spanish_target(models[base_tpp] if base_tpp in models else models[max(models)])
    rows = [{"tpp": tpp, **model_info(model_dir, base_width), "finetune": replay_coefficients(model_dir, target)}
            for tpp, model_dir in sorted(models.items())]
    save("tpp", {"study": "tpp", "spanish_target": target, "width": base_width, "models": rows},
         lambda r: coefficient_table(r["models"], {"tokens/param": lambda m: f"{m['tpp']:g}"}))


def mixture_study():
    result = {"study": "mixture", "width": base_width, "lengths": {}}
    for label, tpp in (("chinchilla", chinchilla_tpp), ("over-trained", base_tpp)):
        mixtures = {share: pretrain(tpp=tpp, es_share=share) for share in floats(es_shares)}
        frontier = [{"es_share": s, "en_loss": final_loss(d, "en"), "es_loss": final_loss(d, "es")}
                    for s, d in sorted(mixtures.items())]
        english = mixtures[0.0]
        trajectories, ends = {}, {}
        for name, c in (("plain", 0.0), ("kl_self", 1.0)):
            ends[name] = []
            for seed in ints(coefficient_seeds):   # the first seed's path is drawn, every seed's end kept
                ft = finetune(english, f"trajectory_kl{c:g}", coeff=c, max_steps=cap_factor * target_steps,
                              **seed_args(seed))
                path = [{"step": r["step"], "en_loss": r["val_loss/en"], "es_loss": r["val_loss/es"],
                         "replay_passes": r["replay_passes"]} for r in log(ft)]
                trajectories.setdefault(name, path)
                ends[name].append({"seed": seed, **path[-1]})
        result["lengths"][label] = {"tpp": tpp, "frontier": frontier, "finetune": trajectories, "ends": ends}
    save("mixture", result, mixture_table)


def lr_study():
    """The study's design: every pretraining LR x seed pretrained until its English loss reaches
    lr_target_loss (so all start finetuning from the same loss), then plain finetuning at every
    finetuning LR to one Spanish target (set by the pretrain_lr model of the first seed at
    finetune_lr). Forgetting against the Spanish loss, per pretraining LR."""
    models = {(lr, seed): pretrain(tpp=lr_tpp, lr=lr, target_loss=lr_target_loss, seed=seed)
              for lr in floats(pretrain_lrs) for seed in ints(seeds)}
    target = spanish_target(models[(pretrain_lr, ints(seeds)[0])])
    rows, infos = [], []
    for (plr, seed), model_dir in sorted(models.items()):
        info = model_info(model_dir, base_width)
        infos.append({"pretrain_lr": plr, "seed": seed, **info, "reached": info["en_loss"] <= lr_target_loss})
        for flr in floats(finetune_lrs):
            # a lower finetuning LR needs proportionally more steps to reach the target
            cap = math.ceil(cap_factor * target_steps * max(1.0, finetune_lr / flr))
            ft = finetune(model_dir, f"lr{flr:g}_to{target:.4f}", target=target, lr=flr, max_steps=cap, seed=seed)
            before = log(ft)[0]["val_loss/en"]
            rows.append({"pretrain_lr": plr, "seed": seed, "finetune_lr": flr, **outcome(ft, target),
                         "curve": [(r["val_loss/es"], r["val_loss/en"] - before) for r in log(ft)]})
    save("lr", {"study": "lr", "spanish_target": target, "english_target": lr_target_loss,
                "tokens_per_param_cap": lr_tpp, "finetune_lrs": floats(finetune_lrs), "models": infos,
                "runs_table": rows, "summary": lr_summary(rows)}, lr_table)


def spread(values):
    """(mean, min, max) of one setting's values over its seeds."""
    return sum(values) / len(values), min(values), max(values)


def lr_summary(rows):
    """Per pretraining LR and finetuning LR: forgetting at the Spanish target, mean and range over seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["pretrain_lr"], r["finetune_lr"]), []).append(r)
    summary = []
    for (plr, flr), g in sorted(groups.items()):
        mean, low, high = spread([r["forgetting"] for r in g])
        summary.append({"pretrain_lr": plr, "finetune_lr": flr, "seeds": len(g),
                        "en_before": spread([r["en_before"] for r in g])[0],
                        "forgetting": mean, "forgetting_min": low, "forgetting_max": high,
                        "steps": spread([r["steps"] for r in g])[0], "all_reached": all(r["reached"] for r in g)})
    return summary


def compute_study():
    """Lower learning rates against the high one plus replay, every arm finetuned to one Spanish
    target; per finetuning seed, how much less time replay needs for the same English loss."""
    base = pretrain()
    target = spanish_target(base, steps=compute_target_steps, lr=high_lr)
    replay_cap = 10 * compute_target_steps  # replay arms at high_lr get there in a few hundred steps
    # one corpus for every fraction
    corpus_size = corpus_steps * round(max(floats(replay_fractions)) * batch_size)
    corpus = replay_corpus(base, corpus_size)
    _, corpus_meta = load_corpus(corpus)
    sample_seconds_per_sequence = corpus_meta["seconds"] / corpus_meta["count"]
    per_seed = []
    for seed in ints(seeds):
        arms = []
        for lr in [high_lr] + floats(low_lrs):
            ft = finetune(base, f"lr{lr:g}_to{target:.4f}", target=target, lr=lr, max_steps=compute_cap_steps,
                          eval_interval=10, seed=seed)
            arms.append({"arm": f"lr {lr:g}", "variant": "none", "learning_rate": lr, "replay_fraction": 0.0,
                         **outcome(ft, target), "curve": curve(ft)})
        self_shares, replace_shares = floats(replay_fractions), floats(replace_fractions)
        for f in sorted(set(self_shares) | set(replace_shares)):
            if f in self_shares:
                n_replay = round(f * batch_size)
                ft = finetune(base, f"lr{high_lr:g}_self{f:g}_to{target:.4f}", target=target, lr=high_lr,
                              replay_fraction=f, max_steps=replay_cap, eval_interval=10, seed=seed,
                              corpus_size=corpus_size)
                result = outcome(ft, target)
                # self-generated replay costs its sampling too: the share of the corpus this run consumed
                result["sample_seconds"] = round(result["steps"] * n_replay * sample_seconds_per_sequence, 3)
                result["train_seconds"] += result["sample_seconds"]
                arms.append({"arm": f"lr {high_lr:g} + self-generated {f:g}", "variant": "self",
                             "learning_rate": high_lr, "replay_fraction": f, **result, "curve": curve(ft)})
            if f in replace_shares:
                ft = finetune(base, f"lr{high_lr:g}_replace{f:g}_to{target:.4f}", target=target, lr=high_lr,
                              replace_fraction=f, max_steps=replay_cap, eval_interval=10, seed=seed)
                arms.append({"arm": f"lr {high_lr:g} + real rows {f:g}", "variant": "replace",
                             "learning_rate": high_lr, "replay_fraction": f, **outcome(ft, target),
                             "curve": curve(ft)})
        per_seed.append({"seed": seed, "arms": arms, "matches": match_old_loss(arms)})
    save("compute", {"study": "compute", "spanish_target": target,
                     "sample_seconds_per_sequence": sample_seconds_per_sequence, "seeds": per_seed,
                     "summary": compute_summary(per_seed)}, compute_table)


def curve(run_dir):
    return [(r["train_seconds"], r["val_loss/en"]) for r in log(run_dir)]


def match_old_loss(arms):
    """For every lower learning rate: the English loss it ends at (at the Spanish target) and the
    time it took; and for each replay variant at high_lr, the time to end at that same English loss,
    interpolated between the two replay fractions around it. When even the smallest fraction ends
    lower, its time is an upper bound, and the ratio a lower bound ("at_least")."""
    matches = []
    for low in [a for a in arms if a["variant"] == "none" and a["learning_rate"] < high_lr and a["reached"]]:
        goal, row = low["en_after"], {"low_lr": low["learning_rate"], "en_after": low["en_after"],
                                       "seconds": low["train_seconds"]}
        for variant in ("self", "replace"):
            points = sorted(((a["replay_fraction"], a["en_after"], a["train_seconds"]) for a in arms
                             if a["variant"] == variant and a["reached"]))
            seconds, at_least = None, False
            for i, (_, english, t) in enumerate(points):
                if english <= goal:
                    if i == 0:
                        seconds, at_least = t, True
                    else:
                        _, english0, t0 = points[i - 1]
                        seconds = t0 + (english0 - goal) / (english0 - english) * (t - t0)
                    break
            row[variant] = {"seconds": seconds, "ratio": seconds and low["train_seconds"] / seconds,
                            "at_least": at_least}
        matches.append(row)
    return matches


def compute_summary(per_seed):
    """The time ratio per lower learning rate and replay variant: every seed's, median, min, max."""
    summary = []
    for i, first in enumerate(per_seed[0]["matches"]):
        for variant in ("self", "replace"):
            ratios = [s["matches"][i][variant]["ratio"] for s in per_seed if i < len(s["matches"])]
            known = sorted(r for r in ratios if r)
            summary.append({"low_lr": first["low_lr"], "variant": variant, "ratios": ratios,
                            "median": known[len(known) // 2] if known else None,
                            "min": known[0] if known else None, "max": known[-1] if known else None,
                            "at_least": any(s["matches"][i][variant]["at_least"] for s in per_seed)})
    return summary


def toy_orders_study():
    """The toy continual demo in several task orders and seeds: after the last task, does replay keep
    every task (>= 0.98 exact match) and does plain finetuning lose the earlier ones (mean <= 0.40)?"""
    rows = []
    for order in [o.split() for o in toy_orders.split(";") if o.strip()]:
        for seed in ints(toy_seeds):
            out_dir = f"{out_root}/toy/{'-'.join(order)}_s{seed}"
            result_path = f"{out_dir}/result.json"
            used.append(out_dir)
            if not os.path.exists(result_path):
                launch("toy_continual.sh", out_dir, {}, env={"ORDER": " ".join(order), "SEED": str(seed),
                                                             "OUT": out_dir, "RESULTS": f"{out_dir}/result"})
            result = json.load(open(result_path))
            replay, plain = result["arms"]["replay"], result["arms"]["no_replay"]
            earlier = [plain[t] for t in order[:-1]]
            rows.append({"order": order, "seed": seed, "replay": replay, "no_replay": plain,
                         "replay_min": min(replay.values()), "no_replay_earlier_mean": sum(earlier) / len(earlier),
                         "replay_passes": result["steps"]["replay"].get("replay_passes"),
                         "seconds": result["seconds"]})
    bars = {"replay_min": 0.98, "no_replay_earlier_mean": 0.40}
    for r in rows:
        r["meets_bars"] = (r["replay_min"] >= bars["replay_min"]
                           and r["no_replay_earlier_mean"] <= bars["no_replay_earlier_mean"])
    write_results("toy_continual_orders", {"study": "toy_orders", "bars": bars, "trials": rows,
                                           "all_meet_bars": all(r["meets_bars"] for r in rows)}, toy_orders_table)


def toy_orders_table(result):
    per_task = lambda r, arm: " / ".join(f"{t} {r[arm][t]:.3f}" for t in r["order"])
    return markdown([["order", "seed", "replay: accuracy per task (in order)", "replay min", "no replay: per task",
                      "no replay, earlier tasks' mean", "replay passes", "seconds", "bars met"]]
                    + [[" > ".join(r["order"]), r["seed"], per_task(r, "replay"), f"{r['replay_min']:.3f}",
                        per_task(r, "no_replay"), f"{r['no_replay_earlier_mean']:.3f}", r["replay_passes"],
                        f"{r['seconds']:.0f}", "yes" if r["meets_bars"] else "NO"] for r in result["trials"]])


def methods_study():
    """The method comparison in the study's regime: a model that knows a little Spanish, finetuned
    on Spanish at a small LR by each method (KL / NTP on self-generated / real English replay,
    LoRA, standard) to one Spanish target, every method at several finetuning seeds."""
    base = pretrain(width=methods_width, tpp=methods_tpp, es_share=methods_es_share)
    target = spanish_target(base, steps=methods_target_steps, lr=methods_lr)
    cap = cap_factor * methods_target_steps
    runs = []
    for method in methods.split(","):
        lr = methods_lora_lr if method == "lora" else methods_lr
        for seed in ints(seeds):
            coeff = f"_c{methods_coeff:g}" if method.endswith(("_self", "_real")) else ""
            ft = finetune(base, f"{method}{coeff}_lr{lr:g}_to{target:.4f}", target=target, lr=lr, max_steps=cap,
                          seed=seed, extra=method_args(base, method, seed))
            runs.append({"method": method, "seed": seed, **outcome(ft, target)})
    summary = methods_summary(runs)
    save("methods", {"study": "methods", "model": model_info(base, methods_width), "es_share": methods_es_share,
                     "spanish_target": target, "finetune_lr": methods_lr, "lora_lr": methods_lora_lr,
                     "coeff": methods_coeff,
                     "lora_rank": methods_lora_rank, "runs_table": runs, "summary": summary,
                     "verdicts": methods_verdicts(summary)}, methods_table)


def method_args(model_dir, method, seed):
    """finetune.py settings of one method: standard, lora, or <kl|ntp>_<self|real> replay."""
    if method == "standard":
        return {}
    if method == "lora":
        return {"lora_rank": methods_lora_rank}
    kind, source = method.split("_")
    args = {"replay": kind, "replay_coeff": methods_coeff, "replay_batch_size": methods_replay_batch}
    if source == "self":   # a corpus per seed, so the seeds draw different replay
        args["replay_source"] = replay_corpus(model_dir, corpus_steps * methods_replay_batch, seed)
    else:                  # real English rows, in a different order per seed
        args["replay_source"] = f"data:{EN}"
    return args


def methods_summary(runs):
    """Per method: forgetting's mean, sample standard deviation, min and max over the seeds."""
    summary = []
    for method in dict.fromkeys(r["method"] for r in runs):
        group = [r for r in runs if r["method"] == method]
        f = [r["forgetting"] for r in group]
        mean, low, high = spread(f)
        std = math.sqrt(sum((x - mean) ** 2 for x in f) / (len(f) - 1)) if len(f) > 1 else 0.0
        summary.append({"method": method, "seeds": len(f), "forgetting": mean, "std": std, "min": low,
                        "max": high, "steps": spread([r["steps"] for r in group])[0],
                        "en_before": group[0]["en_before"], "reached": sum(r["reached"] for r in group)})
    return summary


# the study's orderings: (claim, method a, method b, what the study found of a against b)
METHOD_CLAIMS = [("replay keeps English: KL self-replay forgets less than standard", "kl_self", "standard", "less"),
                 ("self-generated ~ real replay (KL)", "kl_self", "kl_real", "same"),
                 ("self-generated ~ real replay (NTP)", "ntp_self", "ntp_real", "same"),
                 ("KL beats NTP on self-generated replay", "kl_self", "ntp_self", "less"),
                 ("KL beats NTP on real replay", "kl_real", "ntp_real", "less"),
                 ("LoRA forgets too: more than KL self-replay", "kl_self", "lora", "less"),
                 ("LoRA forgets no less than standard", "lora", "standard", "not less")]


def methods_verdicts(summary):
    """Each of the study's orderings, judged against the seed spread: a difference counts only when
    the two methods' ranges over the seeds (min..max) do not overlap."""
    by = {m["method"]: m for m in summary}
    verdicts = []
    for claim, a, b, found in METHOD_CLAIMS:
        if a not in by or b not in by:
            continue
        x, y = by[a], by[b]
        diff = x["forgetting"] - y["forgetting"]
        separated = x["max"] < y["min"] or y["max"] < x["min"]
        holds = {"less": separated and diff < 0, "same": not separated,
                 "not less": not (separated and diff < 0)}[found]
        verdicts.append({"claim": claim, "a": a, "b": b, "difference": diff, "beyond_spread": separated,
                         "holds": holds})
    return verdicts


def methods_table(result):
    rows = [["method", "forgetting (mean ± sd)", "min..max", "steps to target", "reached"]]
    rows += [[m["method"], f"{m['forgetting']:+.4f} ± {m['std']:.4f}", f"{m['min']:+.4f}..{m['max']:+.4f}",
              f"{m['steps']:.0f}", f"{m['reached']}/{m['seeds']}"] for m in result["summary"]]
    claims = [["the study's ordering", "difference (a - b)", "beyond the seed spread", "holds here"]]
    claims += [[f"{v['claim']} ({v['a']} vs {v['b']})", f"{v['difference']:+.4f}",
                "yes" if v["beyond_spread"] else "no", "yes" if v["holds"] else "NO"] for v in result["verdicts"]]
    return (f"English before finetuning {result['summary'][0]['en_before']:.4f}; Spanish target "
            f"{result['spanish_target']:.4f}; forgetting over {result['summary'][0]['seeds']} finetuning seeds:\n\n"
            + markdown(rows) + "\n" + markdown(claims))


STUDIES = {"size": size_study, "tpp": tpp_study, "mixture": mixture_study, "lr": lr_study, "compute": compute_study,
           "toy_orders": toy_orders_study, "methods": methods_study}


def main():
    global timings, EN, ES
    if profile == "gpu":
        globals().update(GPU_PROFILE)
        apply_overrides(globals(), sys.argv[1:])
    EN, ES = f"{data_name}/en", f"{data_name}/es"
    if study != "toy_orders" and not os.path.exists(os.path.join("data", EN, "meta.json")):
        raise UserError(f"data/{EN} not found: run python data/bible/prepare.py "
                        f"--vocab_size=512 --out={data_name}")
    if study != "all" and study not in STUDIES:
        raise UserError(f"--study={study!r} must be one of {', '.join(STUDIES)} or all")
    timings_path = os.path.join(out_root, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    for name, function in STUDIES.items():
        if study in (name, "all"):
            function()


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: scripts run by their paths from there
    run(main, globals())
