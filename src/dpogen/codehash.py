"""Code hashes for the rules: the library modules a workflow script runs, found from its imports, and a hash
of their code without comments and docstrings, so that only an edit that can change a result reruns a stage.

Pure stdlib: it runs when the Snakefile is parsed, which must stay fast and import neither torch nor
transformers.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent  # the package folder, src/dpogen
SCRIPTS = SRC.parents[1] / "workflow_scripts"


def _module_file(root: Path, parts: tuple[str, ...]) -> Path | None:
    """The file that runs for module ``parts`` of the package at ``root`` (() is the package itself): a
    subpackage's __init__.py (it wins over a same-named .py, as in Python), or the module's .py."""
    folder = root.joinpath(*parts)
    if (folder / "__init__.py").is_file():
        return folder / "__init__.py"
    if parts and folder.with_name(parts[-1] + ".py").is_file():
        return folder.with_name(parts[-1] + ".py")
    return None


@functools.lru_cache(maxsize=None)
def _parse(source: bytes, filename: str) -> tuple[str, tuple]:
    """The digest of the syntax tree without docstrings, and the file's import statements as (level, module,
    names); keyed by content, so a file edited within one process is parsed again."""
    tree = ast.parse(source, filename)
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                node.body = node.body[1:]
        elif isinstance(node, ast.Import):  # ``import a.b``: level None
            imports.extend((None, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.append((node.level, node.module or "", tuple(a.name for a in node.names if a.name != "*")))
    # ast.dump leaves out line numbers and columns by default: moving code by a comment's lines keeps the hash
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest(), tuple(imports)


class _Cache:
    """Parsed files by the hash of their bytes (and the Python version, whose ``ast.dump`` the digest is of),
    kept between invocations in the user's cache folder: parsing every module again is most of what a
    do-nothing dry run of the workflow costs. A cache that cannot be read or written is not used."""

    def __init__(self):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.path = base / "dpogen" / f"codehash-py{sys.version_info[0]}{sys.version_info[1]}.json"
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.new, self.used = 0, set()

    def get(self, source: bytes, filename: str) -> tuple[str, tuple]:
        key = hashlib.sha256(source).hexdigest()
        self.used.add(key)
        hit = self.entries.get(key)
        if hit is not None:
            return hit[0], tuple((lvl, mod, tuple(names)) for lvl, mod, names in hit[1])
        digest, imports = _parse(source, filename)
        self.entries[key] = [digest, [list(i) for i in imports]]
        self.new += 1
        return digest, imports

    def save(self) -> None:
        if not self.new:
            return
        if len(self.entries) > 4000:  # old versions of edited files: keep what this process read
            self.entries = {k: v for k, v in self.entries.items() if k in self.used}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
            self.new = 0
        except OSError:
            pass


_CACHE = _Cache()


def _read(path: Path) -> tuple[str, tuple]:
    return _CACHE.get(path.read_bytes(), str(path))


def _imports(path: Path, root: Path, parts: tuple[str, ...] | None) -> set[tuple[str, ...]]:
    """Modules of the package at ``root`` that the file imports anywhere (function bodies too: the package
    imports lazily), as candidates that may not exist (``from x import name`` may name a submodule or
    not). ``parts``: the file's own module, None for a script outside the package."""
    pkg = root.name
    here = None if parts is None else (parts if path.name == "__init__.py" else parts[:-1])
    found = set()
    for level, module, names in _read(path)[1]:
        head, *rest = module.split(".") if module else [""]
        if level is None:
            if head == pkg:
                found.add(tuple(rest))
            continue
        if level:
            if here is None or level - 1 > len(here):
                continue
            target = here[: len(here) - level + 1] + (tuple(module.split(".")) if module else ())
        elif head == pkg:
            target = tuple(rest)
        else:
            continue
        found.add(target)
        found.update(target + (name,) for name in names)
    return found


def _closure(script_path: Path, root: Path) -> dict[tuple[str, ...], Path]:
    """Every module of the package the script runs, followed through the package's own imports."""
    seen: dict[tuple[str, ...], Path] = {}
    todo = list(_imports(Path(script_path), root, None))
    while todo:
        parts = todo.pop()
        # importing a.b runs the package's __init__.py, then a's, then a/b.py
        for i in range(len(parts) + 1):
            head = parts[:i]
            if head in seen:
                continue
            file = _module_file(root, head)
            if file is None:
                break
            seen[head] = file
            todo.extend(_imports(file, root, head))
    return seen


