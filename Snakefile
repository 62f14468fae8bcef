# dpogen: DPO training with per-sample margins, next to the theory of Im & Li (arXiv 2408.03459).
# The map of the workflow: configuration and its checks, the stage files, the default target.
import sys
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import min_version

min_version("9.0")

REPO = Path(workflow.basedir)
sys.path.insert(0, str(REPO / "src"))
from dpogen.codehash import code_param  # noqa: E402
from dpogen.config import (  # noqa: E402
    axes,
    base_settings,
    group_label,
    load,
    read_yaml,
    replicate,
    runs,
    sweep_label,
    sweep_title,
)
from dpogen.data.inputs import data_files  # noqa: E402
from dpogen.intact import damage, damaged_folders, rebuild, refusal, stale  # noqa: E402
from dpogen.plan.memory import check as check_plan  # noqa: E402
from dpogen.settings import THEORY_FROM_DPO  # noqa: E402

# a YAML error in the workflow's config names its line and column (Snakemake's reading would not); files given
# with --configfile Snakemake reads before this file runs: --verbose shows where such a file is broken
read_yaml(REPO / "config" / "config.yaml")


configfile: str(REPO / "config" / "config.yaml")


# The typed settings (dpogen.settings), built once here: the experiment's and each run's (its sweep values
# filled in). A bad key, type or value, and what the types cannot say (eval steps, K), stop the run before
# any job with one line naming the key and the run. Past this point rules read settings by attribute.
SETTINGS, RS = load(config)
# the memory plan (python -m dpogen.plan): a run that needs more than resources.gpu_mem_gb per GPU, or
# more GPUs than resources.gpus, stops here, naming the run and the largest term
check_plan(SETTINGS, RS)


onstart:
    # a job spanning nodes needs a SLURM allocation; refused before any job runs anywhere else
    if SETTINGS.resources.nodes > 1 and workflow.executor_plugin.name not in (
        "slurm",
        "slurm-jobstep",
    ):
        raise WorkflowError(
            f"resources.nodes: {SETTINGS.resources.nodes} needs the SLURM executor "
            f"(--workflow-profile profiles/slurm); this run uses {workflow.executor_plugin.name}: "
            "set resources.nodes: 1"
        )
    # every input a job is about to read, made by a job that is not rerun, checked before any job removes
    # its outputs: a damaged one stops the run naming the rule that makes it and the command
    dag = workflow.dag
    bad = {}
    for job in dag.needrun_jobs():
        if not job.output:  # rule all: removes nothing
            continue
        for dep, files in dag.dependencies[job].items():
            if not dag.needrun(dep):
                for f in files:
                    why = f not in bad and damage(f)
                    if why:
                        bad[f] = (f, dep.rule.name, why)
    if bad:
        raise WorkflowError(refusal(list(bad.values()), CONFIGFILES))


EXP = SETTINGS.experiment
RUNS = runs(SETTINGS)  # run name → sweep value
SCALING = {"data.k", "data.gaussian.q"} <= {a.param for a in axes(SETTINGS)}
OUT = f"results/{EXP}"
RUN = f"{OUT}/{{run}}"
LOGS = f"{OUT}/logs"


# cheap aggregation runs in the main process, not as cluster jobs
localrules:
    all,
    run_report,
    summary,
    scaling,


wildcard_constraints:
    run="|".join(RUNS),


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/sft.smk"
include: "rules/dpo.smk"
include: "rules/theory.smk"
include: "rules/report.smk"


# Every output of every run is asked for, so a plain rerun rebuilds whatever was deleted, and what depends
# on it. A folder missing a part or holding a damaged one (a margins partition against the manifest in its
# run.json, a model without its weights), which Snakemake cannot see, is remade as if it were deleted.
EVERY = every_output()
if workflow.is_main_process:
    remake_damaged_folders(EVERY)


rule all:
    default_target: True
    input:
        # the summaries and figures across the sweep (with theory.attribution_check its check, with a K x Q
        # grid the scaling study), and under them every run's data, models, margins, theory and report
        list(EVERY),
