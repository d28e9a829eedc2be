"""
Real English and Spanish text, offline: the World English Bible and the Reina-Valera 1909, read
from the Debian SWORD packages by our own reader of the zText format, restricted to the books both
translations share (the 66 of the Protestant canon), tokenized with a BPE trained on both.

    apt-get install -y --no-install-recommends sword-text-web sword-text-sparv
    python data/bible/prepare.py [--modules_dir=/usr/share/sword] [--vocab_size=4096] [--out_dir=bible]
    python data/bible/prepare.py --tokenizer=out/smollm2/tokenizer.json --out_dir=bible_smollm2

Writes data/<out_dir>/tokenizer.json and data/<out_dir>/{en,es}/{train,val}.bin + meta.json in the stream
layout (dataset token English 0, Spanish 1), so the datasets are named <out_dir>/en and <out_dir>/es. Every
20th chapter goes to val. The capacity sweeps use a second copy with a 512-token vocabulary
(--vocab_size=512 --out_dir=bible512): with tiny widths the embedding would otherwise hold most of the
parameters. With --tokenizer=, the text is tokenized by a released model's tokenizer (convert.py)
instead, and every window starts with that model's BOS token (its replay prompt).

The zText format (per testament `ot` / `nt`):
  .bzs  one 12-byte record per compressed block: offset, compressed size, uncompressed size (<III)
  .bzz  the zlib-compressed blocks (here one block per book)
  .bzv  one 10-byte record per index entry: block number, offset in the block, size (<IIH)
Index entries are, in versification order, module/book/chapter introductions and verses; each is a
fragment of OSIS XML. Chapter starts are marked inside the text (`<chapter osisID="Gen.1" ...>`),
which also names the book, so no versification table is needed.
"""
import glob
import os
import re
import struct
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from support import tokenizer as bpe
from support.config import fail

LANGUAGES = {"en": "engWEB", "es": "spaRV1909"}  # SWORD module name prefixes
APT_HINT = "apt-get install -y --no-install-recommends sword-text-web sword-text-sparv"

CHAPTER = re.compile(r'<chapter\b[^>]*\bosisID="([^"]+)"')
NOTE = re.compile(r"<note\b.*?</note>", re.S)
HEADING = re.compile(r'<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', re.S)   # section headings
INLINE_TAG = re.compile(r"</?(?:w|q|seg|name|hi|foreign|divineName|transChange)\b[^>]*>")
OTHER_TAG = re.compile(r"<[^>]+>")


def find_module(modules_dir, prefix):
    """The zText folder of the first module whose name starts with prefix (names change between
    releases, e.g. engWEB2015eb)."""
    hits = sorted(glob.glob(os.path.join(modules_dir, "modules", "texts", "ztext", prefix + "*")))
    hits = [h for h in hits if os.path.exists(os.path.join(h, "nt.bzv"))]
    if not hits:
        raise FileNotFoundError(f"no SWORD module {prefix}* under {modules_dir}/modules/texts/ztext: "
                                f"install it with `{APT_HINT}` or pass --modules_dir=")
    return hits[0]


def read_entries(path):
    """Yield the raw OSIS text of every index entry of one testament (`path` without extension)."""
    with open(path + ".bzs", "rb") as f:
        blocks = list(struct.iter_unpack("<III", f.read()))
    with open(path + ".bzz", "rb") as f:
        compressed = f.read()
    with open(path + ".bzv", "rb") as f:
        index = f.read()
    block_number, block = None, b""
    for number, offset, size in struct.iter_unpack("<IIH", index):
        if size == 0:
            continue
        if number != block_number:
            start, length, _ = blocks[number]
            block_number, block = number, zlib.decompress(compressed[start:start + length])
        yield block[offset:offset + size].decode("utf-8", errors="replace")


def clean(osis):
    """OSIS fragment -> plain text. Footnotes and section headings go entirely; tags that sit inside
    a sentence (words, quotes, added words) are dropped; every other tag (paragraph, line, chapter
    markers) becomes a space, so words on either side never glue together."""
    text = NOTE.sub(" ", osis)
    text = HEADING.sub(" ", text)
    text = INLINE_TAG.sub(lambda m: " " if "transChange" in m.group() else "", text)
    text = OTHER_TAG.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ([,.;:!?])", r"\1", text)


def read_bible(module_dir):
    """{book osisID: [chapter text, ...]} in canonical order. Chapters are found by their start
    markers (`<chapter osisID="Hos.1" sID=...>`), whose osisID also names the book: more reliable
    than the book divs, one of which is missing in the English module."""
    books, seen, chapter = {}, set(), None
    for testament in ("ot", "nt"):
        if not os.path.exists(os.path.join(module_dir, testament + ".bzv")):
            continue
        for raw in read_entries(os.path.join(module_dir, testament)):
            for match in CHAPTER.finditer(raw):
                if match.group(1) not in seen:  # duplicate verse pointers repeat markers
                    seen.add(match.group(1))
                    chapter = match.group(1)
                    books.setdefault(chapter.split(".")[0], []).append([])
            if chapter is None:
                continue  # front matter before the first chapter
            text = clean(raw)
            if text:
                books[chapter.split(".")[0]][-1].append(text)
    return {b: [" ".join(verses) for verses in chapters if verses] for b, chapters in books.items()}


def split_chapters(bible, books, every=20):
    """Deterministic split: every `every`-th chapter (counted across the shared books) is val."""
    train, val, i = [], [], 0
    for b in books:
        for chapter in bible[b]:
            (val if i % every == every - 1 else train).append(chapter)
            i += 1
    return "\n".join(train) + "\n", "\n".join(val) + "\n"


def prepare(modules_dir, out_root, vocab_size=4096, tokenizer_path=""):
    bibles = {lang: read_bible(find_module(modules_dir, prefix)) for lang, prefix in LANGUAGES.items()}
    shared = [b for b in bibles["en"] if b in bibles["es"] and bibles["en"][b] and bibles["es"][b]]
    splits = {lang: dict(zip(("train", "val"), split_chapters(bibles[lang], shared))) for lang in LANGUAGES}
    for lang in LANGUAGES:
        print(f"{lang}: {len(shared)} shared books, {len(splits[lang]['train']) / 1e6:.2f} MB train, "
              f"{len(splits[lang]['val']) / 1e6:.2f} MB val")

    bpe.build_text_datasets(out_root, splits, vocab_size, source="sword", tokenizer_path=tokenizer_path)
    return shared


def main(argv):
    settings = {"modules_dir": "/usr/share/sword", "vocab_size": "4096", "out_dir": "bible", "tokenizer": ""}
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in settings:
            fail(f"unknown option {arg!r}: use --modules_dir=PATH --vocab_size=N "
                     "--out_dir=NAME --tokenizer=PATH")
        settings[key] = value
    try:
        data_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if settings["tokenizer"] and not os.path.exists(settings["tokenizer"]):
            raise FileNotFoundError(f"--tokenizer={settings['tokenizer']} not found: run convert.py first")
        prepare(settings["modules_dir"], os.path.join(data_dir, settings["out_dir"]), int(settings["vocab_size"]),
                settings["tokenizer"])
    except FileNotFoundError as e:
        fail(f"{e}")
    except ValueError:
        fail(f"--vocab_size={settings['vocab_size']!r} must be a whole number")


if __name__ == "__main__":
    main(sys.argv[1:])
