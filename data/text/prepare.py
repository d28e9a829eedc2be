"""
Your own data -> a dataset for a converted model (convert.py): plain text, or conversations.

    python data/text/prepare.py --source="notes/*.txt" --tokenizer=out/smollm2/tokenizer.json --out_dir=notes
    python data/text/prepare.py --source=chats.jsonl --tokenizer=out/smollm2/tokenizer.json --out_dir=chats

source is a file, a folder (its files, recursively) or a glob. A .jsonl file holds one record per
line: a document under `field` ({"text": "..."}), or a conversation under `messages_field`
({"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}).
Any other file is one plain-text document. Everything must be UTF-8.

What happens, in order: read every document; drop exact duplicates (same text, or same
conversation, up to whitespace); split the documents at random into train and validation (a
document lands on one side only, so validation is text the model never trained on); tokenize with
the model's tokenizer. A text document ends with the model's EOS token; a conversation is rendered
with the model's own chat template (ChatML or Llama 3, tokenizer.py's render_chat) and carries a
loss mask marking the assistant's answers, which finetune.py --answers_only=True trains on alone.
As for all released-model data, every training window starts with the BOS token.

Writes data/<out_dir>/{train,val}.bin (+ {train,val}.mask.bin for conversations) and meta.json;
--out_dir may also be a path.
"""
import glob
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from support import tokenizer as bpe
from support.config import UserError, run
from support.dataset import DATA_DIR
from support.files import check_writable, refuse_inputs

source = ""                              # a file, a folder or a glob (quote it in the shell)
tokenizer = "out/smollm2/tokenizer.json"  # the model's tokenizer (convert.py writes it)
out_dir = ""                             # data/<out_dir>/, or a path
field = "text"                           # .jsonl: the field holding a document's text
messages_field = "messages"              # .jsonl: the field holding a conversation
val_fraction = 0.1                       # of the documents (after de-duplication)
seed = 1337
overwrite = False                        # replace a dataset already at --out_dir
ROLES = ("system", "user", "assistant")


def source_files():
    """The files source names, in a fixed order."""
    if os.path.isdir(source):
        paths = [os.path.join(d, n) for d, _, names in os.walk(source) for n in names]
    else:
        paths = glob.glob(source, recursive=True) if glob.has_magic(source) else [source]
    paths = sorted(p for p in paths if os.path.isfile(p))
    if not paths:
        raise UserError(f"--source={source!r} names no file: pass a file, a folder or a glob")
    return paths


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte {e.start}): convert it first, e.g. "
                        f"iconv -f latin1 -t utf-8") from None


def check_conversation(messages, where):
    """A conversation is a list of {role, content} messages with at least one assistant answer."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: {messages_field!r} must be a non-empty list of {{role, content}} messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: every message needs a role and a text content")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: role {m.get('role')!r} is not one of {', '.join(ROLES)}: rename it")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing to learn from: "
                        "drop it or add the answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_documents(paths):
    """[(where, text or conversation)] of every file: a .jsonl file's records, any other file whole."""
    documents = []
    for path in paths:
        text = read_text(path)
        if not text.strip():
            raise UserError(f"{path} is empty: remove it from --source")
        if not path.endswith(".jsonl"):
            documents.append((path, text))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{where} is not JSON: a .jsonl file holds one JSON object per line") from None
            if isinstance(record, dict) and messages_field in record:
                documents.append((where, check_conversation(record[messages_field], where)))
            elif isinstance(record, dict) and isinstance(record.get(field), str):
                documents.append((where, record[field]))
            else:
                raise UserError(f"{where} has no text field {field!r} (nor a conversation {messages_field!r}): "
                                "pass --field= or --messages_field= with the name your records use")
    kinds = {isinstance(doc, list) for _, doc in documents}
    if len(kinds) > 1:
        raise UserError(f"--source={source!r} mixes conversations and plain texts: prepare them as two datasets")
    return documents