def script_modules(script_path, root: Path = SRC) -> list[str]:
    """The package's module files a workflow script runs, relative to the package folder
    (e.g. ``["__init__.py", "engine/loop.py", "logprobs.py"]``), sorted."""
    root = Path(root)
    return sorted(f.relative_to(root).as_posix() for f in _closure(Path(script_path), root).values())


# The settings package (types, defaults, docs) is left out of every hash: what a setting does to the outputs
# travels in the rule params, so editing a default reruns only the stages whose params hold it, and editing a
# doc line reruns nothing.
UNHASHED = ("settings/",)


def script_hash(script_path, root: Path = SRC) -> str:
    """Hash of the code (not comments or docstrings) of the modules a script runs, the settings package
    aside (UNHASHED); 16 hex characters."""
    root = Path(root)
    h = hashlib.sha256()
    for name in script_modules(script_path, root):
        if not name.startswith(UNHASHED):
            h.update(f"{name}\0{_read(root / name)[0]}\n".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def stage_hash(script_name: str) -> str:
    """The code hash of a rule's script (e.g. ``"dpo.py"`` in workflow_scripts/), a rule param: editing code
    the stage runs reruns it and what follows. Cached: every rule asks when the Snakefile is parsed. An
    installed package has no workflow scripts beside it: then the code of every module counts."""
    script = SCRIPTS / script_name
    if script.exists():
        digest = script_hash(script)
    else:
        h = hashlib.sha256()
        for f in sorted(SRC.rglob("*.py")):
            if not f.relative_to(SRC).as_posix().startswith(UNHASHED):
                h.update(f"{f.relative_to(SRC).as_posix()}\0{_read(f)[0]}\n".encode())
        digest = h.hexdigest()[:16]
    _CACHE.save()
    return digest


# --- code records: which code each stage's outputs were made with ---------------------------------------------
# Every finished job writes results/<experiment>/code/<rule>/<run>.json (``<rule>.json`` for a rule of the whole
# experiment): the code param it was scheduled with and the code hash of what it actually ran. With
# ``workflow.rerun_on_code: false`` a rule's code param is the recorded one, so Snakemake sees no change and keeps
# outputs an older version of the code made; the summary reads the records and names every such stage.

# the rules whose outputs make a run's results, in workflow order (the summary and scaling come after)
RUN_RULES = ("data", "base_model", "sft", "ref_logps", "dpo", "theory", "run_report")


def record_path(out, rule: str, run: str | None = None) -> Path:
    """Where the code record of ``rule`` (for ``run``, or for the whole experiment) lives under ``out``."""
    return Path(out) / "code" / rule / f"{run or rule}.json"


def read_record(path) -> dict | None:
    """A code record, or None where there is none (or it cannot be read: then the current code counts)."""
    import json

    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("param"), str) else None


def reruns_on_code(setting: bool | list, rule: str) -> bool:
    """``workflow.rerun_on_code``: true (every rule), false (none) or a list of the rules that rerun."""
    return setting is True or (isinstance(setting, list) and rule in setting)


def code_param(setting: bool | list, out, rule: str):
    """The ``code`` param of ``rule`` (its script is workflow_scripts/<rule>.py), a function of the wildcards:
    where the outputs' record says they were made with the current code, the param they were scheduled with
    (nothing is stale, whatever was recorded); else the current hash, or, where code changes do not rerun
    the rule (``workflow.rerun_on_code``), the recorded param. Outputs made before records existed have no
    record: their stage reruns on a code change whatever the setting (the next run writes records).
    ``setting``: workflow.rerun_on_code."""
    current = stage_hash(f"{rule}.py")
    keep = not reruns_on_code(setting, rule)

    def param(wildcards) -> str:
        rec = read_record(record_path(out, rule, getattr(wildcards, "run", None)))
        if rec and (keep or rec.get("code") == current):
            return rec["param"]
        return current

    return param


def code_versions(out, runs: list[str], rules=RUN_RULES) -> list[dict]:
    """Per run and rule: the code hash its outputs were made with (None: no record) and whether it is the
    current code."""
    rows = []
    for run in runs:
        for rule in rules:
            rec = read_record(record_path(out, rule, run)) or read_record(record_path(out, rule))
            made = rec.get("code") if rec else None
            rows.append({"run": run, "rule": rule, "code": made, "current": made == stage_hash(f"{rule}.py")})
    return rows
