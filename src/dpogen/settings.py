"""Which settings can change which outputs: the one place the rules' params and the jobs read it from.

Execution settings change how a job runs and reports, never a value it writes: they are not rule params,
so changing them schedules nothing. Settings that move values only through float order (threads,
processes, micro-batch size and grad_accum, evaluation batch size, token budgets, logit chunk) are
value-changing: training amplifies such differences, so they are params and dpo/run.json records them.
"""

EXECUTION = {
    "sft": ("log_every",),
    "dpo": ("log_every", "save_every", "report_to"),
}

# what the theory stage reads of the dpo settings (its other inputs are the dpo stage's outputs)
THEORY_FROM_DPO = ("beta", "loss", "label_smoothing", "lr", "optimizer", "batch_size", "weight_decay",
                   "max_grad_norm", "schedule", "warmup_steps", "regime", "dtype")


def value_settings(section: dict, name: str) -> dict:
    """``section`` without its execution settings."""
    return {k: v for k, v in section.items() if k not in EXECUTION.get(name, ())}


def execution_settings(config: dict, name: str) -> dict:
    """The execution settings of section ``name``, as a job reads them from the workflow's config."""
    return {k: config[name][k] for k in EXECUTION.get(name, ()) if k in config[name]}
