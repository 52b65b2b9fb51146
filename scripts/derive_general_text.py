"""Derive the shipped general-text held-out set from Python's documentation (Debian's `python3.11-doc`).

    sudo apt-get install python3.11-doc     # the reST sources under /usr/share/doc/python3.11/html/_sources
    python scripts/derive_general_text.py --out data/general_text.jsonl --n 300

The forgetting guard of the evaluate stage scores base and fine-tuned model on these passages as
perplexity. One record per passage:

    {"text": "Python is an easy to learn, powerful programming language. ...", "source": "tutorial/index"}

Passages are whole prose paragraphs of the tutorial, the FAQ, the HOWTOs and the language reference, with reST markup
reduced to the text a reader sees; code, lists, tables, directives and headings are left out. The
output is reproducible byte for byte: candidates are sorted before a seeded sample, and the JSON
is written with fixed separators and "\\n" line ends. See data/README.md for the licence.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DEFAULT_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
SECTIONS = ("tutorial", "faq", "howto", "reference")  # the prose-heavy parts of the documentation
MIN_CHARS, MAX_CHARS = 300, 1000  # a passage is one paragraph of this many characters
# :role:`text <target>` or :role:`target` (a leading ~ shows only the last dotted name).
ROLE_RE = re.compile(r":[a-z][a-z:+-]*:`([^`]*)`")
LINK_RE = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")  # `text <url>`_
LITERAL_RE = re.compile(r"``([^`]+)``")
REF_RE = re.compile(r"`([^`]+)`_{1,2}")  # `name`_
EMPH_RE = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
HEADING_RE = re.compile(r"^([=\-~^*#\"+'`.:])\1{2,}\s*$")
# Markup that survives cleaning means the paragraph was not plain prose (substitutions, footnotes, targets).
LEFTOVER_RE = re.compile(r"[`|_\\]|\[#|\[\d+\]|::|>>>|\.\.\s|https?://")


def _role(match: re.Match[str]) -> str:
    text = match.group(1)
    if "<" in text and text.endswith(">"):
        return text[: text.index("<")].strip()
    text = text.lstrip("!")
    return text.lstrip("~").rsplit(".", 1)[-1] if text.startswith("~") else text


def clean(paragraph: str) -> str:
    """A reST paragraph as plain text."""
    text = " ".join(paragraph.split())
    text = ROLE_RE.sub(_role, text)
    text = LINK_RE.sub(r"\1", text)
    text = LITERAL_RE.sub(r"\1", text)
    text = REF_RE.sub(r"\1", text)
    return EMPH_RE.sub(r"\1", text)


def paragraphs(text: str) -> list[str]:
    """Top-level paragraphs: blocks of unindented lines that are not directives, lists, tables or headings."""
    out, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip() and not line[0].isspace():
            block.append(line)
            continue
        if block:
            out.append(block)
        block = []
    kept = []
    for lines in out:
        first = lines[0].lstrip()
        if first.startswith(("..", "*", "-", "+", "|", "=", ">>>", "#")) or re.match(r"^(\d+|#)\.\s", first):
            continue
        if any(HEADING_RE.match(line) for line in lines):
            continue
        kept.append("\n".join(lines))
    return kept


def passage_ok(text: str) -> bool:
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return (
        MIN_CHARS <= len(text) <= MAX_CHARS
        and text.isascii()
        and text[0].isupper()
        and text.endswith(".")
        and letters / len(text) > 0.9
        and not LEFTOVER_RE.search(text)
        and not text.rstrip(".").endswith(":")
    )


def candidates(sources: Path) -> list[dict[str, str]]:
    found = []
    for section in SECTIONS:
        for path in sorted((sources / section).glob("*.rst.txt")):
            name = f"{section}/{path.name.removesuffix('.rst.txt')}"
            for paragraph in paragraphs(path.read_text(encoding="utf-8")):
                text = clean(paragraph)
                if passage_ok(text):
                    found.append({"text": text, "source": name})
    unique = {r["text"]: r for r in found}  # a paragraph repeated across pages counts once
    return sorted(unique.values(), key=lambda r: (r["source"], r["text"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=Path, default=DEFAULT_SOURCES, help="the documentation's _sources folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=300, help="passages to sample")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.sources / "tutorial").is_dir():
        print(
            f"{args.sources} has no tutorial/ folder: install Debian's python3.11-doc "
            "(`apt-get install python3.11-doc`) or pass --sources",
            file=sys.stderr,
        )
        return 2
    pool = candidates(args.sources)
    if len(pool) < args.n:
        print(f"only {len(pool)} passages qualify, fewer than --n {args.n}", file=sys.stderr)
        return 1
    picked = random.Random(args.seed).sample(pool, args.n)
    picked.sort(key=lambda r: (r["source"], r["text"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for r in picked:
            f.write(json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) + "\n")
    print(f"{len(pool)} candidate passages; wrote {args.n} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
