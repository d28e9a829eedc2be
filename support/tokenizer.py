"""
A byte-level BPE tokenizer trained on our own data and served by tiktoken.

Training is ours (tiktoken only encodes): text is split into chunks by a GPT-2-style pattern,
identical chunks are counted once, and the most frequent adjacent pair of tokens is merged
repeatedly. Pair counts are updated incrementally, only for the chunks that contain the merged
pair, and the best pair comes from a heap, so a few megabytes train in about a minute.

Ids: the first N_RESERVED ids are special tokens that never come out of encoding text. Ids 0 and
1 are the dataset tokens (English 0, Spanish 1, as in the paper): the first token of every
training window and the prompt for self-generated replay. Then the 256 single bytes, then merges
in the order they were learned (a merge's id is its BPE rank).

    tok = train_bpe(text, vocab_size=4096); save(tok, "tokenizer.json")
    enc = load("tokenizer.json")           # a tiktoken.Encoding
    ids = enc.encode_ordinary("Hola")      # reserved ids can never appear here

Released models bring their own byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen). Its tokens
and merges come from a GGUF file or a Hugging Face tokenizer.json (convert.py reads both);
`released_tokenizer` turns them into the same kind of file, which `load` serves through tiktoken.
tiktoken merges the adjacent pair whose merged token has the lowest id, so this is exact when the
ids of merged tokens follow the order of the merges (checked on conversion). A conversation is
rendered in the model's own chat format (`render_chat`, `encode_chat`: ChatML or Llama 3's), and
export.py writes the tokenizer back out as a Hugging Face tokenizer.json or GGUF metadata, its merge
list recovered from the token ids (`bpe_merges`).
"""
import base64
import hashlib
import heapq
import json
import os
import re
import time
import unicodedata
from collections import Counter

import numpy as np
import tiktoken

from support.files import atomic_path, atomic_write_text

# tiktoken's pattern (Rust regex, Unicode classes) and the nearest Python `re` equivalent used
# when counting chunks for training; the two agree on ordinary letters, digits and punctuation.
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PY_PATTERN = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = {"<|english|>": 0, "<|spanish|>": 1, "<|reserved2|>": 2, "<|reserved3|>": 3}
DATASET_TOKENS = {"en": 0, "es": 1}  # the paper's dataset ids
N_RESERVED = len(SPECIAL_TOKENS)


MAX_CHUNK = 256


def train_bpe(text, vocab_size, progress=None):
    """Learn vocab_size - N_RESERVED - 256 merges; returns a list of merged byte strings in order."""
    n_merges = vocab_size - N_RESERVED - 256
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {N_RESERVED + 256}")
    # a chunk longer than MAX_CHUNK characters (no word is: a run without spaces, minified code) is cut
    # into pieces, so that no input makes training time grow with the square of one run's length
    chunk_counts = Counter(c[i:i + MAX_CHUNK] for c in PY_PATTERN.findall(text) for i in range(0, len(c), MAX_CHUNK))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]   # token sequences (ints)
    freqs = list(chunk_counts.values())
    vocab = [bytes([b]) for b in range(256)]                           # token -> bytes (local ids)

    pair_counts = Counter()
    pair_words = {}
    for w, (tokens, f) in enumerate(zip(words, freqs)):
        for pair in zip(tokens, tokens[1:]):
            pair_counts[pair] += f
            pair_words.setdefault(pair, set()).add(w)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg <= 0:
            continue  # a stale heap entry: the count changed since it was pushed
        new_id = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        merges.append(vocab[new_id])
        changed = Counter()
        for w in pair_words.pop(pair):
            tokens, f = words[w], freqs[w]
            for p in zip(tokens, tokens[1:]):
                changed[p] -= f
            merged, i = [], 0
            while i < len(tokens):
                if i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == pair:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(tokens[i])
                    i += 1
            words[w] = merged
            for p in zip(merged, merged[1:]):
                changed[p] += f
                pair_words.setdefault(p, set()).add(w)
        for p, delta in changed.items():
            if delta:
                pair_counts[p] += delta
                heapq.heappush(heap, (-pair_counts[p], p))
        del pair_counts[pair]
        if progress:
            progress(len(merges), n_merges)
    return merges


def save(merges, path):
    """The tokenizer as JSON: the pattern, the special tokens and the merges (base64 bytes)."""
    data = {"pattern": PATTERN, "special_tokens": SPECIAL_TOKENS,
            "merges": [base64.b64encode(m).decode("ascii") for m in merges]}
    atomic_write_text(path, json.dumps(data))