def deduplicate(documents):
    """[(where, document, copies dropped)]: each text (or conversation) once, compared up to
    whitespace, where it first comes; copies dropped counts its later exact duplicates."""
    first, kept = {}, []
    for where, doc in documents:
        text = json.dumps(doc) if isinstance(doc, list) else doc
        key = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if key in first:
            kept[first[key]][2] += 1
        else:
            first[key] = len(kept)
            kept.append([where, doc, 0])
    return kept


def main():
    if not source or not out_dir:
        raise UserError("pass --source=<file, folder or glob> and --out_dir=<dataset name>")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction={val_fraction} must be in (0, 1)")
    encoding, normalize, tok = bpe.model_tokenizer(tokenizer)
    dataset_dir = out_dir if os.path.isabs(out_dir) or out_dir.startswith(".") else os.path.join(DATA_DIR, out_dir)

    # -- read and check everything before anything is written: the output too (never over another
    # dataset unless asked, never over a file it reads, writable)
    paths = source_files()
    if os.path.exists(os.path.join(dataset_dir, "meta.json")) and not overwrite:
        raise UserError(f"{dataset_dir} already holds a dataset: choose another --out_dir, or replace it with "
                        "--overwrite=True")
    outputs = [os.path.join(dataset_dir, f"{name}.bin") for name in ("train", "val", "train.mask", "val.mask")]
    for output in outputs + [os.path.join(dataset_dir, "meta.json")]:
        refuse_inputs(output, paths, "--out_dir")
    check_writable(outputs[0])
    documents = read_documents(paths)
    chat = isinstance(documents[0][1], list)
    if chat:
        try:
            bpe.chat_format(tok.get("chat_template"))
        except ValueError as e:
            raise UserError(f"{tokenizer}: {e}") from None
    kept = deduplicate(documents)
    if len(kept) < 2:
        raise UserError(f"--source={source!r} holds {len(kept)} distinct document: train and validation "
                        "need one each at least")

    # -- split by document: no document on both sides
    order = np.random.default_rng(seed).permutation(len(kept))
    n_val = min(len(kept) - 1, max(1, round(val_fraction * len(kept))))
    splits = {"train": [kept[i] for i in sorted(order[n_val:])], "val": [kept[i] for i in sorted(order[:n_val])]}

    # -- tokenize: a text ends with EOS; a conversation in the chat format, its answers marked
    ids, masks, report = {}, {}, {}
    for split, docs in splits.items():
        ids[split], masks[split] = [], []
        for _, doc, _ in docs:
            if chat:
                doc_ids, doc_mask = bpe.encode_chat(doc, tok, encoding)
            else:
                doc_ids = encoding.encode_ordinary(normalize(doc)) + [tok["eos"]]
                doc_mask = [1] * len(doc_ids)
            ids[split] += doc_ids
            masks[split] += doc_mask
        report[split] = {"documents": len(docs), "tokens": len(ids[split]),
                         "duplicates_dropped": sum(copies for _, _, copies in docs)}
        if chat:
            report[split]["answer_tokens"] = int(sum(masks[split]))
        print(f"  {split}: {len(docs):,} documents ({report[split]['duplicates_dropped']:,} exact duplicates of "
              f"them dropped), {len(ids[split]):,} tokens"
              + (f", {report[split]['answer_tokens']:,} of them in answers" if chat else ""))
    print(f"{len(documents):,} documents read, {len(documents) - len(kept):,} exact duplicates dropped")
    bpe.write_stream_dataset(dataset_dir, ids, encoding, os.path.abspath(tokenizer),
                             {"source": os.path.abspath(source), "language": os.path.basename(dataset_dir),
                              "dataset_token": tok["bos"], "documents": report,
                              "duplicates_dropped": len(documents) - len(kept),
                              "format": "chat" if chat else "text"},
                             masks=masks if chat else None)


if __name__ == "__main__":
    run(main, globals())
