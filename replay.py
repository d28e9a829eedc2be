"""
Replay: sequences of the old distribution, and the study's protocol for using them.

A replay corpus is a file of sequences the model sampled itself before finetuning: prompted with the
dataset token that began every training sequence (BOS), temperature 1, no top-k, full length
(sample_replay.py writes one with sample_corpus; load_corpus reads it). finetune.py takes them one
batch at a time from a ReplayStream, which never hands out the same sequence twice: when the corpus
runs out, it samples more from the frozen reference, the model the corpus came from. Real replay
(real old data) comes through the same stream, as windows of a dataset's training split.

    {"tokens": (N, T) int32, "meta": {source checkpoint and its sha256, prompts, temperature, ...}}
"""
import os
import time

import torch
import torch.distributed as dist

from model import skip_draws
from support.checkpoint import restore_rng, rng_state
from support.config import UserError
from support.dataset import Dataset, check_compatible
from support.distributed import from_rank0, rank0_only
from support.files import atomic_torch_save, fingerprint
from support.progress import progress_bar


def load_corpus(path, with_mask=False):
    """Read a replay corpus written by sample_replay.py: (N, T) int64 tokens and its metadata (and,
    with_mask, its (N, T) mask of the tokens that count, or None: chat answers carry one)."""
    if not os.path.exists(path):
        raise UserError(f"replay corpus {path} not found: run sample_replay.py --out={path} first")
    try:
        corpus = torch.load(path, map_location="cpu", weights_only=True)
        tokens, meta = corpus["tokens"], corpus["meta"]
    except Exception:
        raise UserError(f"{path} is not a replay corpus written by sample_replay.py: re-sample it") from None
    if tokens.ndim != 2 or len(tokens) == 0:
        raise UserError(f"replay corpus {path} holds no sequences: re-sample it")
    if tokens.size(1) < 2:
        raise UserError(f"replay corpus {path} holds sequences of {tokens.size(1)} token: training needs at "
                        "least 2 (a prompt and a next token); re-sample it with --length=2 or more")
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise UserError(f"replay corpus {path} has no metadata with its vocab_size: re-sample it")
    vocab_size = meta["vocab_size"]
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise UserError(f"replay corpus {path} holds token ids outside 0..{vocab_size - 1}: re-sample it")
    if with_mask:
        mask = corpus.get("mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != tokens.shape):
            raise UserError(f"{path}: its mask does not match its tokens: re-sample it")
        return tokens.long(), meta, mask
    return tokens.long(), meta


def prompt_column(prompts):
    """The first token of every sequence to sample, from a corpus' prompt list [{"token", "count"}, ...]
    (ReplayStream rebuilds it from a corpus' metadata to sample more of the same)."""
    return torch.cat([torch.full((p["count"],), p["token"], dtype=torch.long) for p in prompts])


def sample_corpus(model, prompt_tokens, length, temperature, top_k, batch_size, seed, device,
                  partial_path=None, progress=True, partial_source=None, dtype="float32", rank=0, world_size=1,
                  compile_step=False):
    """prompt_tokens: (N,) first token of every sequence -> (N, length) samples, deterministic for a
    seed, in chunks of batch_size rows from one random stream. Under torchrun every process samples
    every world_size-th chunk, passing over the other chunks' draws (model.skip_draws), so the
    corpus is the same in one process or several, and every process gets every chunk sampled (rank
    0 also those of a continued partial file, so it returns the whole corpus). With partial_path,
    the chunks done so far are saved after every round (by rank 0), and an existing partial file is
    continued: a killed run loses at most one round and its result equals an uninterrupted run's.
    partial_source: the checkpoint file, whose content a continued partial file must come from.
    compile_step: compile the fixed-shape decode step (model.generate)."""
    # everything that decides the samples: a resume with other settings would mix two corpora
    model_sha256 = fingerprint(partial_source)["sha256"] if partial_source else None
    settings = {"length": length, "temperature": temperature, "top_k": top_k, "batch_size": batch_size,
                "seed": seed, "model_sha256": model_sha256, "dtype": dtype}

    def load_partial():
        if not (partial_path and os.path.exists(partial_path)):
            return []
        try:
            partial = torch.load(partial_path, weights_only=True)
            same = partial.get("settings") == settings and torch.equal(partial["prompts"], prompt_tokens)
        except Exception:
            raise UserError(f"{partial_path} is damaged: delete it and sample again") from None
        if not same:
            other_model = partial.get("settings", {}).get("model_sha256") != settings["model_sha256"]
            what = "another model" if other_model else "other settings"
            raise UserError(f"{partial_path} was sampled with {what}: resume with the same ones, "
                            f"or drop --resume to start over")
        print(f"resuming sampling after {len(partial['tokens']):,} sequences")
        return list(partial["tokens"].split(batch_size))
    out = rank0_only(rank, world_size, load_partial) or []   # (the others get rank 0's chunks at the end)
    starts = range(0, len(prompt_tokens), batch_size)
    done, = from_rank0([len(out)], world_size)
    generator, passed = torch.Generator(device=device).manual_seed(seed), 0   # chunks whose draws it is past
    for first in progress_bar(range(done, len(starts), world_size), "sampling", disable=not progress or rank):
        mine = first + rank   # this process's chunk of the round (none in a short last round)
        tokens = None
        if mine < len(starts):
            for other in starts[passed:mine]:
                skip_draws(len(prompt_tokens[other:other + batch_size]), length - 1, generator, device, temperature)
            idx = prompt_tokens[starts[mine]:starts[mine] + batch_size, None].to(device)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                tokens = model.generate(idx, length - 1, temperature=temperature, top_k=top_k or None,
                                        generator=generator, compile_step=compile_step).cpu()
            passed = mine + 1
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, tokens)
            out.extend(t for t in gathered if t is not None)
        else:
            out.append(tokens)
        if partial_path and rank == 0:
            atomic_torch_save({"tokens": torch.cat(out), "settings": settings, "prompts": prompt_tokens},
                              partial_path)
    return torch.cat(out)


