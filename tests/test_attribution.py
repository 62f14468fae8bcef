"""Per-concept attribution in the theorems' regime: every margin split exactly over the training concepts."""

import numpy as np
import pandas as pd
import pytest
import torch

from dpogen import attribution as A
from dpogen import theory as T
from tests.test_regimes import dpo_cfg, train_run

EXACT = dict(regime="last_layer", optimizer="sgd", lr=0.1, beta=0.5, batch_size="full", steps=12, eval_every=4,
             max_grad_norm=None, weight_decay=0.0, append_eos=False, dtype="float64")


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, tiny_model_dir, spec):
    tmp = tmp_path_factory.mktemp("att")
    cfg = dpo_cfg(**EXACT)
    train, test, m = train_run(tmp, tiny_model_dir, spec, cfg, k=3, q=6)
    return {"cfg": cfg, "margins": m, "ref": pd.read_parquet(tmp / "ref.parquet"), "g": np.load(tmp / "feat.npy")}


def test_contributions_sum_to_every_measured_margin(exact_run):
    att, inter = A.attribution(exact_run["g"], exact_run["ref"], exact_run["margins"], exact_run["cfg"])
    assert att["method"].eq(A.METHOD_EXACT).all()
    total = att.groupby(["step", "sample_id"])["contribution"].sum()
    measured = exact_run["margins"].set_index(["step", "sample_id"])["margin"].loc[total.index]
    assert np.abs(total - measured).max() <= 1e-9 * max(1.0, np.abs(measured).max())
    assert set(att["train_cluster"]) == {1, -1} and att["train_concept"].nunique() == 3
    # the interference matrix: K × K per checkpoint, each held-out concept's shares summing to one
    last = inter[inter["step"] == inter["step"].max()]
    assert len(last) == 9 and last["share"].abs().groupby(last["concept"]).sum().to_numpy() == pytest.approx(np.ones(3))
    share = A.cross_concept_share(inter)
    assert share.index.tolist() == sorted(inter["step"].unique()) and 0 < share.loc[share.index.max()] < 1
    one = inter[inter["train_concept"] == inter["concept"]]  # as if K were 1: nothing from other concepts
    assert (A.cross_concept_share(one).fillna(0) == 0).all()


def test_one_step_without_a_concept_changes_margins_by_its_contribution(exact_run):
    """Autograd on the DPO loss of a softmax head over g(x), one sgd step from the start with concept c's
    pairs weighted 0 (still divided by N): each margin moves by its full-data step minus c's contribution."""
    ref, g, cfg, m = exact_run["ref"], torch.tensor(exact_run["g"]), exact_run["cfg"], exact_run["margins"]
    tr = torch.tensor((ref["split"] == "train").to_numpy())
    w, lo = torch.tensor(ref["token_chosen"].to_numpy()), torch.tensor(ref["token_rejected"].to_numpy())
    concept = m[m["step"] == 0].set_index("sample_id").loc[ref["sample_id"], "concept"].to_numpy()
    W0 = torch.randn(int(max(w.max(), lo.max())) + 1, g.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    beta, lr = cfg["beta"], cfg["lr"]

    def margins(W):
        lp, lp0 = torch.log_softmax(g @ W.T, -1), torch.log_softmax(g @ W0.T, -1)
        idx = torch.arange(len(g))
        return beta * ((lp[idx, w] - lp0[idx, w]) - (lp[idx, lo] - lp0[idx, lo]))

    def one_step(weight):
        W = W0.clone().requires_grad_(True)
        r = margins(W)
        loss = (weight * -torch.nn.functional.logsigmoid(r[tr])).sum() / int(tr.sum())
        loss.backward()
        with torch.no_grad():
            return margins(W - lr * W.grad).numpy()

    m0 = m[m["step"] == 0]
    att, _ = A.attribution(exact_run["g"], ref, pd.concat([m0, m0.assign(step=1)]), {**cfg, "steps": 1})
    c1 = att[att["step"] == 1]
    full = one_step(torch.ones(int(tr.sum()), dtype=torch.float64))
    for c in sorted(set(concept)):
        keep = torch.tensor(concept[tr.numpy()] != c, dtype=torch.float64)
        without = one_step(keep)
        part = c1[c1["train_concept"] == c].groupby("sample_id", sort=False)["contribution"].sum()
        np.testing.assert_allclose(full - without, part.loc[ref["sample_id"]].to_numpy(), rtol=1e-9, atol=1e-12)


def test_outside_the_regime_the_tables_say_why():
    cfg = dpo_cfg(optimizer="adam")
    ref = pd.DataFrame({"token_chosen": [5], "token_rejected": [7]})
    reason = T.attribution_reason(ref, cfg, pd.DataFrame({"step": [0], "split": ["train"], "concept": ["c"],
                                                          "cluster": [1]}))
    assert reason.startswith("not computed: outside the theorems' regime")
    att, inter = A.attribution(None, None, None, cfg, reason)
    assert att["method"].iloc[0] == reason and inter["method"].iloc[0] == reason and inter["share"].isna().all()
