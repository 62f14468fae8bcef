"""Code hashes: the modules a workflow script runs are found from its imports, and only code changes the hash."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dpogen.codehash import SCRIPTS, SRC, script_hash, script_modules
from tests.conftest import REPO

# a throwaway package: a subpackage, relative and lazy imports, a cycle (a <-> b), a module nobody imports
TOY = {
    "__init__.py": '''"""Toy package."""''',
    "a.py": '''
        """Module a."""
        from . import b


        def f():
            """Runs the loop."""
            from .engine import loop  # lazy, as the real package does

            return loop.run() + b.g()
    ''',
    "b.py": '''
        def g():
            from toy.a import f  # the cycle back to a

            return 1 if f else 0
    ''',
    "c.py": '''
        import toy.deep.sub.x as x


        class C:
            """A class."""

            value = x.X
    ''',
    "io.py": '''
        def atomic_path(p):
            return p
    ''',
    "unused.py": '''
        def nobody():
            return 0
    ''',
    "engine/__init__.py": '''
        from .state import State
    ''',
    "engine/state.py": '''
        from ..io import atomic_path


        class State:
            path = atomic_path("x")
    ''',
    "engine/loop.py": '''
        import toy.io
        from toy.engine import state


        def run():
            return len(toy.io.atomic_path(state.State.path))
    ''',
    "deep/__init__.py": "",
    "deep/sub/__init__.py": "",
    "deep/sub/x.py": "X = 1\n",
}
SCRIPT_A = '''
    import sys

    import numpy as np

    from toy.a import f

    print(f(), np, sys)
'''
SCRIPT_C = '''
    from toy import c, io
    from toy.io import atomic_path
'''


@pytest.fixture
def toy(tmp_path):
    root = tmp_path / "src" / "toy"
    for name, text in TOY.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip())
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "a.py").write_text(textwrap.dedent(SCRIPT_A))
    (scripts / "c.py").write_text(textwrap.dedent(SCRIPT_C))
    return root, scripts


def test_modules_follow_imports_through_the_package(toy):
    root, scripts = toy
    assert script_modules(scripts / "a.py", root) == [
        "__init__.py", "a.py", "b.py", "engine/__init__.py", "engine/loop.py", "engine/state.py", "io.py"]
    assert script_modules(scripts / "c.py", root) == [
        "__init__.py", "c.py", "deep/__init__.py", "deep/sub/__init__.py", "deep/sub/x.py", "io.py"]


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("module,old,new", [
    ("a.py", "# lazy, as the real package does", "# a different comment"),
    ("a.py", '"""Module a."""', '"""Module a, now documented at length.\n\nWith a second paragraph."""'),
    ("a.py", '"""Runs the loop."""', "'''Runs the loop, twice over.'''"),
    ("a.py", "from . import b\n", "\n\n# moved down\nfrom . import b  # b\n"),
    ("engine/state.py", "class State:\n", 'class State:\n    """A docstring where there was none."""\n\n'),
    ("__init__.py", '"""Toy package."""', '"""Toy package."""\n# a comment\n'),
])
def test_comments_and_docstrings_keep_the_hash(toy, module, old, new):
    root, scripts = toy
    before = script_hash(scripts / "a.py", root)
    _edit(root / module, old, new)
    assert script_hash(scripts / "a.py", root) == before


@pytest.mark.parametrize("module,old,new", [
    ("a.py", "+ b.g()", "- b.g()"),
    ("b.py", "1 if f else 0", "2 if f else 0"),
    ("engine/state.py", '"x"', '"y"'),
    ("engine/loop.py", "return len(", "return 1 + len("),
    ("__init__.py", '"""Toy package."""', '"""Toy package."""\nVERSION = 2\n'),
])
def test_a_body_edit_changes_the_hash_of_the_scripts_that_run_it(toy, module, old, new):
    root, scripts = toy
    a, c = script_hash(scripts / "a.py", root), script_hash(scripts / "c.py", root)
    _edit(root / module, old, new)
    assert script_hash(scripts / "a.py", root) != a
    assert (script_hash(scripts / "c.py", root) != c) == (module == "__init__.py")


def test_a_module_no_script_runs_changes_no_hash(toy):
    root, scripts = toy
    a, c = script_hash(scripts / "a.py", root), script_hash(scripts / "c.py", root)
    _edit(root / "unused.py", "return 0", "return 1")
    assert (script_hash(scripts / "a.py", root), script_hash(scripts / "c.py", root)) == (a, c)


def test_real_package_every_reached_module_is_found():
    reached = {m for s in SCRIPTS.glob("*.py") for m in script_modules(s)}
    everything = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")}
    # plan.py and inputs.py run in the Snakefile, not in a job (config.py in both: base_model reads the runs);
    # settings/__main__.py prints the schema, stage.py runs a stage outside Snakemake
    plan = {m for m in everything if m.startswith("plan/")}
    assert reached == everything - plan - {"data/inputs.py", "settings/__main__.py", "stage.py"}
    dpo = script_modules(SCRIPTS / "dpo.py")
    assert {"engine/loop.py", "engine/policy.py", "logprobs.py", "reference.py", "launch.py", "__init__.py",
            "engine/__init__.py"} <= set(dpo)
    assert not any(m.startswith("theory/") for m in dpo) and "sft.py" not in dpo
    summary = set(script_modules(SCRIPTS / "summary.py"))
    assert {"report/summary.py", "report/paper.py", "theory/bounds.py", "theory/dynamics.py",
            "engine/loss.py"} <= summary
    # the theory package imports nothing itself: the report does not follow the claims' or the bounds' code
    assert "theory/claims.py" not in summary and "theory/stage.py" not in summary
    assert {"theory/claims.py", "theory/stage.py", "theory/geometry.py"} <= set(script_modules(SCRIPTS / "theory.py"))
    # SFT runs before the reference pass: editing the reference pass never reruns SFT
    sft = script_modules(SCRIPTS / "sft.py")
    assert "reference.py" not in sft and "engine/loop.py" not in sft
    assert {"sft.py", "parallel.py", "logprobs.py"} <= set(sft)


def test_hashing_imports_neither_torch_nor_transformers():
    code = ("import sys; from dpogen.codehash import SCRIPTS, stage_hash; "
            "[stage_hash(s.name) for s in SCRIPTS.glob('*.py')]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'numpy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout
    assert out.strip() == "[]"


def test_rerun_on_code_false_keeps_the_recorded_code_param(tmp_path):
    """The code param: the current hash where there is no record or the record shows older code; the recorded
    param where the record shows the current code (nothing is stale) or where workflow.rerun_on_code (false,
    or a list without the rule) keeps older results."""
    from types import SimpleNamespace

    from dpogen.codehash import code_param, code_versions, record_path, stage_hash

    current, wc = stage_hash("theory.py"), SimpleNamespace(run="k2")
    path = record_path(tmp_path, "theory", "k2")
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(param, code):
        path.write_text(json.dumps({"param": param, "code": code}))

    for setting, keeps in ((True, False), (["theory"], False), (False, True), (["run_report", "summary"], True)):
        param = code_param(setting, tmp_path, "theory")
        path.unlink(missing_ok=True)
        assert param(wc) == current  # no record yet
        record("0123456789abcdef", "0123456789abcdef")  # made by older code
        assert param(wc) == ("0123456789abcdef" if keeps else current)
        record("0123456789abcdef", current)  # scheduled with an old param, but ran the current code
        assert param(wc) == "0123456789abcdef"
        path.write_text("{not json")  # a damaged record: the current code counts, never a crash
        assert param(wc) == current
    record_path(tmp_path, "dpo", "k2").parent.mkdir(parents=True)
    record_path(tmp_path, "dpo", "k2").write_text(json.dumps({"param": "x", "code": "old"}))
    rows = {r["rule"]: r for r in code_versions(tmp_path, ["k2"], rules=("dpo", "theory"))}
    assert rows["dpo"] == {"run": "k2", "rule": "dpo", "code": "old", "current": False}
    assert rows["theory"]["code"] is None
