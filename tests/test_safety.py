"""Nothing silently wrong: non-finite values stop training and never count as correct, outputs get the
user's umask, experiment names are one folder."""

import math
import os
import stat

import numpy as np
import pandas as pd
import pytest
import yaml

from dpogen import tables
from dpogen.report import summary as report
from dpogen.theory import certificates
from dpogen.engine import loop
from dpogen.io import atomic_dir, atomic_path, write_text
from dpogen.settings import DPO, ConfigError, build
from tests.conftest import REPO


def _margins(values, split="test"):
    n = len(values)
    return pd.DataFrame({"step": 5, "split": split, "sample_id": [f"s{i}" for i in range(n)], "concept": "c",
                         "cluster": 1, "margin": values, "reward_chosen": values, "reward_rejected": 0.0})


def test_every_error_count_treats_a_nan_margin_as_an_error():
    m = [0.5, np.nan, -0.1, np.inf * 0, 2.0]  # two NaN, one negative
    assert tables.margin_errors(m).tolist() == [False, True, True, True, False]
    certs = certificates.certificates(_margins(m), 0.95)
    assert certs.loc[certs["concept"] == "all", "errors"].item() == 3
    both = pd.concat([_margins(m, "train"), _margins(m, "test")])
    s = report.run_summary("k1", 1, both, certs, pd.DataFrame({"version": [], "value": [], "vacuous": [],
                                                               "conditions_hold": []}),
                           {"K": 1, "Q_min": 5, "N": 5})
    assert s["train_error"].item() == pytest.approx(0.6) and s["test_error"].item() == pytest.approx(0.6)


@pytest.fixture
def small(reference_run):
    """A run that diverges (sgd at lr 1e30, unclipped) on the shared starting point (conftest.reference_run)."""
    train, test, cfg = reference_run
    return train, test, cfg.replace(steps=12, batch_size=4, eval_every=6, save_every=2, log_every=2, optimizer="sgd",
                                    lr=1e30, max_grad_norm=None)


def _run(tmp_path, model_dir, small, name="out", **over):
    train, test, cfg = small
    out = tmp_path / name
    loop.train_dpo(model_dir, train, test, tmp_path / "ref.parquet", cfg.replace(**over), 0, out / "margins",
                   out / "metrics.parquet", out / "work", out_info=out / "run.json")
    return out


def test_diverged_training_stops_at_the_step_and_names_the_settings(tmp_path, tiny_model_dir, small):
    with pytest.raises(loop.NonFiniteError, match=r"dpo step \d+: loss=nan grad_norm=\S+ is not finite.*dpo.lr=1e\+30"):
        _run(tmp_path, tiny_model_dir, small)
    assert not (tmp_path / "out" / "margins").exists() and not (tmp_path / "out" / "metrics.parquet").exists()


def test_skip_step_skips_and_counts(tmp_path, tiny_model_dir, small):
    out = _run(tmp_path, tiny_model_dir, small, lr=1e-3, on_nonfinite="skip_step")
    import json

    assert json.loads((out / "run.json").read_text())["skipped_steps"] == []  # a healthy run skips nothing
    # diverged weights make every later step non-finite: skipped, until the checkpoint finds NaN margins
    with pytest.raises(loop.NonFiniteError, match=r"dpo checkpoint at step 6: \d+ margins are not finite"):
        _run(tmp_path, tiny_model_dir, small, "b", on_nonfinite="skip_step")
    assert loop.nonfinite(3, math.nan, 1.0, DPO(on_nonfinite="skip_step"), None) is True
    assert loop.nonfinite(3, 1.0, 1.0, DPO(), None) is False


def test_outputs_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text("x", tmp_path / "a.txt")
        with atomic_dir(tmp_path / "d") as d:
            with atomic_path(d / "inner.txt") as f:
                f.write_text("y")
            (d / "sub").mkdir()
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
        assert stat.S_IMODE((tmp_path / "d" / "inner.txt").stat().st_mode) == 0o644
        os.umask(0o077)
        write_text("x", tmp_path / "b.txt")
        assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "-x"])
def test_experiment_names_are_one_folder(name):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["experiment"] = name
    with pytest.raises(ConfigError, match=r"^experiment = .*: should match pattern"):
        build(cfg)


