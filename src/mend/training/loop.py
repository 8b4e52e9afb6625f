"""The training loop: one function that reads top to bottom, composing this package's parts.

Validation picks the best checkpoint (written to `out`); `out/last` holds the latest state,
from which `resume=True` continues and reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mend.checkpoint import (
    CONFIG_FILE,
    load_editor,
    load_train_state,
    model_identity,
    resave_editor,
    save_editor,
    save_train_state,
)
from mend.config import TrainConfig
from mend.edit import MendEditor, fit_shared
from mend.editor.net import EditorNet
from mend.errors import MendError
from mend.grads import key_moments
from mend.models.params import find_editable
from mend.models.upper import RowCache, UpperStack, bf16_is_fast
from mend.training.logs import LOG_FILE, JsonlLog
from mend.training.mass import ls_step, validate_ls
from mend.training.optim import WeightAverage, apply_update, make_optimizer
from mend.training.prepare import key_batches, nearest_records, warm_rows
from mend.training.sampling import build_rows, similar_index
from mend.training.schedule import batch_size_at, is_late, lr_factor, step_config
from mend.training.step import edit_step, selection_key, validate
from mend.types import EditRequest

log_ = logging.getLogger(__name__)
LAST = "last"  # sub-folder with the latest state, for resume


def train(
    model,
    tokenizer,
    train_data: list[EditRequest],
    val_data: list[EditRequest],
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train an editor for `model`; writes checkpoints, log and plot into `out`.

    Returns:
        A summary: steps run, best validation loss and its metrics, why training stopped.
    """
    out, sched = Path(out), cfg.schedule
    _check_inputs(train_data, val_data, out, resume)
    model.requires_grad_(False)
    model.eval()
    names = [p.name for p in find_editable(model, cfg.editor.edit_modules)]
    identity = model_identity(model, names)
    log = JsonlLog(out / LOG_FILE)
    began = time.perf_counter()  # the passes before the first step count as training time

    net, state = _start(model, names, identity, cfg, out, resume, log)
    net.to(next(model.parameters()).device).train()
    editor = MendEditor(model, tokenizer, net)
    if not resume and not cfg.init_editor and cfg.editor.precondition is not None:
        batches = key_batches(editor, train_data, cfg.key_text)
        net.set_key_moments(key_moments(model, editor.params, batches))
    stack = _upper_stack(model, names, cfg, editor.device)
    opt = make_optimizer(net, sched)
    if resume:
        opt.load_state_dict(state.pop("optimizer"))
    average = WeightAverage(net, sched.ema, state.pop("ema", None)) if sched.ema else None
    averaged = average.swapped if average is not None else nullcontext  # what validation sees
    val_data = val_data[: sched.val_edits]
    similar = _hard_inputs(editor, train_data, cfg, stack, progress)
    least_squares = cfg.editor.aggregate == "ls"  # each step one edit of n requests
    sizes = cfg.sampling.edit_sizes
    if least_squares and max(sizes) > len(train_data):
        raise MendError(f"fewer training edits ({len(train_data)}) than edit size {max(sizes)}")
    n_edits = min(cfg.sampling.edits_per_step, len(train_data))
    n_edits = n_edits // cfg.sampling.batch_size * cfg.sampling.batch_size
    if least_squares:
        n_edits = max(1, sum(sizes) // len(sizes))
    if not n_edits:
        raise MendError(f"fewer training edits ({len(train_data)}) than batch_size")
    check = validate_ls if least_squares else validate

    def save(folder: Path, extra: dict | None = None) -> None:
        with averaged():
            save_editor(folder, net, identity, extra)

    def save_last() -> None:
        extra = {"optimizer": opt.state_dict(), "config": cfg.to_dict()}
        if average is not None:  # `last` holds the average; training goes on from the raw
            extra |= {"ema": average.state_dict(), "raw": [p.detach() for p in net.parameters()]}
        save(out / LAST)
        save_train_state(out / LAST, state | extra)

    # Warm the row cache when the run will meet its rows again and the warm-up fits in half
    # the time budget: it is the first epoch's lower-block work, done several times cheaper.
    epochs = (sched.max_steps - state["step"]) * n_edits / len(train_data)
    if stack is not None and stack.cache is not None and epochs >= 1:
        budget = sched.minutes * 30 if sched.minutes is not None else None
        warm_rows(editor, stack, train_data + val_data, budget_s=budget, progress=progress)

    stop_reason, start = "max_steps", began - state["elapsed"]
    total = sched.max_steps if sched.minutes is None else None  # open-ended with a time budget
    bar = tqdm(total=total, initial=state["step"], disable=not progress, desc="train")
    while state["step"] < sched.max_steps:
        step = state["step"]
        for group, lr in zip(opt.param_groups, (sched.lr, sched.alpha_lr), strict=True):
            group["lr"] = lr * lr_factor(step, cfg)
        rng = random.Random(cfg.seed * 1_000_003 + step)  # the data order depends on (seed, step)
        opt.zero_grad(set_to_none=True)
        scfg = step_config(step, cfg)
        hard = similar[scfg.sampling.hard_locality]
        if least_squares:  # sizes in turn: one editor for single and mass edits
            reqs = rng.sample(train_data, sizes[step % len(sizes)])
            rows = build_rows(reqs, train_data, scfg.sampling, rng, hard, len(reqs))
            stats = ls_step(editor, reqs, rows, scfg, stack)  # (backpropagates itself)
        else:
            reqs, k = rng.sample(train_data, n_edits), batch_size_at(step, cfg)
            rows = build_rows(reqs, train_data, scfg.sampling, rng, hard, k)
            loss, stats = edit_step(editor, reqs, rows, scfg, stack, k)
            loss.backward()
        gnorm = apply_update(net, opt, average, sched.clip)
        state["skipped"] += math.isnan(gnorm)
        state["step"], state["elapsed"] = step + 1, time.perf_counter() - start
        log.write({"step": state["step"], **stats, "grad_norm": gnorm,
                   "lr": opt.param_groups[0]["lr"], "alpha_mean": net.log_alpha.exp().mean().item(),
                   **({"ridge_mean": net.log_ridge.exp().mean().item()} if least_squares else {}),  # fmt: skip
                   "seconds": state["elapsed"]})  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", edit=f"{stats.get('rephrase_acc', 0):.2f}",
                        loc=f"{stats.get('locality_acc', 0):.2f}",
                        min=f"{state['elapsed'] / 60:.1f}/{sched.minutes or '-'}")  # fmt: skip

        out_of_time = sched.minutes is not None and state["elapsed"] >= sched.minutes * 60
        if state["step"] % sched.val_every == 0 or state["step"] >= sched.max_steps or out_of_time:
            with averaged():
                val = check(editor, val_data, cfg, stack)
            # A late locality weight trades validation accuracy for locality on purpose: the
            # checkpoints before it do not compete with the ones it shapes.
            late = is_late(state["step"] - 1, cfg) and not is_late(
                state.get("best_step", 0) - 1, cfg
            )
            improved = selection_key(val) < state["best"] or late
            if improved:
                state |= {"best": selection_key(val), "bad": 0, "best_val": val,
                          "best_step": state["step"]}  # fmt: skip
                save(out, {"best_step": state["step"], "val": val})
            else:
                state["bad"] += 1
            log.write({"step": state["step"], "val": val})
            bar.write(f"step {state['step']}: val loss {val['loss']:.4f} rewrite "
                      f"{val.get('rewrite_acc', 0):.3f} rephrase {val.get('rephrase_acc', 0):.3f} "
                      f"locality {val.get('locality_acc', 0):.3f}" + (" (best)" if improved else ""))  # fmt: skip
            save_last()
            if state["bad"] >= sched.patience:
                stop_reason = "early_stop"
                break
        if out_of_time:
            stop_reason = "time_budget"
            break
    bar.close()
    _finish(model, tokenizer, train_data, cfg, out, progress)
    best_val = state.get("best_val", {})
    return {"steps": state["step"], "best_val_loss": best_val.get("loss"), "stop": stop_reason,
            "best_val": best_val, "skipped_steps": state["skipped"],
            "seconds": state["elapsed"]}  # fmt: skip


