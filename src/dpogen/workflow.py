"""Glue for the scripts in workflow_scripts/: logging into the rule's log, threads, errors."""

from __future__ import annotations

import contextlib
import logging

from .training import setup_logging


@contextlib.contextmanager
def job(snakemake):
    """Log to the rule's log file, use the rule's threads, and record any error in the log before raising."""
    setup_logging(snakemake.log[0] if snakemake.log else None)
    log = logging.getLogger("dpogen")
    try:
        import torch

        torch.set_num_threads(max(1, int(snakemake.threads)))
    except ImportError:
        pass
    from . import model

    m = snakemake.config.get("model", {})
    model.LOAD_OPTIONS.update({k: m.get(k) for k in ("attn_implementation", "trust_remote_code")})
    model.LOAD_OPTIONS["revision"] = (m.get("pretrained") or {}).get("revision")
    log.info("rule %s, wildcards %s", snakemake.rule, dict(snakemake.wildcards))
    try:
        yield log
    except Exception:
        log.exception("rule %s failed", snakemake.rule)
        raise
