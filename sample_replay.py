"""
Stage 2: sample a self-generated replay corpus from a checkpoint, to disk.

Old training data is often gone, but a language model can regenerate its own: prompt it with the
dataset token that began every training sequence (BOS / dataset id), sample at temperature 1 with
no top-k, for the full block length. Those sequences stand in for the old data in finetune.py.

    python sample_replay.py --init_from=out/pretrain_add/ckpt.pt --prompts=arithmetic/add
    python sample_replay.py --prompts=arithmetic/add:0.5,arithmetic/sort:0.5 --num_samples=8192
    torchrun --standalone --nproc_per_node=2 sample_replay.py ...   # each process samples its share

A prompt is a dataset name (its dataset token is read from the checkpoint's data metadata), `bos`
(a released model's BOS token, from its tokenizer metadata) or a raw token id, optionally followed
by :share. The corpus is one file written atomically:
{"tokens": (N, T) int32 tensor, "meta": {source checkpoint, prompts, temperature, ...}}.
It is sampled in chunks of batch_size sequences from one random stream seeded by --seed; under
torchrun each process samples its share of the chunks and passes over the others' draws, so the
corpus for a seed is the same in one process or several.
"""
import os
import time

import torch

from replay import prompt_column, sample_corpus
from support.checkpoint import load_checkpoint
from support.config import UserError, memory_bytes, pick_device, pick_dtype, run, set_seed
from support.dataset import known_tokenizers
from support.distributed import finish_distributed, rank0_only, setup_distributed
from support.files import Lock, atomic_torch_save, fingerprint, remove_stale_temporaries, same_path
from support.progress import progress_bar

init_from = "out/pretrain_add/ckpt.pt"
out = "out/replay_add.pt"
prompts = "arithmetic/add"       # comma-separated: dataset name, bos or token id, optionally :share
num_samples = 8192
batch_size = 1024
temperature = 1.0                # 1.0 = the model's own distribution (what replay wants)
top_k = 0                        # 0 = no truncation
length = 0                       # tokens per sequence including the prompt; 0 = the model's block_size
device = "auto"
compile = False                  # compile the fixed-shape decode step (a CUDA graph on GPU): for long runs
dtype = "float32"                # "bfloat16" autocasts the matmuls (2x faster where the CPU has native bf16);
                                 # "auto": bf16 only where this machine multiplies in it fast
seed = 1337
chat_prompts = ""                # a file of user messages, one per line: sample the model's answers to them
                                 # in its chat format instead (an evaluation set: KL on the answers' tokens)
answers_per_prompt = 2
resume = False                   # continue from <out>.partial, written after every batch (same settings)
overwrite = False                # replace an existing corpus at --out


def parse_prompts(spec, data_meta, vocab_size, bos=None):
    """'arithmetic/add:0.5,7' -> [(name, token, share)], shares normalised to sum to 1."""
    parsed = []
    for item in [p for p in spec.split(",") if p]:
        name, colon, share_text = item.partition(":")
        try:
            share = float(share_text) if colon else 1.0
        except ValueError:
            share = float("nan")
        if not share > 0 or share == float("inf"):
            raise UserError(f"--prompts item {item!r}: the share after ':' must be a positive number")
        if name.isdigit():
            token = int(name)
        elif name == "bos" and bos is not None:
            token = bos
        elif name in data_meta:
            token = data_meta[name].get("dataset_token")
        else:
            known = ", ".join(sorted(data_meta)) or "none"
            raise UserError(f"prompt {name!r} is neither a token id nor a dataset this checkpoint was "
                            f"trained on (known: {known})")
        if not isinstance(token, int) or not 0 <= token < vocab_size:   # also a damaged checkpoint's record
            raise UserError(f"--prompts: {name}'s token id {token} is outside the model's vocabulary "
                            f"(0..{vocab_size - 1})")
        parsed.append((name, token, share))
    if not parsed:
        raise UserError("--prompts is empty: give at least one dataset name or token id")
    total = sum(s for _, _, s in parsed)
    return [(n, t, s / total) for n, t, s in parsed]


