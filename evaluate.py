"""
Stage 4: measure forgetting. For every checkpoint x dataset: validation next-token loss, KL to a
reference checkpoint (usually the model before finetuning), and for toy tasks greedy exact-match
accuracy. Forgetting is the change from the reference: loss increase, accuracy drop.

    python evaluate.py --checkpoints=plain=out/ft_plain/ckpt.pt,replay=out/ft_kl/ckpt.pt \
        --reference=out/pretrain_add/ckpt.pt --datasets=arithmetic/add,arithmetic/sort

Prints a markdown table and writes out_json (and out_md if set). The JSON holds, per checkpoint
("arms"), the accuracy of every toy dataset, and in "metrics" everything measured.
"""
import time

from common import (UserError, answer_accuracy, atomic_write_text, check_compatible, eval_loss, eval_loss_and_kl,
                    load_checkpoint, open_eval_set, pick_device, run, write_json)
from model import GPTConfig

checkpoints = "finetuned=out/finetune/ckpt.pt"   # comma-separated name=path (a bare path is named by itself)
reference = "out/pretrain_add/ckpt.pt"          # "" = no reference (no KL, no forgetting columns)
datasets = ""                                    # comma-separated (or corpus:<path>); "" = the reference's
block_size = 0                                   # text windows of this many tokens; 0 = the model's block_size
eval_sequences = 2048
out_json = "results/eval.json"
out_md = ""
started_at = 0.0                                 # unix time the experiment began; recorded as "seconds"
device = "auto"


def parse_named(spec):
    named = {}
    for item in [s for s in spec.split(",") if s]:
        name, sep, path = item.partition("=")
        named[name if sep else item] = path if sep else item
    if not named:
        raise UserError("--checkpoints is empty: give name=path pairs")
    return named


reference_logits = {}  # dataset -> the reference's logits on its fixed sequences, computed once for all models


def measure(model, reference_model, data, dev):
    T = block_size or model.config.block_size
    if reference_model is not None and reference_model is not model:
        loss, kl = eval_loss_and_kl(model, reference_model, data, T, max_sequences=eval_sequences, device=dev,
                                    reference_cache=reference_logits.setdefault(data.name, {}))
        out = {"loss": loss, "kl_to_reference": kl}
    else:
        out = {"loss": eval_loss(model, data, T, max_sequences=eval_sequences, device=dev)}
    if "answer_start" in data.meta:
        out["accuracy"] = answer_accuracy(model, data, max_sequences=eval_sequences, device=dev)
    return out


def same_model(a, b):
    """Two model_configs describe the same architecture (older checkpoints lack the newer fields)."""
    return GPTConfig(**a).to_dict() == GPTConfig(**b).to_dict()


def main():
    dev = pick_device(device)
    named = parse_named(checkpoints)
    ref_model, ref_ckpt = load_checkpoint(reference, dev) if reference else (None, None)
    models, steps = {}, {}
    for name, path in named.items():
        models[name], ckpt = load_checkpoint(path, dev)
        steps[name] = {"step": ckpt.get("step"), "stop_reason": ckpt.get("stop_reason")}
        models[name].eval()
        if ref_model is not None and not same_model(ckpt["model_config"], ref_ckpt["model_config"]):
            raise UserError(f"checkpoint {path} has config {ckpt['model_config']} but the reference {reference} has "
                            f"{ref_ckpt['model_config']}: compare checkpoints of the same model")
    first_ckpt = ref_ckpt or ckpt
    names = [d for d in datasets.split(",") if d] or list(first_ckpt.get("data", {}))
    if not names:
        raise UserError("no datasets to evaluate: pass --datasets=name1,name2")
    data = [open_eval_set(n) for n in names]
    for d in data:
        check_compatible(d.meta, first_ckpt["model_config"], d.dir, first_ckpt)

    results = {}
    if ref_model is not None:
        ref_model.eval()
        results["reference"] = {d.short_name: measure(ref_model, None, d, dev) for d in data}
    for name, model in models.items():
        results[name] = {d.short_name: measure(model, ref_model, d, dev) for d in data}
        if ref_model is not None:
            for short, m in results[name].items():
                ref = results["reference"][short]
                m["forgetting_loss"] = m["loss"] - ref["loss"]
                if "accuracy" in m:
                    m["forgetting_accuracy"] = ref["accuracy"] - m["accuracy"]

    report = {"arms": {name: {s: m["accuracy"] for s, m in results[name].items() if "accuracy" in m} for name in named},
              "metrics": results,
              "steps": steps,
              "checkpoints": named,
              "reference": reference or None}
    if started_at:
        report["seconds"] = round(time.time() - started_at, 1)
    table = markdown_table(results, [d.short_name for d in data], steps)
    print(table)
    write_json(out_json, report)
    if out_md:
        atomic_write_text(out_md, table + "\n")
    print(f"wrote {out_json}" + (f" and {out_md}" if out_md else ""))


def markdown_table(results, dataset_names, steps):
    """One row per checkpoint, per dataset: accuracy (toy tasks), loss, and KL to the reference;
    then the training steps of the checkpoint (and why it stopped)."""
    columns = []
    for s in dataset_names:
        for key, label in (("accuracy", "acc"), ("loss", "loss"), ("kl_to_reference", "KL")):
            if any(key in results[row][s] for row in results):
                columns.append((s, key, f"{s} {label}"))
    lines = ["| model | " + " | ".join(c[2] for c in columns) + " | steps |", "|---" * (len(columns) + 2) + "|"]
    for row, metrics in results.items():
        cells = []
        for s, key, _ in columns:
            value = metrics[s].get(key)
            cells.append("" if value is None else f"{value:.3f}")
        step = steps.get(row, {})
        note = f"{step.get('step')}" + (" (target not reached)" if step.get("stop_reason") == "target not reached" else "")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {note if step else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run(main, globals())
