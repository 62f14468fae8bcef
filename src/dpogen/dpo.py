"""The dpo stage: reference log-probs once, then DPO training that records every pair's margin.

Reference log-probs come from one pass over all train and test pairs and are read back from Parquet while
training, so no reference model is held in memory. At each scheduled step (step 0 always, the last step
always) the margins of ALL train and test pairs are written as one partition of a Parquet folder.

Training state (model, optimizer, scheduler, RNG, step, metrics so far) is saved every ``save_every`` steps
to a work folder outside Snakemake's outputs, so a killed job resumes where it stopped and yields the same
tables as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import model as M
from . import tables
from .io import atomic_dir, atomic_path, write_json
from .distributed import Dist
from .logprobs import TargetCache, cache_targets, cached_logps, cached_logratio, pair_logps
from .reference import autocast, encode, eval_logps, pairs_frame
from .training import Progress, log, make_optimizer, make_scheduler

LOSSES = ("sigmoid", "ipo", "ipo_norm", "hinge", "robust")


def dpo_loss(ratio_chosen: torch.Tensor, ratio_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss from the log-ratios log π(y|x) − log π_ref(y|x) of chosen and rejected.

    With h = ratio_chosen − ratio_rejected (so the margin is r = βh):
    sigmoid: −(1−ε) log σ(βh) − ε log σ(−βh) (ε = label_smoothing: conservative DPO; ε = 0: DPO);
    ipo: (h − 1/(2β))² on summed log-probs, as in the original DPO code;
    ipo_norm: the same with each log-ratio divided by its response's token count (TRL's IPO);
    hinge: max(0, 1 − βh); robust: (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε) (TRL's "robust").
    """
    h = ratio_chosen - ratio_rejected
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "ipo_norm":
        if n_tokens is None:
            raise ValueError("dpo.loss ipo_norm needs the response token counts")
        hn = ratio_chosen / n_tokens[:, 0] - ratio_rejected / n_tokens[:, 1]
        return (hn - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) \
            / (1 - 2 * label_smoothing)
    raise ValueError(f"dpo.loss: unknown {loss_type!r} ({', '.join(LOSSES)})")


def loss_name(cfg: dict) -> str:
    if cfg["loss"] == "sigmoid" and cfg["label_smoothing"] > 0:
        return f"cdpo(eps={cfg['label_smoothing']})"
    if cfg["loss"] == "robust":
        return f"robust-dpo(eps={cfg['label_smoothing']})"
    return {"sigmoid": "dpo-sigmoid", "ipo": "ipo-summed", "ipo_norm": "ipo-token-mean", "hinge": "hinge"}[cfg["loss"]]


def eval_schedule(cfg: dict) -> list[int]:
    """Checkpoint steps: the configured list and every ``eval_every`` steps; step 0 and the last always."""
    steps = set(cfg.get("eval_steps") or [])
    every = cfg.get("eval_every")
    if every:
        steps |= set(range(0, cfg["steps"] + 1, every))
    steps |= {0, cfg["steps"]}
    bad = [s for s in steps if s < 0 or s > cfg["steps"]]
    if bad:
        raise ValueError(f"dpo.eval_steps: {sorted(bad)} outside 0..dpo.steps={cfg['steps']}")
    return sorted(steps)


def margins_frame(step: int, pairs: pd.DataFrame, lp: np.ndarray, ref: np.ndarray, beta: float) -> pd.DataFrame:
    rc = beta * (lp[:, 0] - ref[:, 0])
    rr = beta * (lp[:, 1] - ref[:, 1])
    return pd.DataFrame({
        "step": step, "split": pairs["split"].to_numpy(), "sample_id": pairs["sample_id"].to_numpy(),
        "concept": pairs["concept"].to_numpy(), "cluster": pairs["cluster"].to_numpy(),
        "logp_chosen": lp[:, 0], "logp_rejected": lp[:, 1],
        "ref_logp_chosen": ref[:, 0], "ref_logp_rejected": ref[:, 1],
        "reward_chosen": rc, "reward_rejected": rr, "margin": rc - rr,
    })


