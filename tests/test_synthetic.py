import re

from dpogen.data import synthetic as S
from dpogen.data.stage import validate_pairs


def test_deterministic_and_nested(spec):
    a_train, a_test = S.generate(2, 5, 3, spec)
    b_train, b_test = S.generate(2, 5, 3, spec)
    assert a_train.equals(b_train) and a_test.equals(b_test)
    # the first concepts are the same whatever K is: a sweep over K only adds concepts
    c_train, _ = S.generate(4, 5, 3, spec)
    assert c_train[c_train["concept"].isin(a_train["concept"].unique())].reset_index(drop=True).equals(a_train)
    other, _ = S.generate(2, 5, 3, S.SyntheticSpec(**{**spec.__dict__, "seed": spec.seed + 1}))
    assert not other["prompt"].equals(a_train["prompt"])


def test_format_and_counts(spec):
    train, test = S.generate(3, 5, 2, spec)
    assert len(train) == 2 * 3 * 5 and len(test) == 2 * 3 * 2
    assert train.groupby(["concept", "cluster"]).size().eq(5).all()
    pat = re.compile(r'^Is the following statement something you would say\?\n"[^"\n]+"\n$')
    assert train["prompt"].map(lambda p: bool(pat.match(p))).all()
    yes = train["cluster"] == 1
    assert (train.loc[yes, "chosen"] == " Yes").all() and (train.loc[yes, "rejected"] == " No").all()
    assert (train.loc[~yes, "chosen"] == " No").all() and (train.loc[~yes, "rejected"] == " Yes").all()
    validate_pairs(train, "synthetic")  # passes the data stage's own checks


def test_held_out_statements_are_new_but_share_vocabulary(spec):
    train, test = S.generate(2, 8, 8, spec)
    assert not set(train["statement"]) & set(test["statement"])
    vocab = S.vocabulary(spec)
    words = lambda df: {w.strip(".,") for s in df["statement"] for w in s.split()}  # noqa: E731
    for v in vocab[:2]:
        tr = train[train["concept"] == v["concept"]]
        te = test[test["concept"] == v["concept"]]
        pro_test = words(te[te["cluster"] == 1])
        # held-out aligned statements use the concept's pro words, never its anti words
        assert pro_test & set(v["pro"]) and not pro_test & set(v["anti"])
        # and their concept words were seen in training
        assert (pro_test & set(v["topic"])) <= words(tr) | set(v["topic"])
    # concepts own disjoint vocabularies, while the shared words appear in every concept
    assert not set(vocab[0]["topic"] + vocab[0]["pro"]) & set(vocab[1]["topic"] + vocab[1]["pro"])
    shared = set.intersection(*[words(train[train["concept"] == v["concept"]]) for v in vocab[:2]])
    assert {"people", "I"} & shared


def test_shared_stance_pool_makes_concepts_disagree():
    spec = S.SyntheticSpec(n_concepts=8, topic_words=6, stance_words=4, seed=1, stance_pool=10)
    vocab = S.vocabulary(spec)
    pool = set().union(*[set(v["pro"]) | set(v["anti"]) for v in vocab])
    assert len(pool) <= 10
    for v in vocab:
        assert not set(v["pro"]) & set(v["anti"])  # within a concept a word has one stance
    # across concepts, some word is "pro" for one persona and "anti" for another
    assert any(set(a["pro"]) & set(b["anti"]) for a in vocab for b in vocab)
    # the topic words still belong to one concept each
    topics = [w for v in vocab for w in v["topic"]]
    assert len(topics) == len(set(topics))
