# Helpers shared by the stage files.


def rcfg(wildcards):
    """The full config of the run named by the job's wildcards (the sweep's value filled in)."""
    return run_config(config, wildcards.run)


def ref_settings(cfg):
    """The DPO settings that change reference log-probs (not β, lr, ...: changing those keeps them)."""
    return {k: cfg["dpo"][k] for k in ("append_eos", "dtype", "device", "eval_batch_size", "autocast")}