def geometry_steps(cfg: dict, schedule: list[int]) -> list[int]:
    """Checkpoints at which g(x) is saved when the backbone trains (``dpo.geometry_steps``; "last" is the
    last step). Each must be a checkpoint; step 0 is the reference, whose g(x) the reference pass gives."""
    want = set()
    for s_ in cfg.get("geometry_steps") or []:
        want.add(cfg["steps"] if s_ == "last" else int(s_))
    bad = sorted(want - set(schedule))
    if bad:
        raise ValueError(f"dpo.geometry_steps: {bad} are not checkpoints (dpo.eval_every / eval_steps)")
    return sorted(want - {0})


def tau1_checkpoint(cfg: dict, train: pd.DataFrame, feats: np.ndarray | None) -> set[int]:
    """The last step at or before τ_1 (full-batch sgd; g(x) rescaled as the theory stage does), if training
    gets there; the theory stage reads the theorem's claims "at τ_1" from this checkpoint."""
    from .timescale import concept_scale, tau1_steps

    if feats is None:
        raise ValueError("dpo.eval_at_tau1 needs the reference features (ref_features.npy)")
    n = len(train)
    scale = concept_scale(feats[:n], train["concept"].to_numpy(), train["cluster"].to_numpy())
    k1 = math.floor(tau1_steps(cfg["beta"], train["concept"].nunique(), cfg["lr"], scale) + 1e-9)
    if not 1 <= k1 <= cfg["steps"]:
        log.warning("dpo.eval_at_tau1: tau_1 is at step %d, outside 1..%d: no extra checkpoint", k1, cfg["steps"])
        return set()
    return {k1}


def fingerprint(cfg: dict, *files) -> str:
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Train-pair indices of optimizer step ``step`` (0-based): epochs of seeded permutations, concatenated.
    Depends only on the step, so a resumed run draws the same batches."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, off = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[off: off + batch_size - len(out)].tolist())
    return np.asarray(out)


def _rng_state() -> dict:
    import random
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(), "cuda": cuda}


def _set_rng_state(s: dict) -> None:
    import random
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Policy:
    """The model being trained and how its log-probs are computed in each regime.

    full: every parameter trains, log-probs from forward passes. last_layer: only the LM head trains
    (untied from the input embeddings first); the frozen backbone's outputs are cached once and every
    training step and checkpoint is a product with the head. lora: peft adapters on the configured modules.
    """

    def __init__(self, model, enc, cfg: dict, features: np.ndarray | None = None):
        self.cfg, self.enc, self.regime = cfg, enc, cfg["regime"]
        self.cache = None
        if self.regime == "last_layer":
            untie_head(model)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.get_output_embeddings().parameters():
                p.requires_grad_(True)
            if features is not None and enc.fused.all():
                # single-token answers: the reference pass's g(x) is the whole cache, no second forward pass
                dev = next(model.parameters()).device
                self.cache = TargetCache.from_features(enc, torch.as_tensor(features, device=dev))
            else:
                self.cache = cache_targets(model, enc, cfg["eval_batch_size"])
        elif self.regime == "lora":
            from peft import LoraConfig, get_peft_model

            lc = cfg["lora"]
            model = get_peft_model(model, LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"],
                                                     target_modules=lc["target_modules"], bias="none"))
        elif self.regime != "full":
            raise ValueError(f"dpo.regime: unknown {self.regime!r} (full, last_layer, lora)")
        self.model = model
        # single-token answers in the last layer: training needs only the two answer logits (the
        # log-partition cancels in the loss); absolute log-probs are computed at checkpoints
        self.margin_only = self.cache is not None and bool(enc.fused.all())

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def logratio(self, idx: np.ndarray) -> torch.Tensor:
        """log π(y_w|x) − log π(y_l|x) of pairs ``idx``, with gradients (margin-only path)."""
        with autocast(self.model, self.cfg):
            return cached_logratio(self.model, self.cache, idx)

    def logps(self, idx: np.ndarray) -> torch.Tensor:
        with autocast(self.model, self.cfg):
            if self.cache is not None:
                return cached_logps(self.model, self.cache, idx)
            return pair_logps(self.model, self.enc, idx)

    @torch.no_grad()
    def eval_pairs(self, idx: np.ndarray, features: bool = False):
        """Log-probs of pairs ``idx`` in eval mode (dropout off), no gradients; with ``features`` (a backbone
        that trains), also g(x) of each pair under the current weights, from the same pass."""
        if self.cache is None:
            return eval_logps(self.model, self.enc, self.cfg, pairs=idx, features=features)
        if features:
            raise ValueError("g(x) does not change in the last_layer regime: it is the reference's")
        with autocast(self.model, self.cfg):
            return cached_logps(self.model, self.cache, idx, batch_targets=self.cfg["eval_batch_size"])


