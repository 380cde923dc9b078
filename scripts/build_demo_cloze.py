"""A small multiple-choice cloze task cut from the demo corpus's test split, for
lm-evaluation-harness (benchmarks/lm_eval_tasks/demo_cloze/).

Each item: the start of a line of verse or scripture as context, the word that really
follows as the answer, and three other words drawn from elsewhere in the split as
distractors. Deterministic (seeded); the test split is never used to fit anything.

    python scripts/build_demo_cloze.py            # writes demo_cloze.jsonl
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specmoe.corpus import load_text_dataset  # noqa: E402
from specmoe.paths import REPO_ROOT  # noqa: E402

OUT = REPO_ROOT / "benchmarks" / "lm_eval_tasks" / "demo_cloze" / "demo_cloze.jsonl"


def main(items: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = []
    for row in load_text_dataset(None, split="test"):
        for line in row["text"].splitlines():
            words = line.split()
            if 8 <= len(words) <= 24 and all(re.fullmatch(r"[A-Za-z',;:.!?-]+", w) for w in words):
                lines.append(words)
    vocab = sorted({re.sub(r"[^A-Za-z']", "", w).lower() for words in lines for w in words} - {""})
    rng.shuffle(lines)
    out = []
    for words in lines:
        cut = rng.randint(4, len(words) - 2)
        answer = re.sub(r"[^A-Za-z']", "", words[cut])
        if len(answer) < 3:
            continue
        wrong = set()
        while len(wrong) < 3:
            w = rng.choice(vocab)
            if w.lower() != answer.lower() and len(w) >= 3:
                wrong.add(w)
        choices = [answer] + sorted(wrong)
        rng.shuffle(choices)
        out.append({"context": " ".join(words[:cut]), "choices": [" " + c for c in choices],
                    "answer": choices.index(answer)})
        if len(out) == items:
            break
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(o) + "\n" for o in out), encoding="utf-8")
    print(f"{len(out)} items -> {OUT.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
