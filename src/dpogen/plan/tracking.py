"""What recording the margins costs beside the training, per run, before any job (dpo.track)."""

from __future__ import annotations

import math

from ..config import pair_counts
from ..settings import Settings
from .memory import seq_len, stage_settings
from .shapes import dims, model_config, numel, param_shapes


def tracking_cost(rc: Settings, mc: dict) -> dict:
    """The dpo stage's compute, estimated from the config: training (steps x batch pairs x their tokens x
    3 forwards, 4 with gradient checkpointing) against tracking (the checkpoints after step 0, whose log-probs
    are the reference pass's, x tracked pairs x the tokens of a
    checkpoint pass, one prompt pass per multi-token pair), in forward tokens and FLOPs (2 x the forward's
    parameters per token), and what ``dpo.track: auto`` makes of it. The dpo job decides from the real token
    counts (engine/tracked.py); this says in advance what to expect."""
    from ..engine.schedule import eval_schedule
    from ..engine.tracked import FLOOR_FLOPS, GOAL, size_of, train_forwards

    dpo, data = rc.dpo, rc.data
    counts = pair_counts(rc)
    n_train, n_test = (counts["train"][0], counts["test"][0]) if counts else (None, None)
    bsz = n_train if dpo.full_batch else dpo.batch_size
    if n_train is None or bsz is None:
        return {"known": False, "note": "pair counts are known after the data stage (the dpo job logs its choice)"}
    steps = math.ceil(dpo.epochs * n_train / bsz) if dpo.epochs else dpo.steps
    checkpoints = len(eval_schedule(dpo.replace(steps=steps)))
    seq, note, upper = seq_len(rc, mc, "dpo")
    single = data.source in ("synthetic", "persona", "gaussian") and not dpo.append_eos
    mp, mr = data.max_prompt_tokens, data.max_response_tokens
    if single:
        train_tok = pass_tok = seq
    elif mp and mr:
        eos = 1 if dpo.append_eos else 0
        train_tok, pass_tok = 2 * (mp + mr + eos), mp + 2 * (mr + eos)
    else:
        train_tok = pass_tok = 2 * seq
    track = dpo.track
    tracked = sum(size_of("all" if isinstance(track, str) else getattr(track, k), n, f"dpo.track.{k}")
                  for k, n in (("train", n_train), ("test", n_test)))
    d = dims(mc)
    params = d["V"] * d["H"] if dpo.regime == "last_layer" else sum(numel(s) for _, s, _ in param_shapes(mc))
    gc = stage_settings(rc, "dpo")["gradient_checkpointing"]
    training = train_forwards(gc) * steps * bsz * train_tok
    tracking = (checkpoints - 1) * tracked * pass_tok  # step 0 takes the reference pass's log-probs
    ratio = tracking / training
    flops = 2 * params * tracking
    if track == "auto":
        auto = ("every pair" if ratio <= GOAL or flops <= FLOOR_FLOPS else
                f"a stratified subset and a log schedule bringing it to {GOAL}")
    else:
        auto = "as configured"
    return {"known": True, "steps": steps, "batch": bsz, "checkpoints": checkpoints, "pairs": n_train + n_test,
            "tracked": tracked, "training_tokens": training, "tracking_tokens": tracking, "ratio": ratio,
            "training_flops": 2 * params * training, "tracking_flops": flops, "auto": auto,
            "tokens_basis": f"{seq} tokens per row ({note})"}


def tracking_lines(rss: dict[str, Settings]) -> list[str]:
    lines = ["tracking cost (dpo.track; forward tokens, 3 forwards per training token, 4 with gradient checkpointing):"]
    basis = set()
    for run, rc in rss.items():
        t = tracking_cost(rc, model_config(rc))
        basis.add(t.get("tokens_basis"))
        if not t["known"]:
            lines.append(f"  {run}: {t['note']}")
            continue
        lines.append(f"  {run}: training {t['steps']} steps x {t['batch']} pairs = {t['training_tokens']:.3g} tokens "
                     f"({t['training_flops']:.2g} FLOPs); tracking {t['checkpoints'] - 1} checkpoints after step 0 x "
                     f"{t['tracked']} of "
                     f"{t['pairs']} pairs = {t['tracking_tokens']:.3g} tokens ({t['tracking_flops']:.2g} FLOPs); "
                     f"ratio {t['ratio']:.3g}; dpo.track {_track(rc.dpo.track)}: {t['auto']}")
    lines += [f"  {b}" for b in sorted(x for x in basis if x)]
    return lines


def _track(track) -> str:
    return track if isinstance(track, str) else str(track.model_dump())