def load(path):
    """A tiktoken.Encoding for a tokenizer saved by save() or released_tokenizer()."""
    with open(path) as f:
        data = json.load(f)
    if "tokens" in data:  # a released model's: every token's bytes, in id order
        ranks = {base64.b64decode(t): i for i, t in enumerate(data["tokens"]) if t is not None}
        return tiktoken.Encoding(name=data["name"], pat_str=data["pattern"], mergeable_ranks=ranks,
                                 special_tokens=data["special_tokens"])
    ranks = {bytes([b]): N_RESERVED + b for b in range(256)}
    for i, m in enumerate(data["merges"]):
        ranks[base64.b64decode(m)] = N_RESERVED + 256 + i
    return tiktoken.Encoding(name=f"nanoreplay-bpe-{len(ranks) + N_RESERVED}", pat_str=data["pattern"],
                             mergeable_ranks=ranks, special_tokens=data["special_tokens"])


def normalizer(path):
    """The text normalisation a tokenizer expects before encoding (Qwen's: NFC), as a function."""
    with open(path) as f:
        form = json.load(f).get("normalize")
    return (lambda text: unicodedata.normalize(form, text)) if form else (lambda text: text)


# ----------------------------------------------------------------------------------------------
# released models' tokenizers

def byte_alphabet():
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it in vocab
    files. Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...)
    are mapped to the characters from U+0100 on, in byte order (so a space is written 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet


# Pre-tokenizer patterns of the released tokenizers we know, by llama.cpp's name for them
# (tokenizer.ggml.pre). GPT-2's pattern; SmolLM2 first splits every digit apart, then applies
# GPT-2's pattern to each piece: written as one pattern, a digit is a chunk of its own and a
# whitespace run just before a digit ends there, as at the end of a piece.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS_THEN_GPT2 = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?:(?=\p{N})|(?!\S))|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE_PATTERNS = {"default": GPT2_PATTERN, "gpt2": GPT2_PATTERN, "smollm": DIGITS_THEN_GPT2,
                     "llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def released_tokenizer(path, name, tokens, special_ids, merges, pattern, bos, eos, normalize=None,
                       chat_template=None):
    """Write a released model's byte-level BPE as our tokenizer file. tokens: every token's text in
    id order (GPT-2 byte alphabet); special_ids: ids of control tokens (<|im_start|>, ...), kept
    as special tokens; merges: "left right" strings in priority order. Raises ValueError for a
    vocabulary that tiktoken cannot serve exactly."""
    to_byte = {c: b for b, c in byte_alphabet().items()}
    encoded, special = [], {}
    for i, text in enumerate(tokens):
        if i in special_ids:
            special[text] = i
            encoded.append(None)
            continue
        try:
            encoded.append(base64.b64encode(bytes(to_byte[c] for c in text)).decode("ascii"))
        except KeyError:
            raise ValueError(f"token {i} ({text!r}) is not in the byte-level alphabet: "
                             "not a GPT-2-style BPE") from None
    ids = {t: i for i, t in enumerate(tokens)}
    merged_ids = [ids.get(left + right) for left, right in (m.split(" ", 1) for m in merges)]
    if None in merged_ids or any(a >= b for a, b in zip(merged_ids, merged_ids[1:])):
        raise ValueError("the ids of merged tokens do not follow the merge order: tiktoken "
                         "cannot serve it exactly")
    if len({base64.b64decode(t) for t in encoded if t is not None}) != sum(t is not None for t in encoded):
        raise ValueError("two tokens have the same bytes")
    data = {"name": name, "pattern": pattern, "special_tokens": special, "tokens": encoded,
            "bos": bos, "eos": eos, "normalize": normalize}
    if chat_template:  # the model's own chat format (a Jinja template), as its source stores it
        data["chat_template"] = chat_template
    atomic_write_text(path, json.dumps(data))


def fingerprint(path):
    """A short id of a tokenizer file: data from different tokenizers must never be mixed."""
    with open(path, "rb") as f:
        return "bpe-" + hashlib.sha256(f.read()).hexdigest()[:12]


def build_text_datasets(out_root, splits, vocab_size, source, tokenizer_path=""):
    """Train one BPE on every language's train text (or use a released model's tokenizer, at
    tokenizer_path), then write each language as a dataset in the stream layout:
    out_root/<lang>/{train,val}.bin + meta.json (and out_root/tokenizer.json when trained here).
    splits: {lang: {"train": text, "val": text}} with lang in DATASET_TOKENS."""
    os.makedirs(out_root, exist_ok=True)
    t0 = time.time()
    if tokenizer_path:
        # a released model reads its own tokenizer, and its replay prompt is its BOS token: that
        # token starts every window of both languages
        tok_path = os.path.abspath(tokenizer_path)
        encoding, normalize = load(tok_path), normalizer(tok_path)
        dataset_tokens = {lang: json.load(open(tok_path))["bos"] for lang in splits}
    else:
        merges = train_bpe("".join(s["train"] for s in splits.values()), vocab_size)
        tok_path = os.path.join(out_root, "tokenizer.json")
        save(merges, tok_path)
        encoding, normalize, dataset_tokens = load(tok_path), (lambda text: text), DATASET_TOKENS
        print(f"trained BPE with {len(merges)} merges (vocab {encoding.n_vocab}) in {time.time() - t0:.0f}s")
    for lang, texts in splits.items():
        ids = {split: encoding.encode_ordinary(normalize(text)) for split, text in texts.items()}
        write_stream_dataset(os.path.join(out_root, lang), ids, encoding, tok_path,
                             {"source": source, "language": lang, "dataset_token": dataset_tokens[lang]})
    return encoding


