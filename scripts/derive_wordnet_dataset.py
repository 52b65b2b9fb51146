"""Derive the shipped instruction dataset from WordNet 3.0 (Debian's `wordnet-base`).

    sudo apt-get install wordnet-base        # puts WordNet 3.0 under /usr/share/wordnet
    python scripts/derive_wordnet_dataset.py --out data/wordnet_definitions.jsonl --n 3000

One Alpaca-style record per lemma, from its first (most frequent) sense in the index.* files:

    {"instruction": "Define the noun \"friendship\".", "input": "",
     "output": "The state of being friends (or friendly)."}

The output is reproducible byte for byte: candidates are sorted before a seeded sample, and the
JSON is written with fixed separators and "\\n" line ends. See data/README.md for the licence.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
# WordNet file suffix -> part of speech in the instruction.
POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
# Lowercase words joined by '_' or '-': drops digits, periods, apostrophes, slashes and the like.
LEMMA_RE = re.compile(r"^[a-z]+(?:[_-][a-z]+)*$")
# The quoted usage examples follow the definition after '; "'.
EXAMPLE_RE = re.compile(r';\s*"')
# Adjective position markers in data.adj words: "galore(ip)", "elect(p)", "former(a)".
MARKER_RE = re.compile(r"\((?:a|p|ip)\)$")
MIN_GLOSS, MAX_GLOSS = 16, 160  # characters of the cleaned definition
MAX_LEMMA = 40


def clean_gloss(gloss: str) -> str | None:
    """The definition part of a WordNet gloss, capitalised and ending with '.', or None to skip it."""
    text = EXAMPLE_RE.split(gloss, maxsplit=1)[0]
    text = " ".join(text.split()).rstrip(";: ").strip()
    if not text or '"' in text or not text.isascii() or not text[0].isalpha():
        return None
    text = text[0].upper() + text[1:]
    if not text.endswith((".", "!", "?")):
        text += "."
    if not MIN_GLOSS <= len(text) <= MAX_GLOSS:
        return None
    return text


def parse_synset(line: str) -> tuple[list[str], str]:
    """(words of the synset, gloss) from one line of a data.* file."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    w_cnt = int(fields[3], 16)
    words = [MARKER_RE.sub("", fields[4 + 2 * i]) for i in range(w_cnt)]
    return words, gloss.strip()


def candidates(wordnet_dir: Path) -> list[dict[str, str]]:
    """Every usable record, sorted by part of speech and lemma."""
    records = []
    for suffix, pos_name in POS.items():
        index_path, data_path = wordnet_dir / f"index.{suffix}", wordnet_dir / f"data.{suffix}"
        with data_path.open("rb") as data:
            for raw in index_path.read_bytes().splitlines():
                if raw.startswith(b" "):  # the licence header
                    continue
                fields = raw.decode("ascii", errors="replace").split()
                lemma = fields[0]
                if not LEMMA_RE.match(lemma) or len(lemma) > MAX_LEMMA:
                    continue
                # index line: lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offsets...
                synset_cnt, p_cnt = int(fields[2]), int(fields[3])
                offsets = fields[4 + p_cnt + 2 :]
                if len(offsets) != synset_cnt:
                    raise ValueError(f"{index_path}: unexpected index line {raw[:80]!r}")
                data.seek(int(offsets[0]))  # the first sense is the most frequent one
                line = data.readline().decode("utf-8", errors="replace")
                words, gloss = parse_synset(line)
                output = clean_gloss(gloss)
                if output is None:
                    continue
                # Keep the synset's spelling ("Paris", "DNA") where it differs from the index only by case.
                shown = next((w for w in words if w.lower() == lemma), lemma).replace("_", " ")
                records.append({"instruction": f'Define the {pos_name} "{shown}".', "input": "", "output": output})
    records.sort(key=lambda r: r["instruction"])
    return records


def derive(wordnet_dir: Path, n: int, seed: int) -> list[dict[str, str]]:
    """A seeded sample of n records with unique instructions."""
    pool = candidates(wordnet_dir)
    unique = list({r["instruction"]: r for r in pool}.values())
    if n > len(unique):
        raise SystemExit(f"asked for {n} records but WordNet gives only {len(unique)} usable ones")
    return random.Random(seed).sample(unique, n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Output JSONL file.")
    parser.add_argument("--n", type=int, default=3000, help="Number of records (default 3000).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default 0).")
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR, help="WordNet 3.0 dict folder.")
    args = parser.parse_args(argv)
    if not (args.wordnet_dir / "index.noun").is_file():
        print(f"error: no WordNet under {args.wordnet_dir} (apt-get install wordnet-base)", file=sys.stderr)
        return 2
    records = derive(args.wordnet_dir, args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