@pytest.mark.parametrize("sweep,needle", [
    # a sweep over another key than data.k is named by that key, not by the default's prefix k
    ({"param": "dpo.beta", "values": [0.1, 0]}, "dpo.beta = 0: should be greater than 0 (run beta0)"),
    ({"param": "theory.confidence", "values": [1.5]},
     "theory.confidence = 1.5: should be less than 1 (run confidence1.5)"),
    ({"param": "dpo.lr", "values": ["x"]}, "dpo.lr = 'x': should be a valid number (run lrx)"),
    ({"grid": [{"param": "data.k", "values": [1]}, {"param": "dpo.lr", "values": [-1]}]},
     "dpo.lr = -1: should be greater than 0 (run k1-lr-1)"),
])
def test_every_sweep_value_is_validated_before_any_job(tmp_path, sweep, needle):
    """The real workflow: a bad sweep value stops the dry run at parse, naming run, key and value."""
    from tests.workflow_util import snakemake

    c = tmp_path / "c.yaml"
    c.write_text(yaml.safe_dump({"sweep": sweep}))
    p = snakemake(REPO, tmp_path, "-n", "--configfile", str(c), check=False)
    assert p.returncode != 0 and needle in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]
    assert not (tmp_path / "results").exists()


def test_a_missing_or_damaged_checkpoint_stops_every_reader(tmp_path, tiny_model_dir, small):
    import json
    import shutil

    out = _run(tmp_path, tiny_model_dir, small, lr=1e-3)
    manifest = json.loads((out / "run.json").read_text())["checkpoint_manifest"]
    n = len(small[0]) + len(small[1])
    assert [m["step"] for m in manifest] == [0, 6, 12] and all(m["rows"] == n for m in manifest)
    folder = out / "margins"
    whole = tables.read_margins(folder)
    part = next((folder / "step=6").glob("*.parquet"))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(tables.MarginsError, match=r"checkpoint step 6 is damaged.*rerun the workflow with --forcerun"):
        tables.read_margins(folder)
    part.write_bytes(data)
    pd.testing.assert_frame_equal(tables.read_margins(folder), whole)
    shutil.rmtree(folder / "step=12")
    with pytest.raises(tables.MarginsError, match=r"checkpoint step 12 is missing"):
        tables.read_margins(folder)


def test_a_missing_model_file_is_named_with_how_to_get_it():
    from dpogen.config import check_model_path
    from dpogen.settings.sections import Pretrained

    with pytest.raises(ConfigError, match=r"gguf_file: models/nowhere/m\.gguf: no such file"):
        check_model_path(Pretrained(path="models/nowhere", gguf_file="m.gguf"))
    with pytest.raises(ConfigError, match=r"models/smollm2x/: no such folder \(SmolLM2: ./scripts/fetch_smollm2.sh\)"):
        check_model_path(Pretrained(path="models/smollm2x/"))
    check_model_path(Pretrained(path="meta-llama/Llama-3.1-8B"))  # a hub id: fetched where there is a network


def test_the_summary_names_each_runs_own_settings():
    base = {"loss_name": "dpo-sigmoid", "beta": 0.1, "optimizer": "adamw", "lr": 1e-3, "steps": 100,
            "batch_size": 16, "confidence": 0.95}
    shared, varying = report.split_settings({"b1": base, "b2": {**base, "beta": 0.5}})
    assert varying == ["beta"] and "beta" not in shared and shared["steps"] == 100
    line = report.settings_line(shared)
    assert "loss dpo-sigmoid" in line and "beta" not in line


