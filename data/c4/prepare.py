"""
Optional, needs internet: C4 English and Spanish (the paper's real-text data), in the same
format as data/bible: data/c4/tokenizer.json and data/c4/{en,es}/{train,val}.bin + meta.json.

    python data/c4/prepare.py [--shards=1] [--max_mb=8] [--vocab_size=4096]

Downloads the first `shards` json.gz shards of each language (C4 `en` and the multilingual C4
`es`), keeps documents until max_mb megabytes of text per language, puts every 50th document in
val, and trains one BPE on both. Offline it stops with one line saying so; the offline
English/Spanish pair is data/bible/prepare.py.
"""
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from support import files
from support import tokenizer as bpe
from support.config import fail

BASE_URL = "https://huggingface.co/datasets/allenai/c4/resolve/main/"
SHARDS = {  # language -> shard file name pattern under BASE_URL
    "en": "en/c4-train.{i:05d}-of-01024.json.gz",
    "es": "multilingual/c4-es.tfrecord-{i:05d}-of-02048.json.gz",
}


def download(url, path):
    return files.download(url, path, "C4 needs internet; offline, use data/bible/prepare.py")


def read_documents(paths, max_bytes):
    """The "text" field of every JSON line of the json.gz files, until max_bytes of text."""
    docs, total = [], 0
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                text = json.loads(line).get("text", "").strip()
                if text:
                    docs.append(text)
                    total += len(text.encode("utf-8"))
                if total >= max_bytes:
                    return docs
    return docs


def split_documents(docs, every=50):
    """Every `every`-th document to val, the rest to train; documents separated by blank lines."""
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    val = [d for i, d in enumerate(docs) if i % every == every - 1]
    return {"train": "\n\n".join(train) + "\n", "val": "\n\n".join(val) + "\n"}


def prepare(out_root, shards=1, max_mb=8.0, vocab_size=4096):
    raw_dir = os.path.join(out_root, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    splits = {}
    for lang, pattern in SHARDS.items():
        names = [pattern.format(i=i) for i in range(shards)]
        paths = [download(BASE_URL + name, os.path.join(raw_dir, os.path.basename(name))) for name in names]
        docs = read_documents(paths, max_mb * 1e6)
        splits[lang] = split_documents(docs)
        print(f"{lang}: {len(docs):,} documents, {len(splits[lang]['train']) / 1e6:.2f} MB train")
    bpe.build_text_datasets(out_root, splits, vocab_size, source="c4")


def main(argv):
    settings = {"shards": 1, "max_mb": 8.0, "vocab_size": 4096}
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in settings:
            fail(f"unknown option {arg!r}: use --shards=N --max_mb=MB --vocab_size=N")
        try:
            settings[key] = type(settings[key])(value)
        except ValueError:
            fail(f"--{key}={value!r} must be a number")
    try:
        prepare(os.path.dirname(os.path.abspath(__file__)), **settings)
    except ConnectionError as e:
        fail(f"{e}")


if __name__ == "__main__":
    main(sys.argv[1:])
