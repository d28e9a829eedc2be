"""
Our converted released model against code we did not write: Hugging Face transformers' own
LlamaForCausalLM and tokenizer, both loaded from the same GGUF file.

    pip install -r experiments/requirements-check.txt        # transformers, accelerate, gguf (optional extras)
    python experiments/convert.py && python experiments/check_released.py

1. Logits: the same few hundred tokens through both models, in float64 (where only the order of
   floating-point operations differs: max |difference| must be <= 1e-5) and in float32.
   transformers' LlamaRMSNorm rounds its input to float32 whatever the model's dtype, so its
   "float64" model is float32 in every normalisation; the float64 comparison runs its RMSNorm in
   the input's dtype (the same formula without that cast), and we report the as-shipped number too.
2. Tokenizer: the ids of both Bibles (chapter by chapter) and of hard strings (unicode, digits,
   whitespace runs, special-token text), ours against transformers'. transformers builds its
   tokenizer from the GGUF with plain GPT-2 pre-tokenization, ignoring the file's
   tokenizer.ggml.pre = "smollm" (digits split one by one, as in llama.cpp and SmolLM2's own
   tokenizer.json); we report the comparison with that tokenizer as loaded, and with the same
   tokenizer given SmolLM2's pre-tokenizer (Digits, then ByteLevel), which is the one ours follows.
3. Chat format: our rendering (tokenizer.render_chat, from the chat template convert.py
   kept) against transformers' apply_chat_template, text and ids, on a few conversations.
4. Multiple-choice scoring: every choice's log-likelihood after its context, for the first
   `bench_items` items of the prepared benchmark (data/mmlu/prepare.py), ours (evaluate.score_choices:
   shared prefix, KV cache reused across choices) against transformers running each context + choice
   whole, in float32: the largest difference is reported (float32 rounding of two operation orders,
   summed over a choice's tokens).
5. Export: the checkpoint written out by export.py (a Hugging Face folder and an F32 GGUF, in a
   temporary folder) and loaded back by transformers gives our logits on the same tokens (float32).
Writes results/released_check.json and results/released_check.md.
"""
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: model.py, support/

from support import tokenizer as bpe
from support.checkpoint import load_checkpoint
from support.config import UserError, run
from support.files import atomic_write_text, write_json

checkpoint = "out/smollm2/ckpt.pt"   # from convert.py
gguf = ""                            # the GGUF it was converted from; "" = the checkpoint's source
n_tokens = 300                       # tokens through both models
modules_dir = "/usr/share/sword"     # the Bibles (data/bible/prepare.py's reader); skipped if missing
benchmark = "mmlu_smollm2/mmlu"      # prepared for this model; "" = skip the scoring check
bench_items = 300
export = True                        # also check export.py's files
out_json = "results/released_check.json"
out_md = "results/released_check.md"

HARD_STRINGS = [
    "Hello world", " leading space", "trailing space ", "  two  spaces   three    four", "tabs\tand\nnewlines\n\n\n",
    "1234567890", "pi is 3.14159, e is 2.71828", "x  1", "a 12  34   56", "version 2.0.1-rc3", "١٢٣ ٤٥٦ (Arabic digits)",
    "naïve café résumé — “quotes” ‘single’", "東京タワー 北京 서울", "emoji 🚀🔥 and family 👩‍👩‍👧", "Ünïcödé ÅÄÖ ß ẞ",
    "can't won't I'm you're they've we'll he'd", "CAN'T WON'T", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>",
    "<repo_name>nanoreplay<file_sep>", "\x00\x01\x7f control bytes", "    indented code\n        more", "a\r\nb\r\n",
    "¿Dónde está el baño? ¡Ahí!", "Él comió piña y ñandú.", "$100.00 + 25% = ???", "e=mc^2 && x<y || y>=z",
]


def transformers_models(path):
    """transformers' model and tokenizer, loaded from the GGUF (dequantised to float32)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError("this check needs transformers: pip install -r experiments/requirements-check.txt") from None
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


def rmsnorm_in_input_dtype(self, x):
    """transformers' LlamaRMSNorm.forward without its cast to float32."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def with_smollm2_pretokenizer(tok):
    """A copy of transformers' tokenizer whose pre-tokenizer is SmolLM2's: split every digit
    apart, then GPT-2's byte-level pattern."""
    from tokenizers import pre_tokenizers
    fast = type(tok.backend_tokenizer).from_str(tok.backend_tokenizer.to_str())
    fast.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return lambda text: fast.encode(text, add_special_tokens=False).ids


def compare_ids(ours, theirs, texts):
    """How many of the texts get identical ids, and the first few that do not."""
    mismatches = [t for t in texts if ours(t) != theirs(t)]
    return {"texts": len(texts), "identical": len(texts) - len(mismatches),
            "tokens": sum(len(ours(t)) for t in texts), "first_mismatches": mismatches[:3]}


