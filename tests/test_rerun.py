"""What an edit to the library reruns, for every module of src/dpogen: a comment or a docstring nothing; a
change to the code the rules whose scripts import the module (directly or through the package) and what
follows them. The expected rules come from this file's own reading of the imports and the rules."""

import ast
import contextlib
import functools
import re

import pytest
import yaml

from tests.conftest import REPO, copy_repo
from tests.workflow_util import planned_jobs, snakemake

# about 4 minutes on 2 cores: 45 dry runs of ~4 s (the Snakefile imports torch through dpogen.config)
pytestmark = pytest.mark.slow

PKG = REPO / "src" / "dpogen"
MODULES = sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py"))


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    """One finished run (k2) of the tiny config in a copy of the workflow, and its rule graph."""
    root = tmp_path_factory.mktemp("rerun")
    repo = copy_repo(root / "repo")
    work = root / "work"
    work.mkdir()
    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["sweep"] = {"param": "data.k", "values": [2], "prefix": "k"}
    (work / "one.yaml").write_text(yaml.safe_dump(cfg))
    args = ("--configfile", str(work / "one.yaml"))
    snakemake(repo, work, *args)
    assert planned_jobs(repo, work, *args) == {}
    dot = snakemake(repo, work, "--rulegraph", *args).stdout
    names = dict(re.findall(r"^\s*(\d+)\[label = \"(\w+)\"", dot, re.M))
    edges = [(names[a], names[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)]
    return {"repo": repo, "work": work, "plan": lambda *more: planned_jobs(repo, work, *args, *more),
            "rules": set(names.values()), "edges": edges}


@functools.cache
def rule_scripts() -> dict[str, str]:
    """Rule → its script in workflow_scripts/, from rules/*.smk."""
    out = {}
    for smk in (REPO / "rules").glob("*.smk"):
        for block in re.split(r"^(?=rule )", smk.read_text(), flags=re.M)[1:]:
            name = re.match(r"rule (\w+):", block).group(1)
            out[name] = re.search(r'script:\s*"\.\./workflow_scripts/([\w.]+)"', block).group(1)
    return out


def dotted(path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {dotted(p): p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")}


def imported(path, in_package: bool) -> set[str]:
    """The modules of dpogen one file imports (anywhere in it), with the packages above them."""
    here = dotted(path).split(".") if in_package else []
    if in_package and path.name != "__init__.py":
        here = here[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level and not in_package:
                continue
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    prefixes = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}
    return {FILES[n] for n in prefixes if n in FILES}


@functools.cache
def runs(script) -> frozenset[str]:
    """Every module of dpogen a workflow script runs."""
    todo, seen = list(imported(REPO / "workflow_scripts" / script, False)), set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imported(PKG / m, True)
    return frozenset(seen)


def expected(wf, module) -> dict[str, int]:
    """The rules that run ``module`` and every rule after them; one job each (one run). The settings package
    is in no code hash: what a setting does travels in the rule params (checked below by value changes)."""
    if module.startswith("settings/"):
        return {}
    return _downstream(wf, {rule for rule, script in rule_scripts().items() if module in runs(script)} & wf["rules"])


@contextlib.contextmanager
def edited(path, new_text):
    """The file rewritten by ``new_text`` for the duration, then restored byte for byte."""
    old = path.read_bytes()
    path.write_text(new_text(old.decode()))
    try:
        yield
    finally:
        path.write_bytes(old)


def docstring_changed(text: str) -> str:
    """The module's docstring (and the first function's or class's) with words added, or a new one."""
    tree = ast.parse(text)
    spots = [n.body[0].value for n in [tree, *(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
             if ast.get_docstring(n, clean=False) is not None][:2]
    lines = text.splitlines(keepends=True)
    for s in sorted(spots, key=lambda s: s.lineno, reverse=True):
        line = lines[s.lineno - 1]
        quote = re.match(r"[rRuU]?(\"\"\"|'''|\"|')", line[s.col_offset:]).end()
        at = s.col_offset + quote
        lines[s.lineno - 1] = line[:at] + "A probe of the docstring. " + line[at:]
    if ast.get_docstring(tree, clean=False) is None:
        lines.insert(0, '"""A probe docstring."""\n')
    return "".join(lines)


def test_comment_and_docstring_edit_reruns_nothing(wf):
    """A docstring and a comment edited in every module at once (one dry run: each module's hash is of its
    own syntax tree, so no module's edit can hide another's), and nothing reruns."""
    with contextlib.ExitStack() as stack:
        for module in MODULES:
            path = wf["repo"] / "src" / "dpogen" / module
            stack.enter_context(edited(path, lambda t: docstring_changed(t) + "\n# a probe comment\n"))
            assert ast.dump(ast.parse(path.read_text())) != ast.dump(ast.parse((PKG / module).read_text())), module
        assert wf["plan"]() == {}


@pytest.mark.parametrize("module", MODULES)
def test_body_edit_reruns_what_imports_it_and_what_follows(wf, module):
    path = wf["repo"] / "src" / "dpogen" / module
    with edited(path, lambda t: t + "\n\ndef _probe_edit():\n    return 1\n"):
        assert wf["plan"]() == expected(wf, module)


def test_every_rule_is_checked(wf):
    """The map from rules to scripts covers the rule graph (but `all`), and some edits rerun each rule."""
    assert set(rule_scripts()) >= wf["rules"] - {"all"}
    assert set().union(*(expected(wf, m) for m in MODULES)) == wf["rules"]


def _downstream(wf, rules) -> dict[str, int]:
    """``rules`` and every rule after them in the rule graph; one job each (one run)."""
    stale = set(rules)
    grew = True
    while grew:
        after = {b for a, b in wf["edges"] if a in stale}
        grew = not after <= stale
        stale |= after
    return {r: 1 for r in stale}


EXECUTION_CHANGES = [("dpo.log_every", 3), ("dpo.save_every", 7), ("sft.log_every", 3),
                     ("dpo.report_to", ["tensorboard"])]


def _changed(tmp_path, key, value) -> tuple[str]:
    section, name = key.split(".")
    f = tmp_path / "change.yaml"
    f.write_text(yaml.safe_dump({section: {name: value}}))
    return (str(f),)  # a second file after --configfile one.yaml: merged over it, key by key


@pytest.mark.parametrize("key,value", EXECUTION_CHANGES, ids=[k for k, _ in EXECUTION_CHANGES])
def test_execution_settings_schedule_nothing(wf, key, value, tmp_path):
    """Log and save intervals change how a job runs, never a value: nothing is scheduled."""
    from dpogen.settings import Settings

    section, name = key.split(".")
    assert Settings.model_fields[section].annotation.kind_of(name) == "execution"
    assert wf["plan"](*_changed(tmp_path, key, value)) == {}


VALUE_CHANGES = [("dpo.beta", "0.2", {"dpo"}), ("theory.confidence", "0.9", {"theory"}),
                 ("dpo.eval_batch_size", "7", {"ref_logps", "dpo"}),
                 ("threads.train", "2", {"sft", "ref_logps", "dpo"}),
                 ("dpo.max_tokens_per_batch", "64", {"dpo"}), ("dpo.logit_chunk", "5", {"sft", "ref_logps", "dpo"})]


@pytest.mark.parametrize("key,value,first", VALUE_CHANGES, ids=[k for k, _, _ in VALUE_CHANGES])
def test_value_settings_rerun_their_stage_and_what_follows(wf, key, value, first, tmp_path):
    """A setting that can change values, float order included, schedules the first stage it reaches and
    everything after it; nothing before."""
    assert wf["plan"](*_changed(tmp_path, key, yaml.safe_load(value))) == _downstream(wf, first)


def _rerun_on_code(tmp_path, setting) -> tuple[str]:
    f = tmp_path / "keep.yaml"
    f.write_text(yaml.safe_dump({"workflow": {"rerun_on_code": setting}}))
    return (str(f),)


def test_rerun_on_code_false_keeps_results_of_older_code_and_the_summary_names_them(wf, tmp_path):
    """workflow.rerun_on_code: false: a body edit schedules nothing; the summary, remade, marks the stages
    made with the older code. A list reruns only the rules it names (and what follows them)."""
    path = wf["repo"] / "src" / "dpogen" / "theory" / "dynamics.py"  # the theory stage and the report run it
    with edited(path, lambda t: t + "\n\ndef _probe_edit():\n    return 1\n"):
        assert wf["plan"]() == expected(wf, "theory/dynamics.py")
        keep = _rerun_on_code(tmp_path, False)
        assert wf["plan"](*keep) == {}
        (tmp_path / "list").mkdir()
        redraw = _rerun_on_code(tmp_path / "list", ["run_report", "summary"])
        assert wf["plan"](*redraw) == _downstream(wf, {"run_report"})
        snakemake(wf["repo"], wf["work"], "--configfile", str(wf["work"] / "one.yaml"), *keep,
                  "--forcerun", "summary")
        md = (wf["work"] / "results" / "tiny" / "summary.md").read_text()
    table = md[md.index("## Code each stage was made with"):]
    header, _, row = ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[4:7])
    cells = dict(zip(header, row))
    assert cells["run"] == "k2" and cells["theory"].endswith("*") and cells["run_report"].endswith("*"), table
    assert not cells["data"].endswith("*") and not cells["dpo"].endswith("*"), table
    assert wf["plan"]() == {}  # the code is back: nothing is stale


# ----------------------------------------------------------------- outputs a user deletes or damages


@pytest.fixture
def work(wf, tmp_path):
    """A copy of the finished run's work folder (results and Snakemake's records), to delete or damage in;
    its plan: rule → jobs of a dry run there."""
    import shutil

    copy = tmp_path / "work"
    shutil.copytree(wf["work"], copy, symlinks=True)
    args = ("--configfile", str(wf["work"] / "one.yaml"))
    return {"dir": copy, "run": copy / "results" / "tiny" / "k2", "args": args,
            "plan": lambda *more: planned_jobs(wf["repo"], copy, *args, *more)}


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _partition(run, step):
    return run / "dpo" / "margins.parquet" / f"step={step}"


DELETED = [  # what is deleted or damaged in run k2, the first rule that makes it again
    ("dpo/margins.parquet", "rm", "dpo"),
    ("dpo/margins.parquet/step=2", "rm", "dpo"),
    ("dpo/margins.parquet/step=2/part-0.parquet", "truncate", "dpo"),
    ("sft/model.safetensors", "rm", "sft"),
    ("theory/bounds.parquet", "rm", "theory"),
    ("report/dynamics.png", "rm", "run_report"),
    ("dpo/features/step=*.npy", "rm", "dpo"),
]


@pytest.mark.parametrize("path,how,rule", DELETED, ids=[f"{h} {p}" for p, h, _ in DELETED])
def test_a_deleted_or_damaged_output_is_rebuilt_with_what_depends_on_it(wf, work, path, how, rule):
    """Every output of every run is in the default target; a folder missing a part or holding a damaged one
    (checked against the dpo manifest, or for a model's weights) is remade as if deleted. Nothing else."""
    import shutil

    target = next(work["run"].glob(path), None)
    assert target is not None, path
    if how == "truncate":
        _truncate(target)
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    assert work["plan"]() == _downstream(wf, {rule})


def test_a_deleted_partition_is_rebuilt_bit_for_bit(wf, work):
    """The real rerun: the partition comes back with the checksum the manifest recorded, and then nothing is
    left to do."""
    import json
    import shutil

    from dpogen.tables import partition_digest

    manifest = json.loads((work["run"] / "dpo" / "run.json").read_text())["checkpoint_manifest"]
    step = manifest[1]["step"]
    shutil.rmtree(_partition(work["run"], step))
    p = snakemake(wf["repo"], work["dir"], *work["args"])
    assert "checkpoint step" in p.stderr and "is missing" in p.stderr, p.stderr[-3000:]
    assert partition_digest(_partition(work["run"], step)) == manifest[1]["sha256"]
    assert work["plan"]() == {}


def test_a_damaged_input_stops_the_run_before_any_output_is_touched(wf, work):
    """A truncated reference table is newer than the dpo outputs, so Snakemake schedules dpo; the run stops
    before any job, naming the file, the rule that makes it and the command, and dpo's outputs stay as they
    were. The command then plans that rule and what follows it."""
    from dpogen.tables import partition_digest

    ref = work["run"] / "dpo" / "ref_logps.parquet"
    dpo_files = [work["run"] / "dpo" / n for n in ("run.json", "metrics.parquet", "batch_margins.parquet")]
    before = {f: f.read_bytes() for f in dpo_files}
    parts = {q: partition_digest(q) for q in (work["run"] / "dpo" / "margins.parquet").glob("step=*")}
    _truncate(ref)
    assert work["plan"]().get("dpo") == 1
    p = snakemake(wf["repo"], work["dir"], *work["args"], check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    assert f"{ref.relative_to(work['dir'])} is damaged: not a Parquet file, or truncated" in text, text[-3000:]
    assert "rule ref_logps makes it" in text and "nothing was run" in text, text[-3000:]
    assert {f: f.read_bytes() for f in dpo_files} == before
    assert {q: partition_digest(q) for q in parts} == parts
    command = re.search(r"^ +snakemake --cores 2 (--configfile .*)$", text, re.M).group(1).split()
    assert command == [*work["args"], "--forcerun", str(ref.relative_to(work["dir"]))]
    assert planned_jobs(wf["repo"], work["dir"], *command) == _downstream(wf, {"ref_logps"})