def _check_inputs(train_data, val_data, out: Path, resume: bool) -> None:
    if not train_data:
        raise MendError("no training edits")
    if not val_data:
        raise MendError("no validation edits")
    if out.exists() and not out.is_dir():
        raise MendError(f"output folder {out} is an existing file")
    if resume and not (out / LAST).is_dir():
        raise MendError(f"nothing to resume: {out / LAST} does not exist")


def _start(model, names, identity, cfg: TrainConfig, out: Path, resume: bool, log: JsonlLog):
    """(editor networks, loop state): from `out/last` when resuming, else fresh or `init_editor`."""
    if resume:
        net = load_editor(out / LAST, model)
        state = load_train_state(out / LAST)
        if "raw" in state:  # `last` holds the averaged weights, training goes on from the raw
            with torch.no_grad():
                for p, r in zip(net.parameters(), state.pop("raw"), strict=True):
                    p.copy_(r)
        if TrainConfig.from_dict(state["config"]) != cfg:
            log_.warning("resuming with a different configuration than the checkpoint's")
        log.truncate(state["step"])
        return net, state
    torch.manual_seed(cfg.seed)
    if cfg.init_editor:
        net = load_editor(cfg.init_editor, model)
        if net.names != names:
            raise MendError(f"--init editor edits {net.names}, this run {names}")
        net.cfg = dataclasses.replace(net.cfg, aggregate=cfg.editor.aggregate)
        if net.cfg.aggregate == "ls":
            net.learn_ridge()
    else:
        net = EditorNet(identity["params"], cfg.editor)
    out.mkdir(parents=True, exist_ok=True)
    log.path.unlink(missing_ok=True)
    return net, {"step": 0, "best": float("inf"), "bad": 0, "elapsed": 0.0, "skipped": 0}


