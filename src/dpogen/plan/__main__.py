"""python -m dpogen.plan [--configfile F ...] [--json]: the memory plan and the tracking cost of every run."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError, load_config, run_settings, runs
from ..settings import Settings, build
from .memory import GB, check, plan
from .shapes import model_config
from .tracking import tracking_cost, tracking_lines
def _gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def table(cfg: Settings, plans: dict) -> str:
    """A plain table: per run and stage, the largest rank's terms in GB, and the resources."""
    first = next(iter(plans.values()))
    eng = first.get("dpo") if first.get("dpo", {}).get("uses_engine") else next(
        (p for p in first.values() if p["uses_engine"]), None)
    m = cfg.model
    name = m.pretrained.path if m.source == "pretrained" else f"scratch {m.scratch.arch}"
    lines = [f"experiment {cfg.experiment}: {name}"]
    if eng:
        s = eng["settings"]
        sharded = f"sharded over {s['shard_world']}" if s["sharded"] else "not sharded"
        nodes = f" on {s['nodes']} nodes ({s['per_node']} each)" if s["nodes"] > 1 else ""
        gc = "on" if s["gradient_checkpointing"] else "off"
        lines.append(f"  {eng['model']['model_type']}, {eng['model']['parameters']:,} parameters; "
                     f"dpo.parallel {s['parallel']} over {s['world']} process(es){nodes} on {s['device']} ({sharded}; "
                     f"weights loaded {'into their shards' if s['loads'] == 'shards' else 'whole'}); "
                     f"dpo.regime {cfg.dpo.regime}; weights {s['dtype']}, "
                     f"compute {s['compute_dtype']}; gradient checkpointing {gc}")
    where = "per GPU" if eng is None or eng["settings"]["device"].startswith("cuda") else "per process (host memory)"
    lines.append(f"  {where}: rank 0, the largest rank; GB = 1e9 bytes; mem_mb: host memory per node")
    head = ["run", "stage", "gpus", "params", "grads", "optim", "working", "activ", "logits", "total", "mem_mb",
            "cpus", "largest"]
    rows = [head]
    notes: dict[str, None] = {}
    for run, stages in plans.items():
        for stage, p in stages.items():
            r = p["resources"]
            if not p["uses_engine"]:
                rows.append([run, stage, str(r["gpus"]), "-", "-", "-", "-", "-", "-", "-", str(r["mem_mb"]),
                             str(r["cpus"]), "(no training: sft.target none)"])
                continue
            g = p["per_gpu"]
            total = _gb(g["total"]) + ("+" if p["unbounded"] else "")
            rows.append([run, stage, str(r["gpus"]), _gb(g["params"]), _gb(g["grads"]), _gb(g["optimizer"]),
                         _gb(g["working"]), _gb(g["activations"]), _gb(g["logits"]), total, str(r["mem_mb"]),
                         str(r["cpus"]), p["largest"][0]])
            for phase, t in p["tokens"].items():
                bound = " UPPER BOUND" if t["upper_bound"] else ""
                tok = "unknown" if t["tokens"] is None else f"{t['tokens']:,}"
                notes[f"  {stage} {phase}: T = {tok} tokens{bound}: {t['basis']}"] = None
            if p["unbounded"]:
                phases = ", ".join(p["unbounded"])
                notes[f"  {stage}: '+' = activations of the {phases} pass not bounded, not in the total"] = None
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i in (0, 1, 12) else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.append("token budgets (padded tokens per micro-batch per process):")
    lines += list(notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpogen.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", action="append", default=[], help="merged over config/config.yaml, in order")
    ap.add_argument("--json", action="store_true", help="the plan as JSON (bytes)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.configfile)
        s = build(cfg)
        rss = {run: run_settings(cfg, run) for run in runs(s)}
        plans = plan(rss)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        tracking = {run: tracking_cost(rc, model_config(rc)) for run, rc in rss.items()}
        print(json.dumps({"experiment": s.experiment, "gb": GB, "runs": plans, "tracking": tracking}, indent=1))
    else:
        print(table(s, plans))
        print("\n".join(tracking_lines(rss)))
    try:
        check(s, rss, plans)
    except ConfigError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