class ReplayStream:
    """Old-distribution sequences, one batch at a time: from a replay corpus (taken in a seeded
    random order) or, for real replay, from a dataset's training split (windows at random offsets).

    The study never shows the model the same self-generated sequence twice. When a corpus sampled
    from the model being finetuned runs out, the stream samples another of the same size and
    settings from the frozen reference (the same distribution: the reference is that model), as
    the study resamples its replay buffer. compile_step: compile that sampling's decode step."""

    def __init__(self, source, ckpt_path, ckpt, rng, batch_size, block_size, max_steps, reuse, reference=None,
                 device="cpu", compile_step=False):
        self.rng, self.reuse, self.may_sample, self.compile = rng, reuse, False, compile_step
        self.epoch, self.drawn, self.chunk, self.sample_seconds = 0, 0, 0, 0.0
        model_config, needed = ckpt["model_config"], max_steps * batch_size
        if source.startswith("data:"):
            self.dataset = Dataset(source[len("data:"):])
            check_compatible(self.dataset.meta, model_config, self.dataset.dir, ckpt)
            self.dataset.check_length(block_size)
            self.description = f"real {self.dataset.name}"
            train = self.dataset.splits["train"]  # toy rows, or a token stream cut into windows
            self.capacity = len(train) if self.dataset.row_len else len(train) / block_size
            if needed > self.capacity and not reuse:
                raise UserError(f"replay_source={source}: {max_steps} steps x {batch_size} replay windows of "
                                f"{block_size} tokens would pass over its training split "
                                f"{needed / self.capacity:.1f} times: lower --replay_batch_size or "
                                "--max_steps, or allow it with --replay_reuse=True")
            return
        self.dataset = None
        self.tokens, self.meta = load_corpus(source)
        self.description = f"corpus {source} ({len(self.tokens):,} sequences)"
        check_compatible({**self.meta, "row_len": self.tokens.size(1)}, model_config,
                         f"replay corpus {source}", ckpt, fix="re-sample it from this checkpoint")
        self.capacity = len(self.tokens)
        if batch_size > self.capacity:
            raise UserError(f"--replay_batch_size={batch_size} is larger than replay corpus {source} "
                            f"({self.capacity:,} sequences): sample more or lower --replay_batch_size")
        # more can be sampled only from the model the corpus came from, the frozen reference
        # (the same file content: the path may have moved)
        same_file = self.meta.get("source_sha256") == fingerprint(ckpt_path)["sha256"]
        from_reference = "prompts" in self.meta and same_file
        self.reference, self.device = reference if from_reference else None, device
        if needed > self.capacity and not reuse and self.reference is None:
            raise UserError(f"replay corpus {source} has {self.capacity:,} sequences, but {max_steps} steps "
                            f"x {batch_size} need {needed:,} so that none is used twice, and it was not "
                            f"sampled from {ckpt_path}, so no more can be drawn: sample {needed} "
                            f"(sample_replay.py --num_samples={needed}) or allow reuse with "
                            "--replay_reuse=True")
        self.order, self.position = rng.permutation(self.capacity), 0
        self.may_sample = needed > self.capacity and not reuse   # the corpus will run out mid-run

    @property
    def passes(self):
        """Passes over the replay source so far, logged as replay_passes: over a corpus, how many times
        its most-used sequence has been seen (1 = none twice); over real data, the windows drawn as a
        fraction of its training split (windows start at random offsets: none is counted alone)."""
        if self.dataset is not None:
            return round(self.drawn / self.capacity, 3)
        return self.epoch + (self.position > 0 or self.chunk > 0)

    def sample_more(self):
        """Another corpus' worth of fresh sequences from the reference, with the corpus' own prompts,
        length and temperature; a seed of its own for every chunk, so a resumed run gets the same."""
        started = time.time()
        m = self.meta
        several = dist.is_available() and dist.is_initialized()   # under torchrun: each process its share
        fresh = sample_corpus(self.reference, prompt_column(m["prompts"]), m["length"], m["temperature"],
                              m["top_k"], 1024, m["seed"] + 7919 * self.chunk, self.device, progress=False,
                              dtype=m.get("dtype", "float32"), rank=dist.get_rank() if several else 0,
                              world_size=dist.get_world_size() if several else 1, compile_step=self.compile)
        fresh = fresh.to(self.tokens.dtype)
        self.sample_seconds += time.time() - started
        return fresh

    def state(self):
        """Where the stream is, to resume it exactly."""
        state = {"rng": rng_state(self.rng, with_torch=False), "epoch": self.epoch, "drawn": self.drawn,
                 "chunk": self.chunk, "sample_seconds": self.sample_seconds}
        if self.dataset is None:
            state.update(order=torch.from_numpy(self.order), position=self.position)
            if self.chunk:
                state["tokens"] = self.tokens
        return state

    def load_state(self, state):
        restore_rng(self.rng, state["rng"])
        self.epoch, self.drawn, self.chunk = state["epoch"], state["drawn"], state["chunk"]
        self.sample_seconds = state["sample_seconds"]
        if self.dataset is None:
            self.order, self.position = state["order"].numpy(), state["position"]
            if self.chunk:
                self.tokens = state["tokens"]

    def next(self, batch_size, block_size):
        self.drawn += batch_size
        if self.dataset is not None:
            return self.dataset.sample("train", batch_size, block_size, self.rng)
        if self.position + batch_size > len(self.order):
            if self.reuse:  # another pass over the same sequences
                self.order, self.position = self.rng.permutation(len(self.tokens)), 0
                self.epoch += 1
            else:           # the unused rest, then fresh samples
                self.chunk += 1
                rest = self.tokens[torch.from_numpy(self.order[self.position:])]
                self.tokens = torch.cat([rest, self.sample_more()])
                self.order, self.position = self.rng.permutation(len(self.tokens)), 0
        idx = self.order[self.position:self.position + batch_size]
        self.position += batch_size
        return self.tokens[torch.from_numpy(idx)]
