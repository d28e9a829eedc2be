"""
Held-out English that no training set translates: Jane Austen's six novels, which Debian ships
inside an R data package, read by our own reader of R's serialization format (no R needed).

    apt-get install -y --no-install-recommends r-cran-janeaustenr
    python data/austen/prepare.py --tokenizer=out/smollm2/tokenizer.json --out_dir=austen_smollm2

Writes data/<out_dir>/austen/{train,val}.bin + meta.json in the stream layout. Nothing is trained on
it: it measures forgetting of English prose (the capabilities experiment). val is Persuasion,
train the other five novels (kept for a longer measurement).

R's lazy-load database: Rdata.rdx (gzip) is a serialized list whose "variables" give each object's
(offset, length) in Rdata.rdb; there each object is a 4-byte big-endian size followed by a zlib
stream of the object, serialized in R's XDR format. The novels are character vectors, one element
per printed line, blank lines between paragraphs.
"""
import gzip
import os
import struct
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from support import tokenizer as bpe
from support.config import UserError, run

tokenizer = "out/smollm2/tokenizer.json"   # a released model's tokenizer (convert.py writes it)
out_dir = "austen_smollm2"                 # writes data/<out_dir>/austen/
data_dir = "/usr/lib/R/site-library/janeaustenr/data"

NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
VAL = "persuasion"
APT_HINT = "apt-get install -y --no-install-recommends r-cran-janeaustenr (or pass --data_dir=)"


class RReader:
    """R's XDR serialization, the subset a data package of character vectors uses: NULL, symbols,
    pairlists (attributes), and character, logical, integer, double and generic vectors."""

    def __init__(self, data):
        self.data, self.pos, self.refs = data, 0, []

    def int(self):
        value, = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self):
        if self.data[:2] != b"X\n":
            raise ValueError("not R's XDR serialization")
        self.pos = 2
        version = self.int()
        self.pos += 8                              # the R version that wrote it, the oldest that reads it
        if version == 3:
            self.pos += 4 + self.int()             # the native encoding's name
        return self.item()

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:                            # NULL
            return None
        if kind == 255:                            # a reference to a symbol read before
            return self.refs[(flags >> 8) - 1]
        if kind == 1:                              # a symbol: its name
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 2:                              # a pairlist: {tag: value}
            attributes = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head, rest = self.item(), self.item()
            return {tag: head, **(rest or {})}
        if kind == 9:                              # one string
            n = self.int()
            text = None if n == -1 else self.data[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += max(n, 0)
            return text
        n = self.int()
        if kind in (10, 13):                       # logical, integer
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:                           # double
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19):                     # character vector, generic vector (list)
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R object type {kind} is not read here")
        if has_attr:
            names = self.item().get("names")
            if names and kind == 19:
                value = dict(zip(names, value))
        return value


def read_novels(folder):
    """{name: text} of the six novels; paragraphs are joined lines, separated by blank lines."""
    index_path, db_path = os.path.join(folder, "Rdata.rdx"), os.path.join(folder, "Rdata.rdb")
    if not os.path.exists(index_path) or not os.path.exists(db_path):
        raise UserError(f"{index_path} not found: {APT_HINT}")
    try:
        with gzip.open(index_path) as f:
            index = RReader(f.read()).read()["variables"]
        with open(db_path, "rb") as f:
            database = f.read()
        novels = {}
        for name in NOVELS:
            offset, length = index[name]
            blob = database[int(offset):int(offset) + int(length)]
            lines = RReader(zlib.decompress(blob[4:])).read()
            paragraphs = " ".join(line.strip() if line else "" for line in lines).split("  ")
            novels[name] = "\n\n".join(p.strip() for p in paragraphs if p.strip()) + "\n"
    except (OSError, ValueError, KeyError, TypeError, struct.error, zlib.error) as e:
        problem = f"{type(e).__name__}: {e}"
        raise UserError(f"{folder} does not hold janeaustenr's novels ({problem}): {APT_HINT}") from None
    return novels


def main():
    encoding, normalize, tok = bpe.model_tokenizer(tokenizer)
    novels = read_novels(data_dir)
    ids = {"train": [], "val": []}
    for name, text in novels.items():
        ids["val" if name == VAL else "train"] += encoding.encode_ordinary(normalize(text)) + [tok["eos"]]
        print(f"  {name}: {len(text) / 1e6:.2f} MB")
    dataset_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), out_dir, "austen")
    bpe.write_stream_dataset(dataset_dir, ids, encoding, os.path.abspath(tokenizer),
                             {"source": "r-cran-janeaustenr", "language": "en", "dataset_token": tok["bos"],
                              "val_novel": VAL})


if __name__ == "__main__":
    run(main, globals())
