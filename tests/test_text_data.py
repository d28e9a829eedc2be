"""Real-text data: the SWORD zText reader (on a module the test builds), the BPE tokenizer served by
tiktoken, and the C4 parser (on small local files): no internet, no installed packages needed."""
import base64
import gzip
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from conftest import REPO
from data.bible import prepare as bible
from data.c4 import prepare as c4
from support import tokenizer as bpe
from support.dataset import Dataset



def write_ztext(module_dir, testament, entries):
    """Write a zText testament: all entries in one zlib block, one index record per entry."""
    os.makedirs(module_dir, exist_ok=True)
    raw = "".join(entries).encode("utf-8")
    compressed = zlib.compress(raw)
    base = os.path.join(module_dir, testament)
    open(base + ".bzz", "wb").write(compressed)
    open(base + ".bzs", "wb").write(struct.pack("<III", 0, len(compressed), len(raw)))
    index, offset = b"", 0
    for e in entries:
        size = len(e.encode("utf-8"))
        index += struct.pack("<IIH", 0, offset, size)
        offset += size
    open(base + ".bzv", "wb").write(index)


ENGLISH_OT = [
    "",                                                            # empty entry (size 0)
    '<milestone type="x-importer" n="front matter"/>',             # before any chapter: dropped
    '<div type="book" osisID="Gen"/><title type="main">Genesis</title><chapter osisID="Gen.1" sID="Gen.1"/>',
    '<w lemma="a">In</w> <w lemma="b">the</w> beginning<note type="x">a footnote</note>God created.',
    '<div type="x-p"/>The earth<transChange type="added">was</transChange>empty , and dark.',
    '<chapter osisID="Gen.2" sID="Gen.2"/><title type="psalm" canonical="true">A song.</title>Rest came.',
    '<chapter osisID="Tob.1" sID="Tob.1"/>Only in the English module.',   # a book Spanish lacks
]
SPANISH_OT = [
    "",
    '<chapter osisID="Gen.1" sID="Gen.1"/><w lemma="a">En el principio</w> creó Dios.',
    '<chapter osisID="Gen.2" sID="Gen.2"/>Y reposó.',
]


@pytest.fixture()
def sword_modules(tmp_path):
    root = tmp_path / "sword"
    eng = root / "modules" / "texts" / "ztext" / "engWEBtest"
    spa = root / "modules" / "texts" / "ztext" / "spaRV1909test"
    write_ztext(str(eng), "ot", ENGLISH_OT)
    write_ztext(str(eng), "nt", ['<chapter osisID="Matt.1" sID="Matt.1"/>Jesus <q '
                                 'who="Jesus">“Follow me.”</q>'])
    write_ztext(str(spa), "ot", SPANISH_OT)
    write_ztext(str(spa), "nt", ['<chapter osisID="Matt.1" sID="Matt.1"/>Jesús: Sígueme.'])
    return str(root)


def test_sword_reader_cleans_osis_and_finds_books_and_chapters(sword_modules):
    english = bible.read_bible(bible.find_module(sword_modules, "engWEB"))
    assert list(english) == ["Gen", "Tob", "Matt"]
    assert english["Gen"] == ["In the beginning God created. The earth was empty, and dark.",
                              "A song. Rest came."]  # footnote and heading gone, canonical title kept
    assert english["Matt"] == ["Jesus “Follow me.”"]


def test_missing_modules_name_the_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        bible.find_module(str(tmp_path), "engWEB")


def test_bible_prepare_keeps_shared_books_and_writes_stream_datasets(sword_modules, tmp_path):
    out = tmp_path / "bible"
    shared = bible.prepare(sword_modules, str(out), vocab_size=300)
    assert shared == ["Gen", "Matt"]   # Tobit is English-only: dropped
    en, es = Dataset(str(out / "en")), Dataset(str(out / "es"))
    assert (en.dataset_token, es.dataset_token) == (0, 1)
    assert en.meta["tokenizer"] == es.meta["tokenizer"] and en.meta["vocab_size"] <= 300  # tiny text: fewer merges
    enc = bpe.load(str(out / "tokenizer.json"))
    text = enc.decode(np.concatenate([en.splits["train"], en.splits["val"]]).tolist())
    assert "Only in the English module" not in text and "God created" in text


SAMPLES = ["Hola, ¿cómo estás? Él comió piña.", "naïve café — 東京 🚀 \t tabs\n\nnewlines",
           "<|english|> looks special but is text", "  leading spaces and 12345 digits ", "",
           "\x00\x01 control bytes and a lone surrogate-free emoji 👩‍👩‍👧"]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzáéñ"), rng.integers(2, 8))) for _ in range(300)]
    text = " ".join(rng.choice(words, 5000))
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    bpe.save(bpe.train_bpe(text, vocab_size=400), path)
    return path