def main():
    t0 = time.time()
    ours, ckpt = load_checkpoint(checkpoint)
    path = gguf or ckpt.get("source", "")
    if not path.endswith(".gguf") or not os.path.exists(path):
        raise UserError(f"no GGUF file to compare with ({path!r}): pass --gguf=the file "
                        f"{checkpoint} was converted from")
    hf_model, hf_tok = transformers_models(path)
    encoding = bpe.load(ckpt["tokenizer"]["tokenizer_path"])
    report = {"checkpoint": checkpoint, "gguf": path, "transformers": __import__("transformers").__version__}

    # 1. logits, float64 then float32
    text = " ".join(HARD_STRINGS[:10]) + " In the beginning God created the heavens and the earth. " * 20
    ids = [ckpt["tokenizer"]["bos"]] + encoding.encode_ordinary(text)[:n_tokens - 1]
    x = torch.tensor([ids])
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    shipped_norm = LlamaRMSNorm.forward
    for name, dtype, norm in (("float64", torch.float64, rmsnorm_in_input_dtype),
                              ("float64, transformers' RMSNorm as shipped (float32)", torch.float64, shipped_norm),
                              ("float32", torch.float32, shipped_norm)):
        LlamaRMSNorm.forward = norm
        with torch.no_grad():
            difference = (ours.to(dtype)(x) - hf_model.to(dtype)(x).logits).abs().max().item()
        LlamaRMSNorm.forward = shipped_norm
        report.setdefault("logits_max_abs_difference", {})[name] = difference
        print(f"logits over {len(ids)} tokens, {name}: max |ours - transformers| = {difference:.3g}")

    # 2. tokenizer ids: ours with special tokens recognised, as transformers does by default
    ours_ids = lambda t: encoding.encode(t, allowed_special="all")
    as_loaded = lambda t: hf_tok(t, add_special_tokens=False)["input_ids"]
    smollm2 = with_smollm2_pretokenizer(hf_tok)
    corpora = {"hard strings": HARD_STRINGS}
    try:
        from data.bible import prepare as bible
        for lang, prefix in bible.LANGUAGES.items():
            chapters = bible.read_bible(bible.find_module(modules_dir, prefix))
            corpora[f"Bible {lang}"] = [c for book in chapters.values() for c in book]
    except FileNotFoundError as e:
        print(f"skipping the Bibles: {e}")
    report["tokenizer"] = {}
    for name, texts in corpora.items():
        report["tokenizer"][name] = {"vs transformers with SmolLM2's pre-tokenizer": compare_ids(ours_ids, smollm2, texts),
                                     "vs transformers as loaded from the GGUF": compare_ids(ours_ids, as_loaded, texts)}
        for against, r in report["tokenizer"][name].items():
            print(f"{name}: {r['identical']}/{r['texts']} identical {against} ({r['tokens']:,} tokens)")

    # 3. chat format: our rendering of the model's template against transformers' own
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]]
    tok = bpe.released_encoding(ckpt["tokenizer"]["tokenizer_path"])[2]
    same = 0
    for messages in conversations:
        for generation in (True, False):
            text = bpe.render_chat(messages, tok, add_generation_prompt=generation)
            theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            same += text == theirs and ours_ids(text) == as_loaded(theirs)
    report["chat_template"] = {"conversations": 2 * len(conversations), "identical_text_and_ids": same}
    print(f"chat format: {same}/{2 * len(conversations)} renderings identical to transformers' "
          "(text and ids)")

    # 4. multiple-choice scoring, float32: ours (cached, batched) against each choice run whole
    if benchmark:
        from support.dataset import Benchmark
        from evaluate import score_choices
        items = Benchmark(benchmark).items[:bench_items]
        ours_scores = score_choices(ours.float().eval(), items)
        hf_model.to(torch.float32)
        worst = 0.0
        for item, mine in zip(items, ours_scores):
            for choice, value in zip(item["choices"], mine):
                with torch.no_grad():
                    logits = hf_model(torch.tensor([item["context"] + choice])).logits[0]
                logprobs = logits.float().log_softmax(-1)
                n = len(item["context"])
                theirs = sum(logprobs[n - 1 + j, t].item() for j, t in enumerate(choice))
                worst = max(worst, abs(value.item() - theirs))
        report["choice_loglikelihoods"] = {"items": len(items), "max_abs_difference_float32": worst,
                                           "choices": sum(len(i["choices"]) for i in items)}
        print(f"choice log-likelihoods, {len(items)} items, float32: max |ours - transformers| = {worst:.3g}")

    # 5. export.py's files, loaded by transformers: the same logits as ours
    if export:
        import tempfile
        from transformers import AutoModelForCausalLM
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "export.py"),
                            f"--checkpoint={checkpoint}", f"--out_dir={tmp}/x", "--formats=hf,gguf-f32"], check=True)
            with torch.no_grad():
                mine = ours.float()(x)
                for name, kwargs in (("Hugging Face folder", {}), ("F32 GGUF", {"gguf_file": "model-f32.gguf"})):
                    folder = f"{tmp}/x/hf" if not kwargs else f"{tmp}/x"
                    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
                    difference = (loaded(x).logits - mine).abs().max().item()
                    report.setdefault("export_logits_max_abs_difference", {})[name] = difference
                    print(f"export, {name}, loaded by transformers: max |ours - transformers| = {difference:.3g}")
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out_json, report)
    lines = ["| check | result |", "|---|---|"]
    for name, difference in report["logits_max_abs_difference"].items():
        lines.append(f"| logits, {len(ids)} tokens, {name}: max abs difference | {difference:.2e} |")
    for name, results in report["tokenizer"].items():
        for against, r in results.items():
            lines.append(f"| {name}: identical ids {against} | {r['identical']} of {r['texts']} "
                         f"({r['tokens']:,} tokens) |")
    chat = report["chat_template"]
    lines.append(f"| chat format: renderings identical to transformers' apply_chat_template (text and ids) | "
                 f"{chat['identical_text_and_ids']} of {chat['conversations']} |")
    if "choice_loglikelihoods" in report:
        c = report["choice_loglikelihoods"]
        lines.append(f"| multiple-choice log-likelihoods, {c['items']} items ({c['choices']} choices), "
                     f"float32: max abs difference | {c['max_abs_difference_float32']:.2e} |")
    for name, difference in report.get("export_logits_max_abs_difference", {}).items():
        lines.append(f"| export.py's {name} loaded by transformers: logits, {len(ids)} tokens, float32, "
                     f"max abs difference | {difference:.2e} |")
    atomic_write_text(out_md, "\n".join(lines) + "\n")
    print(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    run(main, globals())