def sample_chat_answers(model, ckpt, prompts_path, length, answers, seed, device):
    """The model's own answers to the user messages of prompts_path (one per line), each rendered in
    its chat format (the chat template convert.py kept in its tokenizer.json) and answered `answers`
    times at temperature 1 with no top-k, up to `length` tokens in all. Returns (tokens (N, length),
    mask (N, length): True on each answer's tokens up to and including its end-of-turn token)."""
    from support import tokenizer as bpe
    path = ckpt.get("tokenizer", {}).get("tokenizer_path")
    try:
        encoding, _, tok = bpe.released_encoding(path)
        bpe.chat_format(tok.get("chat_template"))
    except (TypeError, OSError, ValueError) as e:
        raise UserError(f"--chat_prompts needs a released instruction-tuned model's checkpoint with its "
                        f"tokenizer (convert.py), {init_from} has none usable ({e})") from None
    with open(prompts_path, encoding="utf-8") as f:
        messages = [line.strip() for line in f if line.strip()]
    if not messages:
        raise UserError(f"{prompts_path} holds no prompts: write one user message per line")
    generator = torch.Generator(device=device).manual_seed(seed)
    rows, masks = [], []
    for message in progress_bar(messages, "answering"):
        text = bpe.render_chat([{"role": "user", "content": message}], tok)
        prompt = encoding.encode(text, allowed_special="all")
        if len(prompt) >= length:
            raise UserError(f"{prompts_path}: the prompt {message[:40]!r} takes {len(prompt)} tokens, "
                            f"leaving no room for an answer: raise --length above {len(prompt)}")
        idx = torch.tensor([prompt] * answers, device=device)
        out = model.generate(idx, length - len(prompt), temperature=1.0, generator=generator).cpu()
        answer = torch.zeros_like(out, dtype=torch.bool)
        for row, tokens in zip(answer, out):
            ends = (tokens[len(prompt):] == tok["eos"]).nonzero()
            row[len(prompt):len(prompt) + (ends[0].item() + 1 if len(ends) else length)] = True
        rows.append(out)
        masks.append(answer)
    return torch.cat(rows), torch.cat(masks)


