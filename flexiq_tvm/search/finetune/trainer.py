"""Trains one set of INT8 codes (plus per-channel weight scales and per-level biases) for every
ratio level of a plan: end-to-end distillation ("model") or block-wise reconstruction ("block").

Both hold out part of the calibration inputs, track the held-out loss, keep the best state and stop
when it stops improving; the returned plan records both losses in plan.meta["finetune"].
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace
from typing import Dict

import numpy as np

from ...calibrate.data import load_data
from ...quant.plan import Plan
from .config import FinetuneConfig
from .losses import output_loss
from .qmodel import QuantModel


def _torch():
    import torch

    return torch


def augment_images(x, gen):
    """Random horizontal flips and resized crops (area 40-100 %) of an NCHW batch, same size out."""
    torch = _torch()
    import torch.nn.functional as F

    if x.ndim != 4 or min(x.shape[-2:]) < 16:
        return x
    N, C, H, W = x.shape
    out = []
    for n in range(N):
        area = float(torch.empty(1).uniform_(0.4, 1.0, generator=gen))
        ar = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
        h = max(8, min(H, int(round(math.sqrt(area * H * W / ar)))))
        w = max(8, min(W, int(round(math.sqrt(area * H * W * ar)))))
        i = int(torch.randint(0, H - h + 1, (1,), generator=gen))
        j = int(torch.randint(0, W - w + 1, (1,), generator=gen))
        crop = x[n:n + 1, :, i:i + h, j:j + w]
        if (h, w) != (H, W):
            crop = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)
        if float(torch.rand(1, generator=gen)) < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.cat(out)


# keep_int8: the held-out INT8 loss may rise by this share before a state or plan counts as worse at
# INT8 (the INT8 loss is the smallest and noisiest; with no slack the demo CNN's 40 held-out images
# rejected every improvement; the failure it guards against doubled the loss)
INT8_SLACK = 0.1

def worse_at_int8(before: Dict[float, float], after: Dict[float, float]) -> bool:
    """keep_int8's test: the held-out INT8 loss rose by more than INT8_SLACK (False without an INT8 level)."""
    return 0.0 in before and after[0.0] > before[0.0] * (1 + INT8_SLACK)


FLOOR = 0.1   # a level's loss weight is 1 / max(its initial loss, FLOOR * the mean initial loss)


def level_weights(init: Dict[float, float], power: float = 1.0) -> Dict[float, float]:
    """Per-level loss weights: each level's loss relative to where it started (power 1), so that the
    INT8 level (whose loss is small) is not sacrificed to the 4-bit ones; levels already below FLOOR x
    the mean are capped so that noise-level losses do not dominate. power < 1 flattens the weights
    toward the higher ratios, whose losses start larger."""
    floor = FLOOR * float(np.mean(list(init.values()))) + 1e-12
    return {r: 1.0 / max(v, floor) ** power for r, v in init.items()}


def weighted(losses: Dict[float, float], weights: Dict[float, float]) -> float:
    return float(np.mean([losses[r] * weights[r] for r in losses]))


def source_groups(calib, n: int):
    """Photo of each calibration input when `calib` is an image folder of `<photo>_<NN>.<ext>` crops
    (ImageFolder or a folder path), else None. Held-out splits keep a photo's crops together."""
    import os
    import re

    files = getattr(calib, "files", None)
    if not files and isinstance(calib, (str, os.PathLike)) and os.path.isdir(calib):
        from ...calibrate.images import list_images

        files = list_images(calib)[0]
    if not files or len(files) != n:
        return None
    stems = [re.sub(r"_\d+$", "", os.path.splitext(os.path.basename(f))[0]) for f in files]
    if len(set(stems)) < 2 or len(set(stems)) == n:
        return None
    ids = {s: k for k, s in enumerate(sorted(set(stems)))}
    return np.array([ids[s] for s in stems])


def _split_groups(groups, holdout: float, seed: int):
    """Like _split, over whole groups: round(holdout x groups) groups (at least one) held out."""
    rng = np.random.default_rng(seed)
    uniq = rng.permutation(np.unique(groups))
    n_hold = min(max(int(round(holdout * uniq.size)), 1), uniq.size - 1) if holdout > 0 else 0
    hold = np.isin(groups, uniq[:n_hold])
    return np.flatnonzero(~hold), np.flatnonzero(hold)


