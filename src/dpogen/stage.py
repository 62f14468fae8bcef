"""Run one stage of a finished run outside Snakemake, for debugging, with the settings the workflow gives it.

    python -m dpogen.stage dpo results/synthetic-persona/k2 [--configfile my.yaml] [--out DIR] [--pdb]

The Snakefile is parsed as ``snakemake`` parses it (with the same ``--configfile`` files, merged over
config/config.yaml), the rule's inputs, params and log are resolved for the run named by the folder, and the
rule's script in workflow_scripts/ runs in this process with them: a breakpoint, ``--pdb`` or a profiler
sees the stage's own code. Outputs go to ``--out`` (default ``<run>/debug/``, laid out as in the run), never
over the run's own outputs, and no code record is written, so the workflow's view of what is up to date does not move.
A rule of the whole experiment (summary, scaling, check_data) takes the experiment's folder instead.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def locate(folder: Path) -> tuple[Path, str, str | None]:
    """(the folder Snakemake ran in, the experiment, the run or None) of ``results/<experiment>[/<run>]``."""
    parts = folder.resolve().parts
    if "results" not in parts:
        raise SystemExit(f"{folder}: not under a results/ folder (give results/<experiment>/<run>)")
    i = len(parts) - 1 - parts[::-1].index("results")
    rest = parts[i + 1:]
    if not 1 <= len(rest) <= 2:
        raise SystemExit(f"{folder}: give results/<experiment>/<run> or results/<experiment>")
    return Path(*parts[:i]), rest[0], rest[1] if len(rest) == 2 else None


def job(rule_name: str, workdir: Path, run: str | None, configfiles: list[str], out: Path):
    """The ``snakemake`` object the rule's script would receive, its outputs moved under ``out``; and the
    script's path."""
    from snakemake.api import SnakemakeApi
    from snakemake.iocontainers import Snakemake, Wildcards
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings()) as api:
        wf_api = api.workflow(resource_settings=ResourceSettings(cores=1),
                              config_settings=ConfigSettings(configfiles=[Path(f).resolve() for f in configfiles]),
                              snakefile=REPO / "Snakefile", workdir=workdir)
        wf = wf_api._workflow  # parses the Snakefile: the settings are built and checked as for a run
        try:
            rule = wf.get_rule(rule_name)
        except Exception:
            raise SystemExit(f"no rule {rule_name!r}; rules: {', '.join(sorted(r.name for r in wf.rules))}") from None
        wildcards = Wildcards(fromdict={"run": run} if run else {})
        if set(rule.wildcard_names) != set(wildcards.keys()):
            need = "results/<experiment>/<run>" if rule.wildcard_names else "results/<experiment>"
            raise SystemExit(f"rule {rule_name} takes {need}")
        inputs, _, _, _ = rule.expand_input(wildcards)
        missing = [f for f in inputs if not Path(workdir, f).exists()]
        if missing:
            raise SystemExit(f"rule {rule_name}: input {missing[0]} does not exist; run the workflow up to it first")
        outputs, _ = rule.expand_output(wildcards)
        params, _ = rule.expand_params(wildcards, inputs, outputs, None)
        log = rule.expand_log(wildcards)
        config = dict(wf.config)
        script = (Path(rule.basedir.get_path_or_uri(secret_free=True)) / rule.script).resolve()
    base = Path("results") / config["experiment"] / (run or "")
    for i, f in enumerate(outputs):  # same names, under out: the run's own outputs stay as they are
        outputs[i] = str(out / Path(f).relative_to(base))
    for i, f in enumerate(log):
        log[i] = str(out / "logs" / Path(f).name)
    if "code" in params.keys():  # no code record (workflow.record_code): these outputs are not the workflow's
        params[params._names["code"][0]] = None
    sm = Snakemake(inputs, outputs, params, wildcards, 1, {}, log, config, rule_name, None, str(script.parent))
    assert getattr(sm.params, "code", None) is None
    return sm, script


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpogen.stage", description=__doc__.split("\n\n")[0])
    ap.add_argument("rule", help="a rule of rules/*.smk: data, sft, ref_logps, dpo, theory, run_report, ...")
    ap.add_argument("folder", help="results/<experiment>/<run> (or results/<experiment> for a rule of the sweep)")
    ap.add_argument("--configfile", action="append", default=[], help="as given to snakemake, in order")
    ap.add_argument("--out", help="where the outputs go, laid out as in the run (default <folder>/debug)")
    ap.add_argument("--pdb", action="store_true", help="enter the debugger where the stage fails")
    a = ap.parse_args(argv)
    workdir, _, run = locate(Path(a.folder))
    out = Path(a.out).resolve() if a.out else Path(a.folder).resolve() / "debug"
    sm, script = job(a.rule, workdir, run, a.configfile, out)
    for f in [*sm.output, *sm.log]:
        Path(f).parent.mkdir(parents=True, exist_ok=True)
    print(f"rule {a.rule}, run {run or '-'}: {script.relative_to(REPO)}; outputs under {out}", file=sys.stderr)
    os.chdir(workdir)  # the inputs are relative to the folder Snakemake ran in
    try:
        runpy.run_path(str(script), init_globals={"snakemake": sm}, run_name="__main__")
    except Exception:
        if not a.pdb:
            raise
        import pdb

        pdb.post_mortem()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