def main():
    rank, world_size, dev = setup_distributed(pick_device(device))
    global dtype   # "auto": bf16 only where this machine multiplies in it fast (an AVX2-only CPU does not)
    dtype = pick_dtype(dtype, dev)
    set_seed(seed)
    if not out or out == "None" or os.path.isdir(out):
        raise UserError(f"--out={out!r} must name the corpus file to write, e.g. --out=out/replay.pt")
    if same_path(out, init_from):
        raise UserError(f"--out={out} is the checkpoint sampled from: choose another file")
    model, ckpt = load_checkpoint(init_from, dev)
    model.eval()
    data_meta = ckpt.get("data", {})
    parsed = None if chat_prompts else parse_prompts(prompts, data_meta, model.config.vocab_size,
                                                      ckpt.get("tokenizer", {}).get("bos"))
    T = length or model.config.block_size
    if T > model.config.block_size or T < 2:
        raise UserError(f"--length={T} must be between 2 and the model's block_size "
                        f"{model.config.block_size}")
    if num_samples <= 0 or batch_size <= 0:
        raise UserError("--num_samples and --batch_size must be positive")
    if temperature <= 0:
        raise UserError("--temperature must be positive for sampling (replay wants 1.0)")
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype={dtype!r} must be float32, bfloat16 or auto")
    if top_k < 0:
        raise UserError(f"--top_k={top_k} must be >= 0 (0 = no truncation, what replay wants)")
    # the corpus and one batch's KV cache and logits must fit in memory: estimated before the work
    c = model.config
    needed = (num_samples * T * 8 * 2                                           # tokens (+ mask), int64
              + 2 * c.depth * min(batch_size, num_samples) * T * c.n_kv_heads * c.head_dim * 4  # KV cache
              + min(batch_size, num_samples) * c.vocab_size * 4 * 4)             # a step's logits and softmax
    if needed > memory_bytes():
        raise UserError(f"--num_samples={num_samples} x --length={T} with --batch_size={batch_size} needs about "
                        f"{needed / 2**30:,.1f} GiB, more than this machine's {memory_bytes() / 2**30:.1f} GiB: "
                        "sample fewer or shorter sequences, or in smaller batches")
    if chat_prompts and world_size > 1:
        raise UserError("--chat_prompts samples a few answers: run it in one process, without torchrun")

    # one sampler per corpus at a time (under torchrun: rank 0 holds the lock and writes), and an
    # existing corpus is replaced only when asked
    def claim_output():
        lock = Lock(out + ".lock", f"--out={out}")
        remove_stale_temporaries(out)
        if os.path.exists(out) and not overwrite:
            lock.release()
            raise UserError(f"{out} already exists: choose another --out, or replace it with --overwrite=True")
        if not resume and os.path.exists(out + ".partial"):
            os.remove(out + ".partial")
    rank0_only(rank, world_size, claim_output)
    if chat_prompts:
        if not os.path.exists(chat_prompts):
            raise UserError(f"--chat_prompts={chat_prompts} not found: give a file of user messages, "
                            "one per line")
        t0 = time.time()
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            tokens, mask = sample_chat_answers(model, ckpt, chat_prompts, T, answers_per_prompt, seed, dev)
        meta = {"source_checkpoint": os.path.abspath(init_from),
                "source_sha256": fingerprint(init_from)["sha256"],
                "chat_prompts": os.path.abspath(chat_prompts), "answers_per_prompt": answers_per_prompt,
                "temperature": 1.0, "top_k": 0, "count": len(tokens), "length": T,
                "vocab_size": model.config.vocab_size, "tokenizer": ckpt["tokenizer"]["tokenizer"],
                "seed": seed,
                "answer_tokens": int(mask.sum()), "seconds": round(time.time() - t0, 2)}
        atomic_torch_save({"tokens": tokens.to(torch.int32), "mask": mask, "meta": meta}, out)
        print(f"wrote {out}: {len(tokens)} answers, {meta['answer_tokens']:,} answer tokens")
        return

    # rows per prompt in proportion to its share; the remainder goes to the first prompt
    counts = [int(share * num_samples) for _, _, share in parsed]
    counts[0] += num_samples - sum(counts)
    prompt_list = [{"name": n, "token": t, "share": s, "count": c} for (n, t, s), c in zip(parsed, counts)]
    prompt_tokens = prompt_column(prompt_list)

    # -- the sampling itself: chunks of batch_size sequences from one random stream (under torchrun
    # each process samples its share and passes over the others' draws)
    t0 = time.time()
    partial_path = out + ".partial"
    tokens = sample_corpus(model, prompt_tokens, T, temperature, top_k, batch_size, seed, dev, partial_path,
                           partial_source=init_from, dtype=dtype, rank=rank, world_size=world_size,
                           compile_step=compile)
    seconds = time.time() - t0
    if rank:
        finish_distributed()   # rank 0 writes the corpus
    print(f"sampled {len(tokens):,} sequences x {T} tokens in {seconds:.1f}s "
          f"({len(tokens) * (T - 1) / seconds:,.0f} new tokens/s)")

    tokenizers = known_tokenizers(ckpt)
    meta = {
        "source_checkpoint": os.path.abspath(init_from),
        "source_sha256": fingerprint(init_from)["sha256"],  # finetune.py tops up only from this same model
        "source_step": ckpt.get("step"),
        "prompts": prompt_list,
        "temperature": temperature,
        "top_k": top_k,
        "count": len(tokens),
        "length": T,
        "vocab_size": model.config.vocab_size,
        "tokenizer": tokenizers.pop() if len(tokenizers) == 1 else None,
        "seed": seed,
        "dtype": dtype,
        "seconds": round(seconds, 2),  # sampling time: part of the cost of self-generated replay
    }
    if any(m.get("kind") == "arithmetic" for m in data_meta.values()):
        # toy tasks can be checked: how many samples are real task strings with right answers?
        from data.arithmetic.prepare import score_rows
        any_meta = next(iter(data_meta.values()))
        well_formed, correct = score_rows(tokens.numpy(), any_meta["digits"], any_meta["modulus"])
        stats = {}
        for name, tok, _ in parsed:
            rows = (tokens[:, 0] == tok).numpy()
            stats[name] = {"well_formed": float(well_formed[rows].mean()),
                           "correct": float(correct[rows].mean())}
            print(f"  {name}: {stats[name]['well_formed']:.1%} well-formed, "
                  f"{stats[name]['correct']:.1%} correct")
        meta["stats"] = stats
    atomic_torch_save({"tokens": tokens.to(torch.int32), "meta": meta}, out)
    os.remove(partial_path)
    print(f"wrote {out}")
    finish_distributed()


if __name__ == "__main__":
    run(main, globals())
