# Helpers shared by the stage files.

MODEL = config["model"]
# the workflow builds the base model (offline default) or converts a GGUF checkpoint once; a hub id or a
# local folder is used where it is
BUILDS_BASE = MODEL["source"] == "scratch" or bool(MODEL["pretrained"].get("gguf_file"))
BASE = f"{OUT}/base_model" if BUILDS_BASE else MODEL["pretrained"]["path"]


# loading options that change what a model job computes; in params only when set, so runs made without
# them keep their outputs
LOAD = {
    k: v
    for k, v in {
        "attn_implementation": MODEL.get("attn_implementation"),
        "trust_remote_code": MODEL.get("trust_remote_code") or None,
        "revision": MODEL["pretrained"].get("revision"),
    }.items()
    if v
}
WITH_LOAD = {"load": LOAD} if LOAD else {}

# GPUs a model job asks the scheduler for: one per data-parallel process when the device is CUDA
GPUS = (
    config["dpo"]["processes"] if str(config["dpo"]["device"]).startswith("cuda") else 0
)


def base_input(wildcards=None):
    """The base model as a file input when the workflow makes it, else nothing (it is a param)."""
    return [BASE] if BUILDS_BASE else []


def rcfg(wildcards):
    """The full config of the run named by the job's wildcards (the sweep's value filled in)."""
    return run_config(config, wildcards.run)


def ref_settings(cfg):
    """The DPO settings that change reference log-probs (not β, lr, ...: changing those keeps them)."""
    return {
        k: cfg["dpo"][k]
        for k in ("append_eos", "dtype", "device", "eval_batch_size", "autocast")
    }
