"""
Datasets on disk: data/<name>/{train,val}.bin (token ids, uint16 unless the vocabulary is larger)
+ meta.json, and the replay corpora sample_replay.py writes.

Two layouts, told apart by meta["row_len"]:
- rows (toy tasks): the file is a stack of fixed-length sequences, each starting with its task's
  BOS token; a training sequence is one row.
- stream (text): one long token stream; a training sequence is a window of block_size tokens
  whose first token is overwritten by the dataset id token (paper convention: English 0,
  Spanish 1). The same token is the prompt for self-generated replay.
"""
import json
import os
from itertools import repeat

import numpy as np
import torch

from support.config import UserError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")  # the repo's data/


class Dataset:
    def __init__(self, name):
        # a name is a folder under data/ ("arithmetic/add") or any folder path holding meta.json
        self.name = name
        self.dir = name if os.path.isabs(name) else os.path.join(DATA_DIR, name)
        meta_path = os.path.join(self.dir, "meta.json")
        if not os.path.exists(meta_path):
            raise UserError(f"{meta_path} not found: run the prepare.py script of that dataset first "
                            f"(e.g. python data/arithmetic/prepare.py)")
        redo = f"re-run the prepare.py script of {name}"
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            self.row_len = self.meta.get("row_len")
            self.dataset_token, vocab_size = int(self.meta["dataset_token"]), int(self.meta["vocab_size"])
            dtype = np.dtype(self.meta.get("token_dtype", "uint16"))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            problem = (f"has no {e}" if isinstance(e, KeyError)
                       else f"is not a valid meta.json ({type(e).__name__})")
            raise UserError(f"{meta_path} {problem}: {redo}") from None
        if not 0 <= self.dataset_token < vocab_size:
            raise UserError(f"{meta_path}: dataset_token {self.dataset_token} is outside the vocabulary "
                            f"0..{vocab_size - 1}: {redo}")
        self.splits = {}
        for split in ("train", "val"):
            path = os.path.join(self.dir, f"{split}.bin")
            if not os.path.exists(path) or os.path.getsize(path) == 0:
                raise UserError(f"{path} is missing or empty: {redo}")
            if os.path.getsize(path) % dtype.itemsize:
                raise UserError(f"{path} is truncated (not a whole number of {dtype} token ids): {redo}")
            # uint16 ids unless the vocabulary is larger (a released model's, e.g. Llama 3's 128k)
            tokens = np.fromfile(path, dtype=dtype)
            if tokens.min() < 0 or tokens.max() >= vocab_size:
                raise UserError(f"{path} holds token ids outside 0..{vocab_size - 1} (its meta.json's "
                                f"vocab_size): {redo}")
            if self.row_len:
                if len(tokens) % self.row_len:
                    raise UserError(f"{path} is truncated (not a whole number of {self.row_len}-token rows): "
                                    f"re-run the prepare.py script of {name}")
                tokens = tokens.reshape(-1, self.row_len)
            self.splits[split] = tokens
        # a chat dataset (data/text/prepare.py) marks the tokens of its answers: {split}.mask.bin
        self.masks = {}
        if self.meta.get("loss_mask") and not self.row_len:
            for split, tokens in self.splits.items():
                path = os.path.join(self.dir, f"{split}.mask.bin")
                if not os.path.exists(path) or os.path.getsize(path) != len(tokens):
                    raise UserError(f"{path} is missing or does not match {split}.bin: {redo}")
                self.masks[split] = np.fromfile(path, dtype=np.uint8)

    @property
    def short_name(self):
        return self.name.rstrip("/").split("/")[-1]

    def check_length(self, block_size):
        """A text dataset must hold at least one window of block_size tokens in each split."""
        for split, tokens in self.splits.items():
            if not self.row_len and len(tokens) < block_size:
                raise UserError(f"{self.dir}/{split}.bin holds {len(tokens)} tokens, fewer than one window "
                                f"of {block_size}: use a smaller --block_size or more data")

    def seq_len(self, block_size):
        return self.row_len or block_size

    def sample(self, split, batch_size, block_size, rng, with_mask=False):
        """A random batch of training sequences, (batch_size, T) int64; with_mask, also the (B, T)
        mask of the tokens that count (a chat's answers), or None where the dataset has none."""
        data = self.splits[split]
        if self.row_len:
            x = torch.from_numpy(data[rng.integers(0, len(data), batch_size)].astype(np.int64))
            return (x, None) if with_mask else x
        starts = rng.integers(0, len(data) - block_size + 1, batch_size)
        x = np.stack([data[s:s + block_size] for s in starts]).astype(np.int64)
        x[:, 0] = self.dataset_token
        if not with_mask:
            return torch.from_numpy(x)
        mask = np.stack([self.masks[split][s:s + block_size] for s in starts]) if self.masks else None
        return torch.from_numpy(x), None if mask is None else torch.from_numpy(mask)

    def eval_batches(self, split, batch_size, block_size, max_sequences):
        """The same fixed sequences every call (the first max_sequences rows / windows), so
        validation numbers are comparable across steps and runs."""
        data = self.splits[split]
        if self.row_len:
            rows = data[:max_sequences].astype(np.int64)
        else:
            n = min(max_sequences, len(data) // block_size)
            rows = data[:n * block_size].astype(np.int64).reshape(n, block_size)
            rows[:, 0] = self.dataset_token
        for i in range(0, len(rows), batch_size):
            yield torch.from_numpy(rows[i:i + batch_size])

    def eval_masks(self, batch_size, block_size, max_sequences):
        """The tokens that count in each batch of eval_batches("val", ...): a chat dataset's answers;
        None (all) for any other."""
        mask = self.masks.get("val")
        if mask is None:
            yield from repeat(None)
            return
        n = min(max_sequences, len(mask) // block_size)
        rows = mask[:n * block_size].reshape(n, block_size)
        for i in range(0, n, batch_size):
            yield torch.from_numpy(rows[i:i + batch_size])


class CorpusSet:
    """A replay corpus (sample_replay.py) used as an evaluation set, e.g. held-out self-generated
    sequences: named corpus:<path>, it offers what evaluation needs of a Dataset."""

    def __init__(self, name):
        self.name, path = name, name[len("corpus:"):]
        from replay import load_corpus   # (replay.py reads datasets through this module)
        self.tokens, self.meta, self.mask = load_corpus(path, with_mask=True)
        self.meta = {**self.meta, "row_len": self.tokens.size(1), "path": path}
        self.dir = path
        self.short_name = os.path.basename(path).removesuffix(".pt")

    def check_length(self, block_size):
        pass  # a corpus' rows have a fixed length, checked against the model by check_compatible

    def eval_batches(self, split, batch_size, block_size, max_sequences):
        rows = self.tokens[:max_sequences]
        for i in range(0, len(rows), batch_size):
            yield rows[i:i + batch_size]

    def eval_masks(self, batch_size, block_size, max_sequences):
        """The tokens that count in each batch of eval_batches (a chat's answer), or None: all."""
        for i in range(0, min(max_sequences, len(self.tokens)), batch_size):
            yield None if self.mask is None else self.mask[i:i + min(batch_size, max_sequences - i)]


class Benchmark:
    """Multiple-choice questions prepared for one tokenizer (data/mmlu/prepare.py): data/<name>/
    meta.json and <split>.jsonl, one item per line: {"context": token ids, "choices": [token ids,
    ...], "gold": index of the right choice, "choice_chars": [length of each choice], ...}. Named
    bench:<name> where datasets are listed."""

    def __init__(self, name, split="test"):
        self.name = name[len("bench:"):] if name.startswith("bench:") else name
        self.dir = self.name if os.path.isabs(self.name) else os.path.join(DATA_DIR, self.name)
        self.path = os.path.join(self.dir, f"{split}.jsonl")
        self.short_name = self.name.rstrip("/").split("/")[-1]
        redo = f"prepare it again (data/{self.short_name}/prepare.py)"
        try:
            with open(os.path.join(self.dir, "meta.json")) as f:
                self.meta = json.load(f)
            with open(self.path) as f:
                self.items = [json.loads(line) for line in f]
            for item in self.items:
                if not (item["context"] and item["choices"] and all(item["choices"])
                        and 0 <= item["gold"] < len(item["choices"]) == len(item["choice_chars"])):
                    raise ValueError("an item without context, choices or a right answer")
        except FileNotFoundError as e:
            raise UserError(f"{e.filename} not found: {redo}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path} is not a prepared benchmark ({type(e).__name__}: {e}): "
                            f"{redo}") from None
        if not self.items:
            raise UserError(f"{self.path} holds no items: {redo}")
        self.meta["longest_item"] = max(len(i["context"]) + max(map(len, i["choices"])) for i in self.items)
        vocab_size = self.meta.get("vocab_size", 0)
        ids = [t for item in self.items for seq in [item["context"], *item["choices"]] for t in seq]
        if max(ids) >= vocab_size or min(ids) < 0:
            raise UserError(f"{self.path} holds token ids outside its meta.json's vocab_size {vocab_size}: "
                            f"{redo}")

    def check_length(self, block_size):
        pass  # items are not windows: their length is checked against the model by check_compatible


def open_eval_set(name):
    """A dataset under data/, or corpus:<path> for a sampled corpus."""
    if name.startswith("bench:"):
        return Benchmark(name)
    return CorpusSet(name) if name.startswith("corpus:") else Dataset(name)


def check_short_names(sets):
    """Results and log keys name a dataset by its last part (val_loss/en): two datasets with one
    short name would overwrite each other, so refuse them."""
    seen = {}
    for d in sets:
        if seen.get(d.short_name, d.name) != d.name:
            raise UserError(f"{seen[d.short_name]} and {d.name} share the short name "
                            f"{d.short_name!r}, under which "
                            f"results are reported: evaluate them in separate runs, or rename one folder")
        seen[d.short_name] = d.name


def sample_mixture(datasets, fractions, batch_size, block_size, rng, split="train"):
    """One batch drawn from several datasets at fixed fractions (rows per dataset are rounded,
    the remainder goes to the first dataset so the batch size is exact)."""
    counts = [int(round(f * batch_size)) for f in fractions]
    counts[0] += batch_size - sum(counts)
    parts = [d.sample(split, n, block_size, rng) for d, n in zip(datasets, counts) if n > 0]
    return torch.cat(parts)[torch.from_numpy(rng.permutation(batch_size))]


def known_tokenizers(ckpt):
    """The tokenizers a checkpoint's model reads: those of the data it was trained on, and a
    released model's own (convert.py stores it as ckpt["tokenizer"])."""
    known = {m.get("tokenizer") for m in (ckpt or {}).get("data", {}).values()}
    known.add((ckpt or {}).get("tokenizer", {}).get("tokenizer"))
    return known - {None}


def check_compatible(dataset_meta, model_config, where, ckpt=None, fix=None):
    """Refuse to train or evaluate a model on data from another tokenizer or with longer rows.
    ckpt: the model's checkpoint, which names its tokenizer(s); fix: what to do about a mismatch,
    where it is not the usual (a replay corpus: re-sample it from the checkpoint)."""
    if dataset_meta["vocab_size"] > model_config["vocab_size"]:
        raise UserError(f"{where}: vocab_size {dataset_meta['vocab_size']} of the data exceeds the "
                        f"model's {model_config['vocab_size']}: "
                        f"{fix or 'use a checkpoint trained with this tokenizer'}")
    known = known_tokenizers(ckpt)
    if known and dataset_meta.get("tokenizer") not in known:
        fix = fix or "use data prepared with the checkpoint's tokenizer"
        raise UserError(f"{where}: tokenized by {dataset_meta.get('tokenizer')!r} but the checkpoint reads "
                        f"tokenizer {' or '.join(sorted(map(str, known)))}: {fix}")
    longest = dataset_meta.get("longest_item")  # a benchmark's
    if longest and longest > model_config["block_size"]:
        raise UserError(f"{where}: an item of {longest} tokens exceeds the model's block_size "
                        f"{model_config['block_size']}: "
                        f"{fix or 'prepare it for a model with a longer context'}")
    row_len = dataset_meta.get("row_len")
    if row_len and row_len > model_config["block_size"]:
        raise UserError(f"{where}: rows of {row_len} tokens exceed the model's block_size "
                        f"{model_config['block_size']}: "
                        f"{fix or f'pretrain with --block_size={row_len} or more'}")


def dataset_files(name):
    """The files a dataset (or corpus:<path>) is read from."""
    if name.startswith("corpus:"):
        return [name[len("corpus:"):]]
    if name.startswith("bench:"):
        folder = os.path.join(DATA_DIR, name[len("bench:"):])
        return [os.path.join(folder, f) for f in ("meta.json", "test.jsonl")]
    folder = name if os.path.isabs(name) else os.path.join(DATA_DIR, name)
    masks = [os.path.join(folder, f"{s}.mask.bin") for s in ("train", "val")]  # a chat dataset's answers
    return [os.path.join(folder, f) for f in ("meta.json", "train.bin", "val.bin")] + [
        m for m in masks if os.path.exists(m)]