def _upper_stack(model, names, cfg: TrainConfig, device: torch.device) -> UpperStack | None:
    """The fast path's stack of edited blocks (None: the reference path)."""
    start_block = UpperStack.first_edited_block(model, names)
    if cfg.speed.reference or start_block is None:
        return None
    cache = RowCache(cfg.speed.row_cache_mb << 20) if cfg.speed.row_cache_mb else None
    precision, fast = cfg.speed.lower_precision, bf16_is_fast(device)
    if precision == "bf16" and not fast:
        log_.warning("lower_precision bf16 on %s, which has no fast bf16 units: the pass below "
                     "the edited blocks runs many times slower than in fp32 (use auto)", device)  # fmt: skip
    bf16 = precision == "bf16" or (precision == "auto" and fast)
    return UpperStack(model, start_block, cache, lower_dtype=torch.bfloat16 if bf16 else None)


def _hard_inputs(editor: MendEditor, data, cfg: TrainConfig, stack, progress: bool) -> dict:
    """{hard-locality mode: similar_index} for the modes the run's steps draw by."""
    last = cfg.schedule.max_steps - 1
    modes = dict.fromkeys(step_config(s, cfg).sampling.hard_locality for s in (0, last))
    near = None
    if "nearest" in modes:
        low = stack.lower_dtype if stack is not None else None
        near = nearest_records(editor, data, cfg.sampling.nearest_k, low, progress=progress)
    return {by: similar_index(data, by, near) for by in modes}


def _finish(model, tokenizer, train_data, cfg: TrainConfig, out: Path, progress: bool) -> None:
    """The best checkpoint learns the part of its change every edit shares; curves plotted."""
    if cfg.shared_rank and cfg.editor.aggregate == "sum" and (out / CONFIG_FILE).exists():
        best = load_editor(out, model).to(next(model.parameters()).device)
        editor = MendEditor(model, tokenizer, best)
        fit_shared(editor, train_data[:64], cfg.shared_rank, progress)
        resave_editor(out, best)
    from mend.plots import plot_training

    plot_training(out / LOG_FILE, out / "train_curves.png")
