"""Derive the CLIP tokenizer files shipped in sdbatch/model/vocab/ from OpenAI's BPE file.

Usage: python scripts/make_vocab.py [path/to/bpe_simple_vocab_16e6.txt.gz [output folder]]

The SD v1.x tokenizer keeps the first 49152 - 256 - 2 merges; its vocabulary is the 256
byte symbols, the same with "</w>", each merge joined, then the two special tokens.
"""

import gzip
import json
import sys
from pathlib import Path

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bpe_simple_vocab_16e6.txt.gz"
OUT_DIR = Path(__file__).resolve().parents[1] / "sdbatch" / "model" / "vocab"
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in the order CLIP's vocab uses:
    the printable bytes as themselves first, then every other byte b as chr(256 + n), n = 0, 1, ..."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def main(source: Path = DEFAULT_SOURCE, out_dir: Path = OUT_DIR) -> None:
    lines = gzip.open(source, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:3]))
