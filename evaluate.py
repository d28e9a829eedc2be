"""
Stage 4: measure forgetting. For every checkpoint x dataset: validation next-token loss, KL to a
reference checkpoint (usually the model before finetuning), and for toy tasks greedy exact-match
accuracy. Forgetting is the change from the reference: loss increase, accuracy drop.

    python evaluate.py --checkpoints=plain=out/ft_plain/ckpt.pt,replay=out/ft_kl/ckpt.pt \
        --reference_checkpoint=out/pretrain_add/ckpt.pt --datasets=arithmetic/add,arithmetic/sort

Prints a markdown table and writes out_json (and out_md if set). The JSON holds, per checkpoint
("arms"), the accuracy of every toy dataset, and in "metrics" everything measured.

Methods are compared at the same new-data loss, read off their finetuning logs (the validation
windows the runs stopped on): for every run, each logged metric at the point where `match` falls to
the target, linearly interpolated between the two evaluations around it.

    python evaluate.py --logs=standard=out/en_es/standard/log.jsonl,kl=out/en_es/kl_self/log.jsonl \
        --match=val_loss/es=4.744 --out_json=results/method_comparison.json
"""
import math
import os
import time
from itertools import repeat

import torch

from model import GPTConfig, KVCache
from objective import kl_from_reference_side, ntp_loss, reference_side
from support.checkpoint import load_checkpoint
from support.config import UserError, pick_device, pick_dtype, run
from support.dataset import Benchmark, check_compatible, check_short_names, dataset_files, open_eval_set
from support.files import atomic_write_text, check_writable, read_jsonl, refuse_inputs, write_json
from support.progress import progress_bar

checkpoints = "finetuned=out/finetune/ckpt.pt"   # comma-separated name=path (a bare path is named by itself)
reference_checkpoint = "out/pretrain_add/ckpt.pt"  # the model before finetuning; "" = none (no KL, no forgetting)
datasets = ""                                    # comma-separated (or corpus:<path>); "" = the reference's
block_size = 0                                   # text windows of this many tokens;
                                                 # 0 = the model's block_size
eval_sequences = 2048
out_json = "results/eval.json"
out_md = ""
started_at = 0.0                                 # unix time the experiment began; recorded as "seconds"
time_runs = ""                                   # comma-separated run folders and replay corpora of the
                                                 # experiment: report where its time went
device = "auto"
dtype = "float32"                                # "bfloat16" autocasts the matmuls;
                                                 # "auto": bfloat16 where this machine runs it fast
memory_gb = 3.0                                  # the most logits held at once: 1/3 a batch's, 2/3 the
                                                 # reference's kept between checkpoints (beyond: smaller
                                                 # batches, recomputed reference logits; same numbers)
# -- comparison at matched loss, from finetuning logs instead of checkpoints
logs = ""                                        # comma-separated name=path/to/log.jsonl
match = ""                                       # key=target, e.g. val_loss/es=4.744


# ----------------------------------------------------------------------------------------------
# measuring a model on datasets: used here and, every eval_interval steps, by pretrain.py and
# finetune.py, so that training logs and this script's reports are the same numbers

# how evaluate_on's numbers are named in training logs, e.g. "val_loss/add"
LOG_NAMES = {"loss": "val_loss", "kl": "val_kl", "accuracy": "accuracy"}


# memory for the logits evaluation holds at once: 1/3 for one batch's (and the float32 copies the
# losses make of them), 2/3 for the reference's side of the KL kept between calls (on every dataset
# together: a finetuning run measures the same windows at every evaluation, and recomputing the
# reference costs a forward pass each time). Beyond these, batches get smaller and the reference is
# recomputed, so memory does not grow with the number of windows or datasets (a 49k vocabulary makes
# 200 MB of logits for one 256-token window)
MEMORY_BYTES = 3 << 30


def held_bytes(cache):
    """The memory a reference cache ({batch: reference_side tensors}) holds."""
    return sum(t.numel() * t.element_size() for side in cache.values() for t in side)