def write_stream_dataset(out_dir, ids, encoding, tok_path, fields, masks=None):
    """One dataset in the stream layout: out_dir/{split}.bin (token ids) + meta.json.
    ids: {split: [token id, ...]}; fields: source, language, dataset_token and anything else to record;
    masks, optional: {split: [0 or 1 per token]}, the tokens that count (a chat's answers), written
    as out_dir/{split}.mask.bin."""
    n_vocab = encoding.max_token_value + 1
    token_dtype = "uint16" if n_vocab <= 1 << 16 else "uint32"
    os.makedirs(out_dir, exist_ok=True)
    meta = {"kind": "text", "source": fields["source"], "language": fields["language"],
            "tokenizer": fingerprint(tok_path), "tokenizer_path": tok_path, "vocab_size": n_vocab,
            "dataset_token": fields["dataset_token"], "row_len": None, "token_dtype": token_dtype,
            "loss_mask": masks is not None, **fields}
    for split, split_ids in ids.items():
        with atomic_path(os.path.join(out_dir, f"{split}.bin")) as tmp:
            np.array(split_ids, dtype=token_dtype).tofile(tmp)
        if masks is not None:
            with atomic_path(os.path.join(out_dir, f"{split}.mask.bin")) as tmp:
                np.array(masks[split], dtype=np.uint8).tofile(tmp)
        meta[f"n_{split}_tokens"] = len(split_ids)
    atomic_write_text(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=2))
    print(f"{os.path.basename(out_dir)}: {meta['n_train_tokens']:,} train tokens, "
          f"{meta['n_val_tokens']:,} val tokens")
    return meta


def model_tokenizer(path):
    """released_encoding of a prepare script's --tokenizer, where a missing or unusable file is
    bad input (one line, exit 2) rather than an error of the program."""
    from support.config import UserError
    if not os.path.exists(path):
        raise UserError(f"--tokenizer={path} not found: run convert.py first")
    try:
        return released_encoding(path)
    except ValueError as e:
        raise UserError(f"{e}: pass --tokenizer=<convert.py's out_dir>/tokenizer.json") from None


def released_encoding(tokenizer_path):
    """(tiktoken.Encoding, normalize, tokenizer file data) of a released model's tokenizer.json."""
    try:
        with open(tokenizer_path) as f:
            data = json.load(f)
    except ValueError:
        raise ValueError(f"{tokenizer_path} is not JSON (damaged?): run convert.py again") from None
    if not isinstance(data, dict) or "tokens" not in data or not {"bos", "eos", "pattern"} <= set(data):
        raise ValueError(f"{tokenizer_path} is not a released model's tokenizer with its bos, eos and pattern "
                         "(convert.py writes those)")
    return load(tokenizer_path), normalizer(tokenizer_path), data


# ----------------------------------------------------------------------------------------------
# chat format: how an instruction-tuned model reads a conversation

CHATML_DEFAULT_SYSTEM = re.compile(r"'<\|im_start\|>system\n(.*?)<\|im_end\|>\n'", re.S)


def chat_format(template):
    """Which of the two chat formats read here a model's chat template (a Jinja template, as
    convert.py copied it from the model) writes: "chatml" (SmolLM2, Qwen) or "llama3" (Llama 3's
    header format). Raises ValueError for any other."""
    if template and "<|im_start|>" in template:
        return "chatml"
    # Llama 3.1 and later add a system header with a knowledge cutoff and today's date: not read here
    if template and "<|start_header_id|>" in template and "Cutting Knowledge Date" not in template:
        return "llama3"
    raise ValueError("the model's chat template is not one of the two formats read here (ChatML as in "
                     "SmolLM2 and Qwen, Llama 3's header format)")


def special_names(tok):
    """{id: text} of a tokenizer file's special tokens."""
    return {i: text for text, i in tok["special_tokens"].items()}


