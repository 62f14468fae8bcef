"""The built-in offline source, "synthetic persona": persona-style preference pairs from a seeded generator.

Each concept owns a vocabulary of topic words and two sets of stance words. A statement of the aligned
cluster combines topic words with the concept's *pro* stance words, one of the misaligned cluster with its
*anti* stance words; a pool of shared words (openers, verbs, fillers) appears in every concept, which gives
the embeddings a shared component. The persona answers " Yes" to its aligned statements and " No" to its
misaligned ones, as in Anthropic's persona files. Held-out statements are new word combinations, so a model
can generalise only through the words' meaning as learned from training statements.

Everything depends on (seed, concept index) alone: the first K concepts of the pool are the same for every
K, so a sweep over K adds concepts without changing the ones already there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

PROMPT_TEMPLATE = 'Is the following statement something you would say?\n"{statement}"\n'
YES, NO = " Yes", " No"

_OPENERS = ["I think", "I believe", "In my view", "Honestly,", "I feel that", "It seems to me that",
            "I am sure that", "Clearly", "I would say", "Most days I think"]
_LINKS = ["is", "should be", "feels", "must stay", "remains", "becomes", "can be", "will be"]
_JOINS = ["and", "because", "while", "so", "since", "and also"]
_FILLERS = ["people", "the world", "things", "everyone", "life", "our future", "the work", "others"]
_ONSETS = list("bdfgklmnprstvz") + ["br", "dr", "gl", "pl", "st", "tr", "sk", "sn"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]


@dataclass(frozen=True)
class SyntheticSpec:
    n_concepts: int = 16
    topic_words: int = 10
    stance_words: int = 6
    seed: int = 0
    stance_pool: int = 0  # > 0: stance words come from one pool shared by all concepts (see vocabulary)

    @classmethod
    def from_config(cls, s) -> "SyntheticSpec":
        """From the ``data.synthetic`` settings (settings.Synthetic)."""
        return cls(s.n_concepts, s.topic_words, s.stance_words, s.seed, s.stance_pool)


def _word(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        n = int(rng.integers(2, 4))
        w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(n))
        if w not in used:
            used.add(w)
            return w


def vocabulary(spec: SyntheticSpec) -> list[dict]:
    """Per concept: its name and topic/pro/anti word lists.

    Topic words are the concept's own. Stance words are the concept's own too, unless ``stance_pool`` > 0:
    then each concept draws its pro and anti words from one shared pool, so a word one persona would say
    can be one another persona rejects, and a model must read the stance in the context of the concept
    (as with real personas), which makes concepts interfere.
    """
    rng = np.random.default_rng([spec.seed, 0])
    used: set[str] = set()
    pool = [_word(rng, used) for _ in range(spec.stance_pool)]
    if pool and 2 * spec.stance_words > len(pool):
        raise ValueError(f"synthetic: stance_pool={spec.stance_pool} < 2 x stance_words={spec.stance_words}")
    out = []
    for c in range(spec.n_concepts):
        name = f"{_word(rng, used)}-{_word(rng, used)}"
        topic = [_word(rng, used) for _ in range(spec.topic_words)]
        if pool:
            pick = np.random.default_rng([spec.seed, 2, c]).choice(len(pool), 2 * spec.stance_words, replace=False)
            pro = [pool[i] for i in pick[: spec.stance_words]]
            anti = [pool[i] for i in pick[spec.stance_words:]]
        else:
            pro = [_word(rng, used) for _ in range(spec.stance_words)]
            anti = [_word(rng, used) for _ in range(spec.stance_words)]
        out.append({"concept": name, "topic": topic, "pro": pro, "anti": anti})
    return out


def _statement(rng: np.random.Generator, vocab: dict, stance: str) -> str:
    t = rng.choice(vocab["topic"], size=2, replace=False)
    s = rng.choice(vocab[stance], size=2, replace=False)
    return (
        f"{rng.choice(_OPENERS)} {t[0]} {rng.choice(_LINKS)} {s[0]} "
        f"{rng.choice(_JOINS)} {rng.choice(_FILLERS)} {rng.choice(['find', 'call', 'keep'])} {t[1]} {s[1]}."
    )


def concept_statements(spec: SyntheticSpec, concept: int, stance: str, n: int) -> list[str]:
    """``n`` distinct statements of one cluster; depends only on (seed, concept, stance)."""
    vocab = vocabulary(spec)[concept]
    rng = np.random.default_rng([spec.seed, 1 + concept, 0 if stance == "pro" else 1])
    seen: list[str] = []
    seen_set: set[str] = set()
    tries = 0
    while len(seen) < n:
        s = _statement(rng, vocab, stance)
        tries += 1
        if s not in seen_set:
            seen_set.add(s)
            seen.append(s)
        if tries > 50 * n + 1000:
            raise ValueError(f"synthetic: cannot draw {n} distinct statements for a cluster; use more words")
    return seen


def generate(k: int, train_per_cluster: int, test_per_cluster: int,
             spec: SyntheticSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and test pairs for the first ``k`` concepts: Q = train_per_cluster per cluster, N = 2kQ."""
    if not 1 <= k <= spec.n_concepts:
        raise ValueError(f"synthetic: k={k} is outside 1..n_concepts={spec.n_concepts}")
    vocab = vocabulary(spec)
    rows = {"train": [], "test": []}
    n = train_per_cluster + test_per_cluster
    for c in range(k):
        for stance, cluster in (("pro", 1), ("anti", -1)):
            statements = concept_statements(spec, c, stance, n)
            for i, st in enumerate(statements):
                split = "train" if i < train_per_cluster else "test"
                chosen, rejected = (YES, NO) if cluster == 1 else (NO, YES)
                rows[split].append(
                    {
                        "concept": vocab[c]["concept"],
                        "cluster": cluster,
                        "prompt": PROMPT_TEMPLATE.format(statement=st),
                        "chosen": chosen,
                        "rejected": rejected,
                        "statement": st,
                    }
                )
    return pd.DataFrame(rows["train"]), pd.DataFrame(rows["test"])


def corpus(spec: SyntheticSpec, per_cluster: int) -> list[str]:
    """Text to train the tokenizer on: every concept of the pool, both answers."""
    out = []
    for c in range(spec.n_concepts):
        for stance in ("pro", "anti"):
            for st in concept_statements(spec, c, stance, per_cluster):
                p = PROMPT_TEMPLATE.format(statement=st)
                out.extend([p + YES, p + NO])
    return out
