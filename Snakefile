# dpogen: DPO training with per-sample margins, next to the theory of Im & Li (arXiv 2408.03459).
# The map of the workflow: configuration and its checks, the stage files, the default target.
import sys
from pathlib import Path

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
    replicate,
    runs,
    sweep_label,
    sweep_title,
)
from dpogen.data.inputs import data_files  # noqa: E402
from dpogen.plan.memory import check as check_plan  # noqa: E402
from dpogen.settings import THEORY_FROM_DPO  # noqa: E402


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


rule all:
    default_target: True
    input:
        f"{OUT}/summary.csv",
        f"{OUT}/summary.parquet",
        f"{OUT}/fit.csv",
        f"{OUT}/summary.md",
        f"{OUT}/margins_by_run.png",
        f"{OUT}/error_vs_k.png",
        # a K x Q grid: the scaling study (smallest Q per K at the target test error, beside the v5 bound)
        [f"{OUT}/scaling.csv", f"{OUT}/scaling.png"] if SCALING else [],
        # theory.attribution_check: leave-one-concept-out retraining against the attribution
        [f"{OUT}/attribution_check.csv"] if CHECK_ATTRIBUTION else [],