def chat_pieces(messages, tok, add_generation_prompt=True):
    """A conversation [{"role", "content"}, ...] as the text the model was tuned on, in pieces
    [(text, is_answer)]: is_answer marks an assistant's reply and the token that ends it, the part
    instruction tuning learns. tok: the tokenizer file's data (its chat_template, special tokens
    and BOS id).
    ChatML: every message is <|im_start|>role\ncontent<|im_end|>\n, after the template's default
    system message when the conversation brings none. Llama 3: BOS, then every message is
    <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, its content stripped of
    surrounding whitespace. The generation prompt opens the assistant's turn."""
    template = tok.get("chat_template")
    pieces = []
    if chat_format(template) == "chatml":
        default = CHATML_DEFAULT_SYSTEM.search(template)
        if default and messages and messages[0]["role"] != "system":
            pieces.append((f"<|im_start|>system\n{default.group(1)}<|im_end|>\n", False))
        for m in messages:
            pieces += [(f"<|im_start|>{m['role']}\n", False),
                       (f"{m['content']}<|im_end|>", m["role"] == "assistant"), ("\n", False)]
        opening = "<|im_start|>assistant\n"
    else:
        bos = special_names(tok).get(tok.get("bos"), "")
        for i, m in enumerate(messages):
            pieces += [(f"{bos if i == 0 else ''}<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False),
                       (f"{m['content'].strip()}<|eot_id|>", m["role"] == "assistant")]
        opening = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return pieces + ([(opening, False)] if add_generation_prompt else [])


def render_chat(messages, tok, add_generation_prompt=True):
    """The conversation's text (chat_pieces, joined). Encode it with encoding.encode(text,
    allowed_special="all")."""
    return "".join(text for text, _ in chat_pieces(messages, tok, add_generation_prompt))


def encode_chat(messages, tok, encoding, normalize=lambda text: text):
    """(token ids, mask) of a whole conversation: the ids of its rendered text, tokenized whole (as
    transformers does), and 1 for every token holding a byte of an answer, else 0."""
    pieces = [(normalize(text), answer) for text, answer in chat_pieces(messages, tok, False)]
    ids = encoding.encode("".join(text for text, _ in pieces), allowed_special="all")
    in_answer = np.concatenate([np.full(len(text.encode()), answer) for text, answer in pieces])
    ends = np.cumsum([len(encoding.decode_single_token_bytes(i)) for i in ids])
    starts = np.concatenate([[0], ends[:-1]])
    return ids, [int(in_answer[a:b].any()) for a, b in zip(starts, ends)]


# ----------------------------------------------------------------------------------------------
# back out (export.py): the tokenizer in Hugging Face's and llama.cpp's formats

def bpe_merges(tok):
    """The merge list of a released byte-level BPE, recovered from its tokens: a token's id is its
    rank (as tiktoken serves it), and each multi-byte token is the merge of the two parts that BPE,
    limited to the tokens ranked before it, cuts it into. Raises ValueError for a token that is no
    such merge."""
    ranks = {base64.b64decode(t): i for i, t in enumerate(tok["tokens"]) if t is not None}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) > 2:
            raise ValueError(f"token {rank} is not the merge of two earlier tokens")
        if len(parts) == 2:
            merges.append(parts)
    to_text = byte_alphabet()
    return ["".join(to_text[b] for b in left) + " " + "".join(to_text[b] for b in right) for left, right in merges]


def byte_level_tokens(tok):
    """Every token's text in id order: a special token's own text, any other's bytes in GPT-2's
    byte alphabet (what tokenizer.json and GGUF files store)."""
    to_text, names = byte_alphabet(), special_names(tok)
    return [names[i] if t is None else "".join(to_text[b] for b in base64.b64decode(t))
            for i, t in enumerate(tok["tokens"])]


def hf_tokenizer_json(tok):
    """A Hugging Face tokenizer.json serving the same ids as ours: byte-level BPE, our pre-tokenizer
    pattern as one Split regex, special tokens as added tokens. ignore_merges: a chunk that is a
    token whole is that token, as tiktoken does. No post-processor: BOS is not added on its own."""
    tokens, names = byte_level_tokens(tok), special_names(tok)
    added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, text in sorted(names.items())]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"} if tok.get("normalize") == "NFC" else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok["pattern"]}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True, "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": bpe_merges(tok)}}


def gguf_vocabulary(tok):
    """(tokens, token types, merges) as a GGUF stores them: type 3 (control) for special tokens,
    1 (normal) for the others."""
    names = special_names(tok)
    return byte_level_tokens(tok), [3 if i in names else 1 for i in range(len(tok["tokens"]))], bpe_merges(tok)


def gguf_pre_name(pattern):
    """The tokenizer.ggml.pre name llama.cpp knows our pre-tokenizer pattern by."""
    for name in ("smollm", "llama-bpe", "qwen2", "gpt2"):
        if GGUF_PRE_PATTERNS[name] == pattern:
            return name
    raise ValueError("the tokenizer's pre-tokenizer has no GGUF name (llama.cpp knows "
                     f"{', '.join(GGUF_PRE_PATTERNS)})")