def test_tokenizer_round_trips_arbitrary_utf8(small_tokenizer):
    enc = bpe.load(small_tokenizer)
    rng = np.random.default_rng(0)
    random_texts = ["".join(chr(c) for c in rng.integers(32, 0x2FFF, 40) if not 0xD800 <= c < 0xE000) for _ in range(20)]
    for text in SAMPLES + random_texts:
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_reserved_ids_never_appear_in_encoded_text(small_tokenizer):
    enc = bpe.load(small_tokenizer)
    for text in SAMPLES:
        ids = enc.encode_ordinary(text)
        assert all(i >= bpe.N_RESERVED for i in ids)
    assert enc.encode_single_token("<|english|>") == 0 and enc.encode_single_token("<|spanish|>") == 1
    assert enc.n_vocab == 400


def test_tokenizer_training_is_deterministic_and_merges_frequent_pairs():
    text = "abab abab abab cd cd " * 20
    a, b = bpe.train_bpe(text, vocab_size=bpe.N_RESERVED + 256 + 5), bpe.train_bpe(text, vocab_size=bpe.N_RESERVED + 256 + 5)
    assert a == b and len(a) == 5
    assert a[0] in (b"ab", b" a")      # the most frequent pair is merged first
    assert b"abab" in a or b" abab" in a


def write_c4_shard(path, docs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "timestamp": "2019", "url": "http://example"}) + "\n")
        f.write("\n")


def test_a_run_without_spaces_is_trained_on_in_pieces_of_bounded_length():
    """A 20,000-character run (minified code, a base64 blob) is cut into MAX_CHUNK pieces before
    training, so its cost stays linear in its length: no merge is longer than a piece (uncut, the
    run's repeated halvings would make merges of 512 bytes and more)."""
    text = "ab" * 10_000 + " ab ab"
    merges = bpe.train_bpe(text, vocab_size=bpe.N_RESERVED + 256 + 40)
    assert max(map(len, merges)) == bpe.MAX_CHUNK   # the longest merge is one whole piece


def test_bible_prepare_on_text_with_a_60k_character_word_trains_in_bounded_pieces(tmp_path):
    """Through the real script: a verse holding a 60,000-character run without spaces (minified
    code, a base64 blob) is trained on in pieces of MAX_CHUNK characters, so no token is longer than
    a piece (uncut, the run's repeats would merge into tokens of thousands of bytes), and the
    datasets still decode back to the text."""
    blob = "".join(chr(ord("a") + i % 7) for i in range(60_000))   # (a verse holds 64 KiB at most)
    english = ENGLISH_OT[:4] + [f"Blob {blob} ends here."] + ENGLISH_OT[4:]
    root = tmp_path / "sword"
    write_ztext(str(root / "modules" / "texts" / "ztext" / "engWEBtest"), "ot", english)
    write_ztext(str(root / "modules" / "texts" / "ztext" / "spaRV1909test"), "ot", SPANISH_OT)
    for module in ("engWEBtest", "spaRV1909test"):
        write_ztext(str(root / "modules" / "texts" / "ztext" / module), "nt", ['<chapter osisID="Matt.1" sID="Matt.1"/>Amen.'])
    result = subprocess.run([sys.executable, "data/bible/prepare.py", f"--modules_dir={root}", "--vocab_size=400",
                             f"--out_dir={tmp_path / 'bible'}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1500:]
    merges = json.load(open(tmp_path / "bible" / "tokenizer.json"))["merges"]
    assert len(merges) > 40 and max(len(base64.b64decode(m)) for m in merges) == bpe.MAX_CHUNK == 256
    en = Dataset(str(tmp_path / "bible" / "en"))
    text = bpe.load(str(tmp_path / "bible" / "tokenizer.json")).decode(
        np.concatenate([en.splits["train"], en.splits["val"]]).tolist())
    assert f"Blob {blob} ends here." in text


def test_c4_parser_reads_documents_and_splits_them(tmp_path):
    write_c4_shard(tmp_path / "a.json.gz", [f"document {i} in English" for i in range(60)] + [""])
    write_c4_shard(tmp_path / "b.json.gz", ["second shard"])
    docs = c4.read_documents([str(tmp_path / "a.json.gz"), str(tmp_path / "b.json.gz")], max_bytes=1e9)
    assert len(docs) == 61 and docs[0] == "document 0 in English" and docs[-1] == "second shard"
    assert len(c4.read_documents([str(tmp_path / "a.json.gz")], max_bytes=30)) == 2  # stops at the budget
    splits = c4.split_documents(docs)
    assert splits["val"] == "document 49 in English\n"
    assert "document 49 " not in splits["train"] and "document 48 in English" in splits["train"]


def test_c4_download_offline_fails_with_one_clear_line(tmp_path):
    with pytest.raises(ConnectionError, match="needs internet"):
        c4.download("http://127.0.0.1:9/c4.json.gz", str(tmp_path / "x.json.gz"))
    assert not os.listdir(tmp_path)  # nothing half-written