def expand_inputs(x, copies: int, gen):
    """x followed by copies - 1 augmented versions of it (flips / resized crops; images only)."""
    torch = _torch()
    if copies <= 1 or x.ndim != 4 or x.shape[0] == 0:
        return x
    return torch.cat([x] + [augment_images(x, gen) for _ in range(copies - 1)])


def _split(n: int, holdout: float, seed: int):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_hold = int(round(holdout * n)) if n >= 2 else 0
    if holdout > 0 and n >= 2:
        n_hold = min(max(n_hold, 1), n - 1)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


class _State:
    """Snapshot / restore of the trainable tensors, and the early stop on the held-out loss that
    decides when to snapshot (both training loops share it)."""

    def __init__(self, params, best_loss: float = math.inf, patience: int = 1, min_delta: float = 0.0):
        self.params = params
        self.best = [p.detach().clone() for p in params]
        self.best_loss, self.patience, self.min_delta, self.bad = best_loss, patience, min_delta, 0

    def offer(self, loss: float) -> bool:
        """A held-out loss: snapshot when it improves on the best by more than `min_delta`; True once
        `patience` evaluations in a row have not."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.bad = loss, 0
            self.save()
            return False
        self.bad += 1
        return self.bad >= self.patience

    def save(self):
        self.best = [p.detach().clone() for p in self.params]

    def restore(self):
        torch = _torch()
        with torch.no_grad():
            for p, b in zip(self.params, self.best):
                p.copy_(b)


def _batches(x, size):
    return [x[s:s + size] for s in range(0, x.shape[0], size)]


def heldout_kl(qm: QuantModel, x, teacher_out, levels, batch: int = 16) -> Dict[float, float]:
    """Held-out distillation loss per level (KL for logits, relative MSE otherwise)."""
    torch = _torch()
    out = {}
    logits = teacher_out.ndim == 2
    with torch.no_grad():
        for r in levels:
            ys = torch.cat([qm.student(xb, r) for xb in _batches(x, batch)])
            out[float(r)] = float(output_loss(teacher_out, ys, logits))
    return out


def finetune_plan(model, plan: Plan, calib, cfg: FinetuneConfig, progress: bool = True) -> Plan:
    torch = _torch()

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    inputs, _ = load_data(calib, model, what="calibration data")
    groups = source_groups(calib, inputs.shape[0]) if cfg.holdout_by_source else None
    if cfg.holdout_by_source and groups is None:
        warnings.warn("finetune: holdout_by_source needs calibration data from an image folder of "
                      "<photo>_<NN> crops (an ImageFolder or its path); holding out single inputs instead")
    if groups is not None:
        train_idx, hold_idx = _split_groups(groups, cfg.holdout, cfg.seed)
    else:
        train_idx, hold_idx = _split(inputs.shape[0], cfg.holdout, cfg.seed)
    x_train = torch.tensor(inputs[train_idx])
    x_hold = torch.tensor(inputs[hold_idx]) if hold_idx.size else x_train[:0]
    qm = QuantModel(model, plan)
    levels = qm.levels
    train_bias = bool(cfg.bias)
    qm._bias_trained = train_bias
    for l in qm.layers:
        l.train_wscale = cfg.scale_lr > 0
        l.train_ascale = cfg.ascale_lr > 0
        l.latent0 = l.latent.detach().clone()
        if cfg.rounding == "learned":
            l.enable_learned_rounding()
    with torch.no_grad():
        t_hold = torch.cat([qm.teacher(xb) for xb in _batches(x_hold, 16)]) if hold_idx.size else None
    eval_x = x_hold if hold_idx.size else x_train
    with torch.no_grad():
        eval_t = t_hold if t_hold is not None else torch.cat([qm.teacher(xb) for xb in _batches(x_train, 16)])
    before = heldout_kl(qm, eval_x, eval_t, levels)
    report = {"method": cfg.method, "config": cfg.to_dict(), "train_samples": int(train_idx.size),
              "heldout_samples": int(hold_idx.size), "heldout_by_source": groups is not None,
              "heldout_before": before}
    if cfg.method == "model":
        hist = _train_model(qm, x_train, eval_x, eval_t, cfg, progress, t0)
    else:
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        hist = _train_blocks(qm, expand_inputs(x_train, cfg.train_copies, gen), eval_x, cfg, progress, t0,
                             steps_n=x_train.shape[0])
        if cfg.final_epochs > 0 and eval_t.ndim == 2:
            report["after_blocks"] = heldout_kl(qm, eval_x, eval_t, levels)
            final = replace(cfg, epochs=cfg.final_epochs, lr=cfg.final_lr, scale_lr=cfg.scale_lr * cfg.final_lr / cfg.lr,
                            ascale_lr=cfg.ascale_lr * cfg.final_lr / cfg.lr)
            hist["final"] = _train_model(qm, x_train, eval_x, eval_t, final, progress, t0)
    after = heldout_kl(qm, eval_x, eval_t, levels)
    report.update(hist)
    report["heldout_after"] = after
    # the keep/revert guard always compares each level's loss relative to where it started (power 1),
    # whatever level_power trained with: a lower power would let the all-4-bit level's large, noisy loss decide
    guard = level_weights(before)
    mean_b, mean_a = weighted(before, guard), weighted(after, guard)
    report["heldout_weighted_before"], report["heldout_weighted_after"] = mean_b, mean_a
    report["seconds"] = round(time.perf_counter() - t0, 1)
    int8_worse = cfg.keep_int8 and worse_at_int8(before, after)
    report["int8_worse"] = bool(int8_worse)
    if mean_a >= mean_b or int8_worse:
        # the guard: finetuning made the held-out loss worse (in all, or at INT8 with keep_int8), keep
        # the plan as it was
        new = Plan.loads(plan.dumps())
        report["kept"] = False
    else:
        new = qm.to_plan(bias=train_bias)
        report["kept"] = True
    new.meta["finetune"] = report
    new.timings = dict(getattr(plan, "timings", {}))
    new.timings["finetune"] = report["seconds"]
    if progress:
        print(f"finetune ({cfg.method}): held-out loss (weighted over {len(levels)} levels) {mean_b:.4f} -> {mean_a:.4f}"
              f"{'' if report['kept'] else ' (worse' + (' at INT8' if int8_worse else '') + ': plan kept unchanged)'}"
              f" in {report['seconds']:.0f} s", flush=True)
    return new


def _optimizer(qm: QuantModel, cfg: FinetuneConfig, layers=None):
    torch = _torch()
    layers = qm.layers if layers is None else [qm.layers[i] for i in layers]
    learned = cfg.rounding == "learned"
    groups = [{"params": [p for l in layers for p in l.parameters(codes=True)],
               "lr": cfg.round_lr if learned else cfg.lr}]
    if cfg.scale_lr > 0:
        groups.append({"params": [l.log_wscale for l in layers], "lr": cfg.scale_lr})
    if cfg.ascale_lr > 0:
        groups.append({"params": [l.log_ascale for l in layers], "lr": cfg.ascale_lr})
    if cfg.bias:
        groups.append({"params": [p for l in layers for p in l.bias_delta.values()], "lr": cfg.lr * 0.05})
    params = [p for g in groups for p in g["params"]]
    return torch.optim.Adam(groups), params


def _clamp_codes(layers, radius):
    """Keeps every latent code within `radius` of its starting value (cfg.code_radius)."""
    if radius is None:
        return
    torch = _torch()
    with torch.no_grad():
        for l in layers:
            l.latent.copy_(torch.minimum(torch.maximum(l.latent, l.latent0 - radius), l.latent0 + radius))


def _pick_levels(levels, k, gen):
    """INT8 (level 0) every step, plus k - 1 other levels drawn at random."""
    torch = _torch()
    k = min(k, len(levels))
    rest = [r for r in levels if r != 0.0]
    picked = [0.0] if 0.0 in levels else []
    idx = torch.randperm(len(rest), generator=gen)[:k - len(picked)].tolist()
    return picked + [rest[i] for i in idx]


def _train_model(qm, x_train, x_eval, t_eval, cfg, progress, t0):
    """End-to-end: KL of the logits to FP32 on augmented training inputs, levels sampled per step."""
    torch = _torch()
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    opt, params = _optimizer(qm, cfg)
    n = x_train.shape[0]
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    logits = t_eval.ndim == 2
    init = heldout_kl(qm, x_eval, t_eval, qm.levels)
    norm = level_weights(init, cfg.level_power)
    state = _State(params, weighted(init, norm), cfg.patience, min_delta=1e-6)
    history, step = [{"step": 0, "heldout": state.best_loss}], 0
    bar = tqdm(total=total, desc="finetune (model)", disable=not progress, leave=False)
    stopped = "epochs"
    for step in range(1, total + 1):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        xb = x_train[idx]
        if cfg.augment:
            xb = augment_images(xb, gen)
        with torch.no_grad():
            tb = qm.teacher(xb)
        opt.zero_grad()
        loss_v = 0.0
        for r in _pick_levels(qm.levels, cfg.levels_per_step, gen):
            loss = output_loss(tb, qm.student(xb, r), logits)
            (loss * norm[r]).backward()
            loss_v += float(loss.detach())
        opt.step()
        _clamp_codes(qm.layers, cfg.code_radius)
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.4f}", best=f"{state.best_loss:.4f}")
        if step % eval_every == 0 or step == total:
            h = weighted(heldout_kl(qm, x_eval, t_eval, qm.levels), norm)
            history.append({"step": step, "train": loss_v, "heldout": h})
            if state.offer(h):
                stopped = "heldout loss stopped improving"
                break
        if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
            stopped = "max_seconds"
            break
    bar.close()
    state.restore()
    return {"steps": step, "stopped": stopped, "history": history}


def _blocks(qm: QuantModel, min_layers: int):
    """(start, stop) binding ranges, each with >= min_layers FlexiQ layers (the last takes the rest)."""
    g = qm.graph
    cuts = g.cuts()
    bounds = [0] + cuts + [len(g.bindings)]
    blocks, start = [], 0
    for k in range(1, len(bounds)):
        stop = bounds[k]
        if len(g.layers_between(start, stop)) >= min_layers and stop < len(g.bindings):
            blocks.append((start, stop))
            start = stop
    if start < len(g.bindings):
        if blocks and not g.layers_between(start, len(g.bindings)):
            blocks[-1] = (blocks[-1][0], len(g.bindings))
        else:
            blocks.append((start, len(g.bindings)))
    return [b for b in blocks if g.layers_between(*b)] or [(0, len(g.bindings))]


def _anneal_beta(step: int, total: int, warmup: float, start: float = 20.0, end: float = 2.0):
    """AdaRound's regulariser exponent: None during the warm-up share of the steps, then from
    `start` (only h near 0.5 is pushed) down to `end` (every h pushed to 0 or 1)."""
    w = int(warmup * total)
    if step <= w:
        return None
    return start - (start - end) * (step - w) / max(1, total - w)


def _run_block(qm, start, stop, x, layer_fn):
    g = qm.graph
    entry = g.param if start == 0 else g.bindings[start - 1].var
    env = {entry: x}
    sym = g.symbols_batch(x.shape[0])
    g.run_range(env, sym, start, stop, layer_fn)
    if stop == len(g.bindings):
        return g._val(g.output, env, sym)
    return env[g.bindings[stop - 1].var]


def _train_blocks(qm, x_train, x_eval, cfg, progress, t0, steps_n=None):
    """Block by block: each block's output at every sampled level matched to FP32's (relative MSE;
    KL for the model's logits), its inputs those of the finetuned quantized blocks before it.
    An epoch is ceil(steps_n / batch_size) steps (steps_n: the training inputs before any augmented
    copies were appended), batches drawn from all of x_train."""
    torch = _torch()
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    blocks = _blocks(qm, cfg.block_layers)
    levels = qm.levels
    g = qm.graph
    # cached block inputs: FP32 (teacher) and quantized at every level, for train and held-out inputs
    fp_tr, fp_ev = x_train, x_eval
    q_tr = {r: x_train for r in levels}
    q_ev = {r: x_eval for r in levels}
    n = x_train.shape[0]
    steps_per_epoch = max(1, math.ceil((steps_n or n) / cfg.batch_size))
    per_block = []
    total_steps = 0
    learned = cfg.rounding == "learned"
    block_steps = cfg.round_steps if learned and cfg.round_steps else cfg.epochs * steps_per_epoch
    bar = tqdm(total=len(blocks) * block_steps, desc="finetune (blocks)", disable=not progress, leave=False)
    for b, (start, stop) in enumerate(blocks):
        layer_ids = g.layers_between(start, stop)
        last = stop == len(g.bindings)
        with torch.no_grad():
            t_tr = torch.cat([_run_block(qm, start, stop, xb, qm.float_layer)
                              for xb in _batches(fp_tr, 16)])
            t_ev = torch.cat([_run_block(qm, start, stop, xb, qm.float_layer)
                              for xb in _batches(fp_ev, 16)])
        logits = last and t_tr.ndim == 2

        def loss_on(qx, tgt, r):
            y = _run_block(qm, start, stop, qx, qm.layer_fn(r))
            return output_loss(tgt, y, logits)

        def heldout():
            with torch.no_grad():
                vals = {}
                for r in levels:
                    ys = torch.cat([_run_block(qm, start, stop, xb, qm.layer_fn(r))
                                    for xb in _batches(q_ev[r], 16)])
                    vals[r] = float(output_loss(t_ev, ys, logits))
            return vals

        opt, params = _optimizer(qm, cfg, layer_ids)
        t_block = time.perf_counter()
        deadline = None
        if cfg.max_seconds:
            # the time left, shared equally by the blocks still to train
            deadline = time.perf_counter() + max(0.0, cfg.max_seconds - (time.perf_counter() - t0)) / (len(blocks) - b)
        block_layers = [qm.layers[i] for i in layer_ids]
        total = block_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        init = heldout()
        norm = level_weights(init, cfg.level_power)
        first = weighted(init, norm)
        # learned rounding settles gradually (the regulariser's annealing): no early stop, the best
        # settled state seen at the evaluations is kept
        state = _State(params, first, 10 ** 9 if learned else cfg.patience, min_delta=1e-7)
        hist, stopped = [], "epochs" if not learned else "steps"
        eval_every = cfg.eval_every or (max(1, total // 8) if learned else steps_per_epoch)
        step = 0
        if True:
            for step in range(1, total + 1):
                idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
                opt.zero_grad()
                lv = 0.0
                for l in block_layers:
                    l.soft_rounding = learned
                for r in _pick_levels(levels, cfg.levels_per_step, gen):
                    loss = loss_on(q_tr[r][idx], t_tr[idx], r)
                    (loss * norm[r]).backward()
                    lv += float(loss.detach())
                beta = _anneal_beta(step, total, cfg.round_warmup)
                if learned and beta is not None:
                    reg = cfg.round_reg * sum(l.round_regulariser(beta) for l in block_layers)
                    reg.backward()
                for l in block_layers:
                    l.soft_rounding = False
                opt.step()
                _clamp_codes(block_layers, cfg.code_radius)
                sched.step()
                bar.update(1)
                if step % eval_every == 0 or step == total:
                    vals = heldout()
                    h = weighted(vals, norm)
                    hist.append(h)
                    if cfg.keep_int8 and worse_at_int8(init, vals):
                        h = math.inf      # never keep a state that is worse at INT8 on the held-out inputs
                    if state.offer(h):
                        stopped = "heldout loss stopped improving"
                        break
                if deadline is not None and time.perf_counter() > deadline:
                    stopped = "time budget"
                    break
            state.restore()
        total_steps += step
        per_block.append({"layers": [qm.layers[i].spec.name for i in layer_ids], "steps": step,
                          "heldout_before": init, "heldout_rel_after": state.best_loss, "stopped": stopped,
                          "seconds": round(time.perf_counter() - t_block, 1),
                          **({"flipped": [round(l.flipped_share(), 4) for l in block_layers]} if learned else {})})
        bar.set_postfix(block=f"{b + 1}/{len(blocks)}", heldout=f"{first:.4f}->{state.best_loss:.4f}")
        if not last:
            with torch.no_grad():
                fp_tr = torch.cat([_run_block(qm, start, stop, xb, qm.float_layer)
                                   for xb in _batches(fp_tr, 16)])
                fp_ev = torch.cat([_run_block(qm, start, stop, xb, qm.float_layer)
                                   for xb in _batches(fp_ev, 16)])
                for r in levels:
                    f = qm.layer_fn(r)
                    q_tr[r] = torch.cat([_run_block(qm, start, stop, xb, f)
                                         for xb in _batches(q_tr[r], 16)])
                    q_ev[r] = torch.cat([_run_block(qm, start, stop, xb, f)
                                         for xb in _batches(q_ev[r], 16)])
    bar.close()
    return {"steps": total_steps, "blocks": per_block}