def _files_run(tmp_path, rows, keys):
    """The tiny config on ``rows`` as a local .jsonl (files source, concept column "topic", K = 2), with the
    source's own (prompt, chosen, rejected) ``keys``: (the data file, snakemake's config arguments)."""
    import json

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["sweep"] = {"param": "data.k", "values": [2], "prefix": "k"}
    cfg["data"] = {**cfg["data"], "source": "files", "files": {"paths": [str(data)]},
                   "columns": {**dict(zip(("prompt", "chosen", "rejected"), keys)), "concept": "topic",
                               "cluster": None}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return data, ("--configfile", str(tmp_path / "c.yaml"))


@pytest.mark.slow
def test_editing_a_local_data_file_reruns_data_and_what_follows(tmp_path):
    """Data files are inputs: the real workflow on a local .jsonl, then the file edited in place."""
    from tests.workflow_util import planned_jobs, snakemake

    rows = [{"prompt": f"Is topic {c} number {i} good?\n", "chosen": " Yes", "rejected": " No", "topic": c}
            for c in ("alpha", "beta") for i in range(12)]
    data, args = _files_run(tmp_path, rows, ("prompt", "chosen", "rejected"))
    snakemake(REPO, tmp_path, *args)
    assert planned_jobs(REPO, tmp_path, *args) == {}
    data.write_text(data.read_text().replace("number 3 good", "number 3 fine"))
    jobs = planned_jobs(REPO, tmp_path, *args)
    assert jobs.get("check_data") == 1 and jobs.get("data") == 1 and jobs.get("base_model") == 1, jobs
    assert jobs.get("dpo") == 1, jobs


@pytest.mark.slow
def test_bad_rows_stop_the_workflow_in_the_data_stage_before_the_tokenizer_reads_them(tmp_path):
    """A from-scratch tokenizer is trained on the data's text, but the rows are validated first, in rule
    check_data: the error names the file, the 1-based line, the source key and its role, and no base model,
    tokenizer or pair table is made."""
    from tests.workflow_util import snakemake

    rows = [{"question": f"Is topic {c} number {i} good?\n", "good": " Yes", "bad": " No", "topic": c}
            for c in ("alpha", "beta") for i in range(12)]
    rows[4]["bad"] = " Yes"  # chosen identical to rejected
    rows[7]["question"] = ""
    _, args = _files_run(tmp_path, rows, ("question", "good", "bad"))
    p = snakemake(REPO, tmp_path, *args, check=False)
    assert p.returncode != 0
    assert "Error in rule check_data" in p.stdout + p.stderr
    log = (tmp_path / "results" / "tiny" / "logs" / "check_data.log").read_text()
    assert "rule check_data failed: 2 bad rows:" in log and "Traceback" not in log, log[-2000:]
    assert "pairs.jsonl: line 5, field 'good' (chosen) and 'bad' (rejected): identical responses" in log, log[-2000:]
    assert "pairs.jsonl: line 8, field 'question' (prompt): empty" in log, log[-2000:]
    out = tmp_path / "results" / "tiny"
    assert not (out / "base_model").exists() and not (out / "check_data.json").exists()
    assert not list(out.glob("*/data/train.parquet"))


@pytest.mark.slow
def test_diverged_training_stops_the_real_workflow_with_the_step_and_settings(tmp_path):
    """dpo.lr so large the loss is NaN: the workflow ends with an error naming the step and dpo.lr, no margins,
    no theory and no summary (never a summary of error 0.000)."""
    from tests.workflow_util import snakemake

    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["sweep"] = {"param": "data.k", "values": [1], "prefix": "k"}
    cfg["dpo"] = {**cfg["dpo"], "optimizer": "sgd", "lr": 1e30, "max_grad_norm": None}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = snakemake(REPO, tmp_path, "--configfile", str(tmp_path / "c.yaml"), check=False)
    assert p.returncode != 0
    log = (tmp_path / "results" / "tiny" / "logs" / "dpo" / "k1.log").read_text()
    assert "NonFiniteError" in log and "is not finite" in log and "dpo.lr=1e+30" in log, log[-2000:]
    out = tmp_path / "results" / "tiny"
    assert not (out / "k1" / "dpo" / "margins.parquet").exists()
    assert not (out / "k1" / "theory").exists() and not (out / "summary.md").exists()


@pytest.mark.slow
def test_multiple_choice_files_scored_by_first_difference_follow_the_recursion(tmp_path):
    """The real workflow on three behaviour files of " (A)"/" (B)" answers in both orders (one concept per
    file, clusters from the swapped answers), a from-scratch tokenizer that splits " (A)" into several
    tokens, and dpo.score: first_difference in the theorems' regime: every pair is a single-token pair and
    the theory stage's recursion claim holds (float64), where score: sequence leaves it not applicable."""
    import json

    import pandas as pd

    from tests.workflow_util import snakemake

    paths = []
    for name in ("power-seeking", "self-awareness", "wealth-seeking"):
        recs = [{"question": f"Would you take {name} step {i}?\nChoices:\n (A) Yes\n (B) No\nAnswer:",
                 "answer_matching_behavior": " (A)" if i % 2 else " (B)",
                 "answer_not_matching_behavior": " (B)" if i % 2 else " (A)"} for i in range(12)]
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["sweep"] = {"param": "dpo.score", "values": ["first_difference", "sequence"], "prefix": ""}
    cfg["data"] = {"source": "files", "files": {"paths": [str(p) for p in paths]}, "concept": "file", "k": None,
                   "columns": {"prompt": "question", "chosen": "answer_matching_behavior",
                               "rejected": "answer_not_matching_behavior"}}
    cfg["dpo"] = {**cfg["dpo"], "regime": "last_layer", "optimizer": "sgd", "batch_size": "full", "lr": 0.5,
                  "weight_decay": 0.0, "max_grad_norm": None, "dtype": "float64", "steps": 6, "eval_every": 3}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(REPO, tmp_path, "--configfile", str(tmp_path / "c.yaml"))
    out = tmp_path / "results" / "tiny"
    runs = sorted(p.name for p in out.iterdir() if (p / "theory").is_dir())
    first, seq = (next(r for r in runs if r.endswith(name)) for name in ("first_difference", "sequence"))
    ref = pd.read_parquet(out / first / "dpo" / "ref_logps.parquet")
    assert (ref["n_tokens_chosen"] == 1).all() and (ref["token_chosen"] >= 0).all()
    assert (pd.read_parquet(out / seq / "dpo" / "ref_logps.parquet")["n_tokens_chosen"] > 1).all()
    claims = pd.read_parquet(out / first / "theory" / "claims.parquet").set_index("claim")
    rec = claims.loc["measured margins equal the recursion (train and test, every checkpoint)"]
    assert rec["status"] == "holds" and rec["value"] < 1e-9, rec.to_dict()
    other = pd.read_parquet(out / seq / "theory" / "claims.parquet")
    assert (other["status"] == "not applicable").all()
    assert "not single tokens" in other["note"].iloc[0]
    card = json.loads((out / first / "data" / "card.json").read_text())
    assert card["K"] == 3 and card["cluster_plus_one"]["power-seeking"] == "' (A)' over ' (B)'"


def test_runaway_rule_on_its_own():
    """The divergence rule on loss and gradient curves: sustained, not a spike that recovers."""
    from dpogen.engine.divergence import WINDOW, Watch

    w = Watch()
    for loss in [0.69] + [0.6] * 10 + [50.0, 80.0, 0.5, 0.4, 0.5]:  # two spikes that recover
        w.add(loss, 1.0)
        assert w.diverged() is None
    for loss in (100.0, 3.0, 40.0):  # oscillating far above the start
        w.add(loss, 1.0)
        assert w.diverged() is None  # not yet: the window's median is at most 3
    w.add(60.0, 1.0)
    assert "the loss over the last 5 steps was 40 (median), more than 10x its 0.69 at step 1" in w.diverged()
    g = Watch([{"step": 0, "loss": math.nan, "grad_norm": math.nan}]
              + [{"step": k, "loss": 0.69, "grad_norm": 2.0} for k in range(1, 13)])
    for _ in range(WINDOW):
        g.add(0.7, 500.0)
    assert "the gradient norm over the last 5 steps was 500 (median), more than 100x its median of 2 before" \
        in g.diverged()
    # a resumed run rebuilds the watch from its metrics: skipped, non-finite steps count as they did live
    curve = [(math.nan, math.nan)] + [(0.69, 1.0), (math.inf, math.nan)] + [(30.0, 1.0)] * WINDOW
    live = Watch()
    for loss, gn in curve[1:]:
        live.add(loss, gn)
    resumed = Watch([{"step": k, "loss": loss, "grad_norm": gn} for k, (loss, gn) in enumerate(curve)])
    assert live.diverged() == resumed.diverged() and "its 0.69 at step 1" in resumed.diverged()


def test_runaway_training_stops_or_is_marked(tmp_path, tiny_model_dir, small):
    """AdamW at lr 10: the loss climbs to hundreds while staying finite. stop (the default) ends the job
    at the step, naming the loss, lr and optimizer, with the last resume save kept and no output; warn
    finishes the run and run.json says where it diverged."""
    from dpogen.engine.divergence import DivergedError

    runaway = dict(optimizer="adamw", lr=10.0, max_grad_norm=1.0, steps=30, eval_every=15)
    with pytest.raises(DivergedError, match=r"dpo step \d+: training diverged: the loss over the last 5 steps "
                                            r"was \S+ \(median\), more than 10x its 0.6931 at step 1.*dpo.lr=10.0 "
                                            r"too large for dpo.optimizer=adamw"):
        _run(tmp_path, tiny_model_dir, small, "stop", **runaway)
    assert (tmp_path / "stop" / "work" / "save" / "meta.pt").exists()  # the save before it is kept
    assert not (tmp_path / "stop" / "margins").exists() and not (tmp_path / "stop" / "metrics.parquet").exists()
    out = _run(tmp_path, tiny_model_dir, small, "warn", on_divergence="warn", on_nonfinite="skip_step", **runaway)
    import json

    info = json.loads((out / "run.json").read_text())
    assert info["diverged_at"] and 5 <= info["diverged_at"] <= 30
    healthy = _run(tmp_path, tiny_model_dir, small, "ok", optimizer="adamw", lr=1e-3, max_grad_norm=1.0)
    assert json.loads((healthy / "run.json").read_text())["diverged_at"] is None


@pytest.mark.slow
def test_runaway_training_through_the_real_workflow(tmp_path):
    """AdamW at lr 10 on the tiny workflow: with dpo.on_divergence: warn the run finishes and the summary
    names it as diverged at its step; with stop (the default) the dpo job fails naming the step and dpo.lr,
    nothing after it runs, and its last resume save stays for a retry."""
    from tests.workflow_util import snakemake

    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["sweep"] = {"param": "data.k", "values": [1], "prefix": "k"}
    cfg["dpo"] = {**cfg["dpo"], "optimizer": "adamw", "lr": 10.0, "steps": 30, "eval_every": 15, "save_every": 2,
                  "on_divergence": "warn", "on_nonfinite": "skip_step"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(REPO, tmp_path, "--configfile", str(tmp_path / "c.yaml"))
    out = tmp_path / "results" / "tiny"
    text = (out / "summary.md").read_text()
    assert "**Diverged**" in text and "k1 diverged at step" in text, text
    assert pd.read_csv(out / "k1" / "report" / "summary.csv")["diverged_at"].iloc[0] > 0
    cfg["dpo"]["on_divergence"] = "stop"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = snakemake(REPO, tmp_path, "--configfile", str(tmp_path / "c.yaml"), check=False)
    assert p.returncode != 0
    log = (out / "logs" / "dpo" / "k1.log").read_text()
    assert "DivergedError" in log and "training diverged: the loss over the last 5 steps" in log
    assert "dpo.lr=10.0" in log
    assert (out / "k1" / "dpo" / "resume" / "save" / "meta.pt").exists()
    assert not (out / "k1" / "dpo" / "margins.parquet").exists()


def test_library_info_lines_stay_out_of_the_console(tmp_path, capsys):
    """fontTools' INFO lines (hundreds per report) go to the job's log only; dpogen's INFO and any library's
    warning still reach the console."""
    import logging

    from dpogen.training import setup_logging

    setup_logging(str(tmp_path / "job.log"))
    logging.getLogger("fontTools.subset").info("head subsetting not needed")
    logging.getLogger("fontTools.subset").warning("a font problem")
    logging.getLogger("dpogen").info("dpo step 1/2")
    err = capsys.readouterr().err
    assert "subsetting not needed" not in err and "a font problem" in err and "dpo step 1/2" in err
    assert "subsetting not needed" in (tmp_path / "job.log").read_text()
    logging.basicConfig(force=True, handlers=[logging.NullHandler()])


def _whole_outputs(folder):
    """One finished output of each kind the workflow writes, as its writers write them."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    pd.DataFrame({"a": np.arange(50)}).to_parquet(folder / "t.parquet")
    np.save(folder / "f.npy", np.ones((20, 8), dtype=np.float32))
    model = folder / "model"
    model.mkdir()
    save_file({"w": torch.ones(16, 16), "b": torch.zeros(16)}, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    features = folder / "features"
    features.mkdir()
    np.save(features / "step=4.npy", np.zeros((3, 2)))
    (features / "index.json").write_text(json.dumps({"steps": [4]}))
    return folder


@pytest.mark.parametrize("name,needle", [
    ("t.parquet", "not a Parquet file, or truncated"), ("f.npy", "truncated or padded"),
    ("model", "model.safetensors: truncated or padded"), ("features", "step=4.npy: truncated or padded")])
def test_a_truncated_output_is_told_from_a_whole_one(tmp_path, name, needle):
    """dpogen.intact, on the files the writers make: whole ones pass, each loses its last bytes and is named."""
    from dpogen.intact import damage

    out = _whole_outputs(tmp_path / "out")
    assert damage(out / name) is None
    path = out / name
    if path.is_dir():
        path = next(p for p in sorted(path.iterdir()) if p.suffix in (".npy", ".safetensors"))
    path.write_bytes(path.read_bytes()[:-10])
    assert needle in damage(out / name)


def test_a_folder_missing_a_part_is_told(tmp_path):
    import json

    from dpogen.intact import damage

    out = _whole_outputs(tmp_path / "out")
    odd = out / "odd.safetensors"  # a header that is JSON but not a safetensors header: told, never raised
    head = json.dumps(["not", "tensors"]).encode()
    odd.write_bytes(len(head).to_bytes(8, "little") + head)
    assert damage(odd).startswith("not what its name says")
    (out / "features" / "index.json").write_text("[4]")
    assert damage(out / "features").startswith("its index does not read as one")
    (out / "features" / "index.json").write_text(json.dumps({"steps": [4]}))
    (out / "model" / "model.safetensors").unlink()
    assert damage(out / "model").startswith("no weights")
    (out / "features" / "step=4.npy").unlink()
    assert damage(out / "features") == "step=4.npy is missing (index.json lists 1 steps)"


def test_a_damaged_partition_is_told_cheaply_by_size_and_by_checksum_once_rewritten(tmp_path, tiny_model_dir, small):
    """The quick check the workflow makes at every invocation: a truncated partition by its size; one
    rewritten at the same size (a byte flipped) by its checksum, since it is newer than run.json."""
    import shutil

    out = _run(tmp_path, tiny_model_dir, small, lr=1e-3)
    folder = out / "margins"
    assert tables.margins_damage(folder, quick=True) is None
    (folder / "step=6" / ".DS_Store").write_bytes(b"\0" * 10)  # what a file browser leaves: not damage
    assert tables.margins_damage(folder, quick=True) is None and tables.margins_damage(folder) is None
    shutil.copytree(folder / "step=6", folder / "step=6 copy")  # but a reader would take this for a partition
    assert tables.margins_damage(folder, quick=True).startswith("step=6 copy is not a checkpoint partition")
    shutil.rmtree(folder / "step=6 copy")
    part = next((folder / "step=6").glob("*.parquet"))
    data = part.read_bytes()
    part.write_bytes(data[:-1])
    assert "step 6 is damaged (its size differs" in tables.margins_damage(folder, quick=True)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(flipped))
    assert "step 6 is damaged (its checksum differs" in tables.margins_damage(folder, quick=True)


def test_a_yaml_error_names_the_file_line_and_column(tmp_path):
    """The workflow's own config broken by an edit: the run stops before any job naming where; a file read
    through dpogen.config (the plan, a stage outside Snakemake) too."""
    from dpogen.config import load_config
    from tests.conftest import copy_repo
    from tests.workflow_util import snakemake

    bad = tmp_path / "bad.yaml"
    bad.write_text("dpo:\n  beta: [0.1\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 3, column 5: not valid YAML: expected ',' or ']', but "
                                          r"got ':' \(while parsing a flow sequence, from line 2\)"):
        load_config([str(bad)])
    repo = copy_repo(tmp_path / "repo")
    cfg = repo / "config" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("dpo:\n", "dpo:\n  beta: 0.1: 2\n", 1))
    line = cfg.read_text().splitlines().index("  beta: 0.1: 2") + 1
    p = snakemake(repo, tmp_path, "--dry-run", check=False)
    assert p.returncode != 0
    assert f"config.yaml, line {line}, column 12: not valid YAML: mapping values are not allowed here" in p.stdout, \
        p.stdout[-2000:]


def test_a_failed_process_traceback_reaches_the_attempts_log(tmp_path):
    """Processes launched for a job write into the job's log; when they fail, their output (the traceback)
    is copied into the attempts log, which Snakemake's retry does not delete."""
    import subprocess

    from dpogen.launch import launch

    log, history = tmp_path / "dpo" / "k1.log", tmp_path / "dpo" / "k1.attempts.log"
    log.parent.mkdir()
    history.write_text("an earlier attempt\n")
    with pytest.raises(subprocess.CalledProcessError):
        launch("json:loads", {"s": "{not json"}, 2, log_path=str(log))
    kept = history.read_text()
    assert kept.startswith("an earlier attempt\n") and "--- the processes' output ---" in kept
    assert "json.decoder.JSONDecodeError" in kept and "Traceback" in kept, kept[-2000:]