def untie_head(model) -> None:
    """Give the LM head its own weights if it shares them with the input embeddings."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight.data_ptr() == emb.weight.data_ptr():
        new = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                              dtype=head.weight.dtype, device=head.weight.device)
        with torch.no_grad():
            new.weight.copy_(head.weight)
            if head.bias is not None:
                new.bias.copy_(head.bias)
        model.set_output_embeddings(new)
        model.config.tie_word_embeddings = False


def total_steps(cfg: dict, n_train: int, bsz: int) -> int:
    """``dpo.steps``, or enough steps for ``dpo.epochs`` passes over the training pairs when that is set."""
    if cfg.get("epochs"):
        return max(1, math.ceil(cfg["epochs"] * n_train / bsz))
    return cfg["steps"]


def train_dpo(ref_path, train: pd.DataFrame, test: pd.DataFrame, ref_logps_path, cfg: dict, seed: int,
              out_margins, out_metrics, work_dir, out_info=None, ref_features_path=None, out_features=None) -> dict:
    """DPO from the reference checkpoint ``ref_path``; writes the margins folder and the metrics table."""
    dist = Dist(cfg["device"])
    work = Path(work_dir)
    from .codehash import stage_hash

    # what the saved state depends on: settings that change the numbers, the seed, the reference and the code
    ignore = {"processes", "log_every", "save_every", "eval_batch_size"}
    fp = fingerprint({k: v for k, v in cfg.items() if k not in ignore} | {"seed": seed, "code": stage_hash("dpo.py")},
                     ref_logps_path)
    state_path = work / "state.pt"
    if dist.main:
        if work.exists() and not (work / f"fingerprint-{fp}").exists():
            log.info("work folder %s belongs to other settings: starting over", work)
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        (work / f"fingerprint-{fp}").touch()
    dist.barrier()

    M.seed_everything(seed)
    model, tok = M.load(ref_path, cfg["dtype"], dist.device(cfg["device"]))
    pairs = pairs_frame(train, test)
    ref_df = pd.read_parquet(ref_logps_path).set_index("sample_id").loc[pairs["sample_id"]]
    ref = ref_df[["ref_logp_chosen", "ref_logp_rejected"]].to_numpy(np.float64)
    enc = encode(tok, pairs, cfg)
    n_train = len(train)
    bsz = n_train if cfg["batch_size"] in (None, "full") else int(cfg["batch_size"])
    steps = total_steps(cfg, n_train, bsz)
    cfg = {**cfg, "steps": steps}
    accum = int(cfg["grad_accum"])
    feats = None
    if (cfg["regime"] == "last_layer" or cfg.get("eval_at_tau1")) and ref_features_path is not None:
        feats = np.load(ref_features_path)
        order = pd.read_parquet(ref_logps_path, columns=["sample_id"])["sample_id"].tolist()
        if feats.shape[0] != len(pairs) or order != pairs["sample_id"].tolist():
            raise ValueError(f"{ref_features_path}: rows do not match the pairs of this run ({feats.shape[0]} rows, "
                             f"{len(pairs)} pairs)")
    schedule = eval_schedule(cfg)
    if cfg.get("eval_at_tau1"):
        schedule = sorted(set(schedule) | tau1_checkpoint(cfg, train, feats))
    policy = Policy(model, enc, cfg, feats if cfg["regime"] == "last_layer" else None)
    device = next(policy.model.parameters()).device
    ref_t = torch.tensor(ref, device=device)
    n_tokens = torch.tensor(enc.n_tokens, device=device)
    params = policy.trainable()
    opt = make_optimizer(cfg["optimizer"], params.values(), cfg["lr"], cfg["weight_decay"])
    sched = make_scheduler(opt, cfg["schedule"], cfg["warmup_steps"], steps)
    margins_work = work / "margins"
    rows: list[dict] = []
    start = 0
    if state_path.exists():
        st = torch.load(state_path, weights_only=False, map_location=device)
        with torch.no_grad():
            for name, value in st["params"].items():
                params[name].copy_(value)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"])
        rows, start = st["metrics"], st["step"]
        log.info("resuming from step %d (%s)", start, state_path)
    log.info("dpo: %s, regime %s, %d trainable parameters, %d train / %d test pairs, batch %d, %d steps, seed %d",
             loss_name(cfg), cfg["regime"], sum(p.numel() for p in params.values()), n_train, len(test), bsz, steps, seed)

    feature_steps = geometry_steps(cfg, schedule) if policy.cache is None else []
    features_work = work / "features"

    def checkpoint(step: int) -> tuple[float, float]:
        mine = dist.shard(np.arange(len(pairs)))
        if step in feature_steps:  # g(x) moves with the backbone: keep the training pairs' for the theory stage
            lp_t, g_t = policy.eval_pairs(mine, features=True)
            g_all = dist.gather_rows(len(pairs), mine, g_t.cpu().numpy())
            if dist.main:
                features_work.mkdir(exist_ok=True)
                with atomic_path(features_work / f"step={step}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, g_all[:n_train])
        else:
            lp_t = policy.eval_pairs(mine)
        lp = dist.gather_rows(len(pairs), mine, lp_t.cpu().numpy().astype(np.float64))
        if not dist.main:
            return math.nan, math.nan
        df = margins_frame(step, pairs, lp, ref, cfg["beta"])
        tables.write_margins_checkpoint(df, margins_work, step)
        err = (df["margin"] <= 0).groupby(df["split"]).mean()
        return float(err.get("train", np.nan)), float(err.get("test", np.nan))

    empty = {k: math.nan for k in tables.METRICS.names}
    if start == 0:
        tr, te = checkpoint(0)
        rows = [{**empty, "step": 0, "epoch": 0.0, "train_error": tr, "test_error": te, "elapsed_s": 0.0}]
    policy.model.train()
    prog = Progress(steps, "dpo", every=cfg["log_every"], start_step=start)
    elapsed0 = rows[-1]["elapsed_s"] if rows else 0.0
    for step in range(start, steps):
        idx = batch_indices(step, n_train, bsz, seed)
        lr = sched.get_last_lr()[0]
        opt.zero_grad(set_to_none=True)
        stats = np.zeros(7)
        for chunk in np.array_split(dist.shard(idx), accum):
            if len(chunk) == 0:
                continue
            t_chunk = torch.as_tensor(chunk, device=device)
            ntok = n_tokens[t_chunk]
            if policy.margin_only:
                d = policy.logratio(chunk)
                r = ref_t[t_chunk].to(d.dtype)
                h = d - (r[:, 0] - r[:, 1])
                loss = dpo_loss(h, torch.zeros_like(h), cfg["beta"], cfg["loss"], cfg["label_smoothing"],
                                ntok).sum() / len(idx)
                loss.backward()
                m = (cfg["beta"] * h).detach()
                stats += np.array([loss.item() * len(idx), np.nan, np.nan, m.sum().item(), (m > 0).sum().item(),
                                   np.nan, np.nan])
                continue
            lp = policy.logps(chunk)
            r = ref_t[t_chunk].to(lp.dtype)
            loss = dpo_loss(lp[:, 0] - r[:, 0], lp[:, 1] - r[:, 1], cfg["beta"], cfg["loss"], cfg["label_smoothing"],
                            ntok).sum() / len(idx)
            loss.backward()
            with torch.no_grad():
                rc, rr = cfg["beta"] * (lp[:, 0] - r[:, 0]), cfg["beta"] * (lp[:, 1] - r[:, 1])
                stats += np.array([loss.item() * len(idx), rc.sum().item(), rr.sum().item(), (rc - rr).sum().item(),
                                   (rc > rr).sum().item(), lp[:, 0].sum().item(), lp[:, 1].sum().item()])
        dist.sum_grads(params.values())
        stats = dist.sum(stats)
        clip = cfg["max_grad_norm"] or float("inf")
        gn = float(torch.nn.utils.clip_grad_norm_(list(params.values()), clip))
        opt.step()
        sched.step()
        s = stats / len(idx)
        done = step + 1
        row = {**empty, "step": done, "epoch": done * bsz / n_train, "loss": s[0], "lr": lr, "grad_norm": gn,
               "rewards/chosen": s[1], "rewards/rejected": s[2], "rewards/margins": s[3],
               "rewards/accuracies": s[4], "logps/chosen": s[5], "logps/rejected": s[6]}
        prog.update(done, len(idx), loss=s[0], margin=s[3])
        row["pairs_per_s"] = prog.rate()
        row["elapsed_s"] = elapsed0 + prog.elapsed()
        if done in schedule:
            row["train_error"], row["test_error"] = checkpoint(done)

        rows.append(row)
        if dist.main and cfg["save_every"] and (done % cfg["save_every"] == 0) and done < steps:
            with atomic_path(state_path) as tmp:
                torch.save({"params": {n: p.detach() for n, p in params.items()}, "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "rng": _rng_state(), "step": done,
                            "metrics": rows}, tmp)
    info = {"seed": seed, "loss": loss_name(cfg), "regime": cfg["regime"], "steps": steps, "batch_size": bsz,
            "n_train": n_train, "n_test": len(test), "trainable_parameters": int(sum(p.numel() for p in params.values())),
            "checkpoints": schedule, "processes": dist.world, "torch": torch.__version__, "device": str(device),
            "dtype": cfg["dtype"]}
    dist.barrier()
    if not dist.main:
        dist.close()
        return info
    present = sorted(int(p.name.split("=")[1]) for p in margins_work.glob("step=*"))
    missing = sorted(set(schedule) - set(present))
    if missing:
        raise RuntimeError(f"margin checkpoints missing for steps {missing} in {margins_work}")
    with atomic_dir(out_margins) as tmp:
        for s_ in schedule:
            shutil.copytree(margins_work / f"step={s_}", Path(tmp) / f"step={s_}")
    if out_features:
        with atomic_dir(out_features) as tmp:
            for s_ in feature_steps:
                shutil.copy(features_work / f"step={s_}.npy", Path(tmp) / f"step={s_}.npy")
            note = ("g(x) of the training pairs under the policy, rows in train.parquet order" if feature_steps else
                    "no files: the backbone is frozen (last_layer), so g(x) is the reference's at every step")
            write_json({"steps": feature_steps, "note": note}, Path(tmp) / "index.json")
    tables.write_metrics(pd.DataFrame(rows), out_metrics)
    if out_info:
        write_json(info, out_info)
    shutil.rmtree(work)
    last = rows[-1]
    log.info("dpo done: %d steps, train error %.3f, test error %.3f", steps, last["train_error"], last["test_error"])
    dist.close()
    return info
