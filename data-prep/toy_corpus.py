#!/usr/bin/env python3
"""Generate a small deterministic corpus offline: an LM text and an MT language pair.

The point is a task a model must actually learn, not memorise: sentences come
from a small probabilistic grammar (agreement between subject and verb,
optional adjectives, prepositional phrases, relative clauses), and the
"translation" maps every word through a fixed lexicon *and* reorders the
sentence (SVO -> SOV, adjectives after nouns), so the target depends on
long-range structure of the source.

    python data-prep/toy_corpus.py OUT_DIR [--train 20000] [--seed 1]

writes OUT_DIR/lm/{train,valid,test}.txt and OUT_DIR/mt/{train,valid,test}.{en,xx}.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

NOUNS = ["cat", "dog", "bird", "child", "farmer", "teacher", "horse", "river", "tree", "house", "city", "boat"]
ADJS = ["big", "small", "red", "old", "young", "quiet", "happy", "dark", "green", "tall"]
VERBS = ["see", "like", "follow", "find", "watch", "help", "carry", "hear"]
PREPS = ["near", "under", "behind", "with", "above"]
DETS = ["the", "a", "every", "some"]


def _lexicon() -> dict[str, str]:
    """A fixed invented target vocabulary: deterministic, one-to-one."""
    rng = random.Random(1234)
    words = sorted(set(NOUNS + ADJS + VERBS + PREPS + DETS + ["s", "that", "and", "."] + [v + "s" for v in VERBS]))
    syllables = ["ka", "lo", "mi", "ru", "te", "so", "na", "vi", "po", "ze", "fu", "da"]
    out, used = {}, set()
    for w in words:
        while True:
            t = "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3)))
            if t not in used:
                used.add(t)
                out[w] = t
                break
    return out


LEX = _lexicon()


def noun_phrase(rng: random.Random, depth: int) -> tuple[list[str], list[str], bool]:
    """(source words, target words, plural?) -- target puts adjectives after the noun."""
    plural = rng.random() < 0.3
    det = rng.choice(["the", "some"]) if plural else rng.choice(DETS)
    adjs = rng.sample(ADJS, k=rng.choice([0, 0, 1, 2]))
    noun = rng.choice(NOUNS)
    src = [det, *adjs, noun + ("s" if plural else "")]
    tgt = [LEX[det], LEX[noun]] + ([LEX["s"]] if plural else []) + [LEX[a] for a in adjs]
    if depth < 2 and rng.random() < 0.25:
        p = rng.choice(PREPS)
        s2, t2, _ = noun_phrase(rng, depth + 1)
        src += [p, *s2]
        tgt += [LEX[p], *t2]
    if depth < 1 and rng.random() < 0.15:
        s3, t3 = verb_phrase(rng, plural, depth + 1)
        src += ["that", *s3]
        tgt += [LEX["that"], *t3]
    return src, tgt, plural


def verb_phrase(rng: random.Random, plural_subject: bool, depth: int) -> tuple[list[str], list[str]]:
    """Source: verb object (agreeing with the subject). Target: object verb (SOV)."""
    verb = rng.choice(VERBS)
    vs = verb if plural_subject else verb + "s"
    obj_s, obj_t, _ = noun_phrase(rng, depth + 1)
    return [vs, *obj_s], [*obj_t, LEX[vs]]


def sentence(rng: random.Random) -> tuple[str, str]:
    subj_s, subj_t, plural = noun_phrase(rng, 0)
    vp_s, vp_t = verb_phrase(rng, plural, 0)
    src, tgt = subj_s + vp_s, subj_t + vp_t
    if rng.random() < 0.2:
        s2, t2, pl2 = noun_phrase(rng, 1)
        v2s, v2t = verb_phrase(rng, pl2, 1)
        src += ["and", *s2, *v2s]
        tgt += [LEX["and"], *t2, *v2t]
    return " ".join(src + ["."]), " ".join(tgt + [LEX["."]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=20000, help="training sentences (valid/test: 1000 each)")
    ap.add_argument("--valid", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    (args.out / "lm").mkdir(parents=True, exist_ok=True)
    (args.out / "mt").mkdir(parents=True, exist_ok=True)
    for split, n in [("train", args.train), ("valid", args.valid), ("test", args.valid)]:
        pairs = [sentence(rng) for _ in range(n)]
        (args.out / "lm" / f"{split}.txt").write_text("".join(s + "\n" for s, _ in pairs))
        (args.out / "mt" / f"{split}.en").write_text("".join(s + "\n" for s, _ in pairs))
        (args.out / "mt" / f"{split}.xx").write_text("".join(t + "\n" for _, t in pairs))
    print(f"wrote {args.out}/lm and {args.out}/mt ({args.train} train sentences)")


if __name__ == "__main__":
    main()