@torch.no_grad()
def evaluate_on(model, dataset, block_size, max_sequences=2048, device="cpu", reference=None,
                reference_cache=None, batch_size=256, logits_bytes=MEMORY_BYTES // 3,
                cache_bytes=MEMORY_BYTES * 2 // 3):
    """Validation numbers on the fixed validation sequences, from one forward pass of the model:
    "loss", the mean next-token loss; "kl", the mean KL(reference || model), when a frozen reference
    is given (its side of the KL can be kept between calls: pass a dict as reference_cache, one per
    dataset, which holds at most cache_bytes; a batch's logits take at most logits_bytes; reference
    may be the model itself, as at a finetuning run's step 0: then its logits serve as both);
    and on a toy task's rows "accuracy", the exact-match accuracy of greedy decoding. That needs no
    decoding: greedy decoding writes a row's whole answer exactly when, fed the true answer so far,
    the model's most likely next token is the true one at every answer position (where decoding
    would first go wrong, so does that argmax), and the loss's logits hold those argmaxes."""
    meta = dataset.meta
    answers = (meta["answer_start"], meta["answer_end"]) if "answer_start" in meta else None
    cache = reference_cache
    seq_len = meta.get("row_len") or block_size
    if seq_len:
        batch_size = max(1, min(batch_size, logits_bytes // (seq_len * model.config.vocab_size * 4 * 4)))
    totals, count = {"loss": 0.0}, 0
    if reference is not None:
        totals["kl"] = 0.0
    if answers:
        totals["accuracy"] = 0.0
    masks = (dataset.eval_masks(batch_size, block_size, max_sequences) if hasattr(dataset, "eval_masks")
             else repeat(None))
    batches = dataset.eval_batches("val", batch_size, block_size, max_sequences)
    for i, (x, mask) in enumerate(zip(batches, masks)):
        x = x.to(device)
        mask = None if mask is None else mask.to(device)  # e.g. a chat's answer: only its tokens count
        logits = model(x)
        totals["loss"] += ntp_loss(logits, x, mask).item() * len(x)
        if reference is not None:
            side = cache.get(i) if cache is not None else None
            if side is None:
                side = reference_side(logits if reference is model else reference(x))
                if cache is not None and held_bytes(cache) + held_bytes({i: side}) <= cache_bytes:
                    cache[i] = side
            totals["kl"] += kl_from_reference_side(logits, side, mask).item() * len(x)
        if answers:
            start, end = answers
            guess = logits[:, start - 1:end - 1].argmax(dim=-1)   # position p - 1 predicts token p
            totals["accuracy"] += (guess == x[:, start:end]).all(dim=1).sum().item()
        count += len(x)
    return {k: v / count for k, v in totals.items()}


@torch.no_grad()
def score_choices(model, items, device="cpu", progress=False):
    """Multiple-choice items by log-likelihood, as lm-evaluation-harness scores them: each choice's
    log-probability is the sum over its tokens after the item's context. items: [{"context": ids,
    "choices": [ids, ...]}]. Returns one (choices,) float64 tensor per item.

    Computed once and shared: the context prefix all items have in common (a chat template's system
    turn), then each item's context, whose keys and values serve all its choices in one batch."""
    prefix = min(len(item["context"]) for item in items) - 1  # at least one context token per item
    for item in items[1:]:
        while item["context"][:prefix] != items[0]["context"][:prefix]:
            prefix -= 1
    shared = KVCache(model.config, 1, device, model.embed.weight.dtype, max_length=max(prefix, 1))
    if prefix:
        model.hidden(torch.tensor([items[0]["context"][:prefix]], device=device), shared)
    scores = []
    for item in progress_bar(items, "scoring", disable=not progress):
        context, choices = item["context"], item["choices"]
        cache = shared.copy_to(1, len(context))
        last = model.hidden(torch.tensor([context[prefix:]], device=device), cache)[:, -1]
        longest = max(len(c) for c in choices)
        x = torch.tensor([c + [0] * (longest - len(c)) for c in choices], device=device)
        h = model.hidden(x, cache.copy_to(len(choices), len(context) + longest))
        # the context's last position predicts each choice's first token, position j its token j + 1
        h = torch.cat([last.expand(len(choices), -1)[:, None], h[:, :-1]], dim=1)
        logits = model.unembed(h)
        logits = logits if logits.dtype == torch.float64 else logits.float()  # (bf16 under autocast)
        logprobs = logits.log_softmax(-1).gather(-1, x[..., None])[..., 0]
        counted = torch.tensor([[j < len(c) for j in range(longest)] for c in choices], device=device)
        scores.append((logprobs * counted).sum(1).double().cpu())
    return scores


def benchmark_numbers(scores, items):
    """Per item, from its choices' log-likelihoods: acc (the most likely choice is right), acc_norm
    (the same after dividing each by its length in characters, lm-evaluation-harness's acc_norm) and
    p_correct (the right choice's probability among the choices: a smoother measure)."""
    acc, acc_norm, p_correct = [], [], []
    for s, item in zip(scores, items):
        gold = item["gold"]
        acc.append(float(s.argmax() == gold))
        acc_norm.append(float((s / torch.tensor(item["choice_chars"])).argmax() == gold))
        p_correct.append(s.softmax(0)[gold].item())
    return {"acc": acc, "acc_norm": acc_norm, "p_correct": p_correct}


def evaluate_benchmark(model, bench, device="cpu", progress=False):
    """A multiple-choice benchmark (dataset.Benchmark): mean acc, acc_norm and p_correct, and under
    "items" every item's numbers (for paired comparisons between models on the same items)."""
    numbers = benchmark_numbers(score_choices(model, bench.items, device, progress), bench.items)
    means = {k: sum(v) / len(v) for k, v in numbers.items()}
    numbers["p_correct"] = [round(p, 5) for p in numbers["p_correct"]]  # (compact in logs)
    return {**means, "items": numbers}


def evaluate_sets(model, sets, block_size, max_sequences, device, reference=None, reference_cache=None,
                  memory_bytes=MEMORY_BYTES):
    """evaluate_on on every dataset of sets ({name: dataset}), in eval mode: {short name: numbers}
    (a benchmark among them: evaluate_benchmark). reference_cache: a dict kept between calls, in
    which the frozen reference's side of the KL on each dataset's fixed sequences is computed once
    (as far as two thirds of memory_bytes hold it)."""
    was_training = model.training
    model.eval()
    results = {}
    for name, d in sets.items():
        if isinstance(d, Benchmark):
            results[d.short_name] = evaluate_benchmark(model, d, device)
            continue
        cache = None if reference_cache is None else reference_cache.setdefault(name, {})
        held_elsewhere = sum(held_bytes(kept) for other, kept in (reference_cache or {}).items() if other != name)
        results[d.short_name] = evaluate_on(model, d, block_size, max_sequences, device, reference, cache,
                                            logits_bytes=memory_bytes // 3,
                                            cache_bytes=memory_bytes * 2 // 3 - held_elsewhere)
    model.train(was_training)
    return results


def log_names(results):
    """evaluate_sets' numbers under the names training logs use: val_loss/add, val_kl/add,
    acc/mmlu, ... (a benchmark's per-item numbers: items/mmlu)."""
    return {f"{LOG_NAMES.get(k, k)}/{short}": v for short, numbers in results.items()
            for k, v in numbers.items()}


def time_split(paths):
    """Where an experiment's time went, from its run folders (and any below them) and replay corpus
    files: training (each log's train_seconds), sampling (the corpora's meta["seconds"], and fresh
    replay drawn during finetuning) and evaluation (each log's eval_seconds)."""
    split = {"sampling": 0.0, "training": 0.0, "evaluation": 0.0}
    files = [p for p in paths if os.path.isfile(p)]
    files += [os.path.join(folder, name) for p in paths if os.path.isdir(p)
              for folder, _, names in sorted(os.walk(p)) for name in sorted(names)]
    for path in files:
        name = os.path.basename(path)
        try:
            if name == "log.jsonl":
                last = read_jsonl(path, warn=False)[-1]   # its last whole record
                split["training"] += last.get("train_seconds", 0.0)
                split["sampling"] += last.get("replay_sample_seconds", 0.0)
                split["evaluation"] += last.get("eval_seconds", 0.0)
            elif name.endswith(".pt") and name != "ckpt.pt":
                corpus = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(corpus, dict) and "seconds" in corpus.get("meta", {}):
                    split["sampling"] += corpus["meta"]["seconds"]
        except Exception as e:
            raise UserError(f"--time_runs: {path} cannot be read ({type(e).__name__}): it is torn or damaged; "
                            "re-run that stage or leave it out") from None
    return {k: round(v, 1) for k, v in split.items()}


# ----------------------------------------------------------------------------------------------
# the report: checkpoints against the reference, or finetuning logs compared at matched loss

def parse_named(spec, what="--checkpoints"):
    named = {}
    for item in [s for s in spec.split(",") if s]:
        name, sep, path = item.partition("=")
        named[name if sep else item] = path if sep else item
    if not named:
        raise UserError(f"{what} is empty: give name=path pairs")
    return named


# dataset -> the reference's side of the KL on its fixed sequences, computed once for all models
reference_cache = {}


def measure(model, data, dev, reference_model=None):
    """{short name: numbers} for one checkpoint; its KL to the reference model is kl_to_reference."""
    results = evaluate_sets(model, {d.name: d for d in data}, block_size or model.config.block_size,
                            eval_sequences, dev, reference_model, reference_cache, int(memory_gb * 2 ** 30))
    return {short: {("kl_to_reference" if k == "kl" else k): v for k, v in numbers.items()}
            for short, numbers in results.items()}


def same_model(a, b):
    """Two model_configs describe the same architecture (a field left out = its default)."""
    return GPTConfig(**a).to_dict() == GPTConfig(**b).to_dict()


def write_report(report, table):
    """Print the markdown table, write the JSON report (and the table, with --out_md)."""
    print(table)
    write_json(out_json, report)
    if out_md:
        atomic_write_text(out_md, table + "\n")
    print(f"wrote {out_json}" + (f" and {out_md}" if out_md else ""))


def at_target(records, key, target):
    """Every numeric metric of a run at the point where records[key] first falls to `target`:
    (values, how). Linear interpolation between the evaluation before and the one at or below the
    target; how = "exact", "interpolated between steps A and B" or "not reached" (then: the run's
    last evaluation)."""
    for i, r in enumerate(records):
        if key in r and r[key] <= target:
            if r[key] == target or i == 0:
                return dict(r), "exact"
            prev = records[i - 1]
            w = (prev[key] - target) / (prev[key] - r[key])  # 0 at prev, 1 at r
            values = {k: prev[k] + w * (v - prev[k]) for k, v in r.items()
                      if isinstance(v, (int, float)) and isinstance(prev.get(k), (int, float))}
            values[key] = target  # exactly, not up to rounding
            return values, f"interpolated between steps {prev['step']} and {r['step']}"
    return dict(records[-1]), "not reached"


def compare_at_matched_loss():
    key, _, target = match.partition("=")
    try:
        target = float(target)
    except ValueError:
        key = ""
    if not key:
        raise UserError(f"--match={match!r} must be key=target, e.g. val_loss/es=4.744")
    check_outputs()
    rows, named = {}, parse_named(logs, "--logs")
    for name, path in named.items():
        if not os.path.exists(path):
            raise UserError(f"{path} not found: run that finetuning first")
        records = read_jsonl(path)
        if not records or key not in records[-1]:
            raise UserError(f"{path} has no {key}: finetune with that dataset tracked")
        values, how = at_target(records, key, target)
        start = records[0]
        row = {"how": how, "step": values["step"], "replay_passes": records[-1].get("replay_passes"),
               "best": min(r[key] for r in records if key in r)}
        measured = dict.fromkeys(k.split("/", 1)[1] for k in values if k.startswith(("val_loss/", "val_kl/")))
        for data in measured:
            loss, kl = values.get(f"val_loss/{data}"), values.get(f"val_kl/{data}")
            row[f"val_loss/{data}"] = loss
            if f"val_loss/{data}" != key and loss is not None and f"val_loss/{data}" in start:
                row[f"forgetting/{data}"] = loss - start[f"val_loss/{data}"]  # old data: the loss increase
            if kl is not None:
                row[f"val_kl/{data}"] = kl
        rows[name] = row
    report = {"match": key, "target": target, "runs": rows, "logs": named}
    table = matched_table(rows, key, target)
    write_report(report, table)


def matched_table(rows, key, target):
    metrics = [k for k in dict.fromkeys(k for r in rows.values() for k in r) if "/" in k and k != key]
    lines = [f"At {key} = {target:.4f}:", "",
             "| method | " + " | ".join(metrics) + " | step | how | replay passes |",
             "|---" * (len(metrics) + 4) + "|"]
    for name, r in rows.items():
        how = r["how"] + (f" (best {r['best']:.3f})" if r["how"] == "not reached" else "")
        cells = ["" if r.get(m) is None else f"{r[m]:+.3f}" if m.startswith("forgetting/") else f"{r[m]:.3f}"
                 for m in metrics]
        passes = "" if r["replay_passes"] is None else r["replay_passes"]  # None: not a finetuning log
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['step']:.0f} | {how} | {passes} |")
    return "\n".join(lines)


def check_outputs():
    """Fail before the measuring, not after it, if the report cannot be written or would replace
    one of the files it is made from (a checkpoint, a log, a dataset file)."""
    named = [p.split("=", 1)[-1] for p in f"{checkpoints},{reference_checkpoint},{logs},{time_runs}".split(",") if p]
    inputs = named + [f for n in datasets.split(",") if n for f in dataset_files(n)]
    for setting, path in (("--out_json", out_json), ("--out_md", out_md)):
        if path:
            refuse_inputs(path, inputs, setting)
            check_writable(path)


def main():
    began = time.time()
    if logs:
        return compare_at_matched_loss()
    check_outputs()
    if not memory_gb > 0:
        raise UserError(f"--memory_gb={memory_gb} must be a positive number of GiB (e.g. 3)")
    missing = [f for f in time_runs.split(",") if f and not os.path.exists(f)]
    if missing:
        raise UserError(f"--time_runs: {missing[0]} does not exist: give the experiment's run "
                        "folders and corpora")
    split = time_split(time_runs.split(",")) if time_runs else None  # read (and checked) before the measuring
    dev = pick_device(device)
    named = parse_named(checkpoints)
    ref_model, ref_ckpt = load_checkpoint(reference_checkpoint, dev) if reference_checkpoint else (None, None)
    models, steps, ckpts = {}, {}, {}
    for name, path in named.items():
        models[name], ckpt = load_checkpoint(path, dev)
        ckpts[path] = ckpt
        steps[name] = {"step": ckpt.get("step"), "stop_reason": ckpt.get("stop_reason"),
                       "replay_passes": ckpt.get("replay_passes")}  # None: not a finetuning checkpoint
        models[name].eval()
        if ref_model is not None and not same_model(ckpt["model_config"], ref_ckpt["model_config"]):
            raise UserError(f"checkpoint {path} has config {ckpt['model_config']} but the "
                            f"reference {reference_checkpoint} has "
                            f"{ref_ckpt['model_config']}: compare checkpoints of the same model")
    first_ckpt = ref_ckpt or ckpt
    names = [d for d in datasets.split(",") if d] or list(first_ckpt.get("data", {}))
    if not names:
        raise UserError("no datasets to evaluate: pass --datasets=name1,name2")
    data = [open_eval_set(n) for n in names]
    check_short_names(data)
    for path, ckpt in [(reference_checkpoint, ref_ckpt), *ckpts.items()]:
        if ckpt is not None and block_size > ckpt["model_config"]["block_size"]:
            raise UserError(f"--block_size={block_size} is longer than the {ckpt['model_config']['block_size']} "
                            f"tokens {path} was built for: pass at most that (0 = the model's)")
        for d in data if ckpt is not None else []:  # every model must read every dataset's tokens
            check_compatible(d.meta, ckpt["model_config"], f"{d.dir} (for {path})", ckpt)
            d.check_length(block_size or ckpt["model_config"]["block_size"])

    results = {}
    chosen_dtype = pick_dtype(dtype, dev)
    autocast = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=chosen_dtype == "bfloat16")
    with autocast:
        if ref_model is not None:
            # measured as its own reference: its logits fill the cache the checkpoints' KL reads
            ref_model.eval()
            results["reference"] = {short: {k: v for k, v in numbers.items() if k != "kl_to_reference"}
                                    for short, numbers in measure(ref_model, data, dev, ref_model).items()}
        for name, model in models.items():
            results[name] = measure(model, data, dev, ref_model)
    for name in models:
        for short, m in results[name].items() if ref_model is not None else ():
            ref = results["reference"][short]
            if "loss" in m:  # (a benchmark has accuracies only: acc, acc_norm, p_correct)
                m["forgetting_loss"] = m["loss"] - ref["loss"]
            if "accuracy" in m:
                m["forgetting_accuracy"] = ref["accuracy"] - m["accuracy"]
    # an exact-match accuracy is a mean over n rows: its standard error is sqrt(p (1 - p) / n)
    rows = {d.short_name: min(eval_sequences, len(d.splits["val"])) for d in data if "answer_start" in d.meta}
    for numbers in results.values():
        for short, m in numbers.items():
            if "accuracy" in m and short in rows:
                m["accuracy_se"] = math.sqrt(m["accuracy"] * (1 - m["accuracy"]) / rows[short])

    accuracies = {name: {s: m["accuracy"] for s, m in results[name].items() if "accuracy" in m}
                  for name in named}
    report = {"dtype": chosen_dtype, "arms": accuracies,
              "metrics": results,
              "steps": steps,
              "checkpoints": named,
              "reference": reference_checkpoint or None}
    if started_at:
        report["seconds"] = round(time.time() - started_at, 1)
    if split:  # sampling, training, evaluation (the runs' and this script's), other = the rest
        split["evaluation"] = round(split["evaluation"] + time.time() - began, 1)
        if started_at:
            split["other"] = round(report["seconds"] - sum(split.values()), 1)
        report["time_split"] = split
    table = markdown_table(results, [d.short_name for d in data], steps)
    write_report(report, table)


def markdown_table(results, dataset_names, steps):
    """One row per checkpoint, per dataset: accuracy (toy tasks, +- its standard error), loss, and KL to
    the reference;
    then the training steps of the checkpoint (and why it stopped) and how many times its most-used
    replay sequence was seen (replay passes; 0 = no replay)."""
    columns = []
    for s in dataset_names:
        for key, label in (("accuracy", "acc"), ("loss", "loss"), ("kl_to_reference", "KL"), ("acc", "acc"),
                           ("acc_norm", "acc_norm"), ("p_correct", "p_correct")):
            if any(key in results[row][s] for row in results):
                columns.append((s, key, f"{s} {label}"))
    lines = ["| model | " + " | ".join(c[2] for c in columns) + " | steps | replay passes |",
             "|---" * (len(columns) + 3) + "|"]
    for row, metrics in results.items():
        cells = []
        for s, key, _ in columns:
            value, se = metrics[s].get(key), metrics[s].get(f"{key}_se")
            cells.append("" if value is None else f"{value:.3f}" + ("" if se is None else f" ± {se:.3f}"))
        step = steps.get(row, {})
        reached = step.get("stop_reason") != "target not reached"
        note = f"{step.get('step')}" + ("" if reached else " (target not reached)")
        passes = "" if step.get("replay_passes") is None else step["replay_passes"]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {note if step else ''} | {passes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run(main, globals())
