"""The training loop: one readable function, with validation, best checkpoint, early stop, resume.

Each step edits `batch_size` independent facts side by side (every row of the batch carries its
own low-rank edit, see edit.py), so a step costs three batched forward passes of the base model:
the edit inputs (with backward through the edited blocks), the paraphrases and locality inputs
under their edits, and the locality inputs under the base model.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
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
from mend.data.collate import IGNORE, TokenBatch, encode
from mend.data.sources import resolve_data
from mend.data.text import read_text, token_windows
from mend.edit import MendEditor, fit_shared
from mend.editor.net import Editor
from mend.errors import MendError
from mend.grads import capture, key_moments, prompt_keys
from mend.losses import edit_loss, gap_hinge, kl_base_edited, masked_nll, relative_change
from mend.metrics import all_correct, argmax_unchanged
from mend.models.forward import scored_logits
from mend.models.params import find_editable, swapped_data
from mend.models.upper import RowCache, UpperStack, bf16_is_fast
from mend.shield import unit_rows
from mend.types import EditRequest, Probe

log = logging.getLogger(__name__)
LAST = "last"  # sub-folder with the latest state, for --resume
LOG_FILE = "train_log.jsonl"


@dataclass
class StepRows:
    """The paraphrase and locality rows of one step, each tagged with its edit's index."""

    gen: list[tuple[str, str]]
    gen_group: list[int]
    gen_is_prompt: list[bool]
    loc: list[tuple[str, str | None]]
    loc_group: list[int]
    loc_own: list[bool]  # the edit's own probe (scored for locality accuracy)


def _probe_from(req: EditRequest) -> Probe:
    """Another record used as a locality input: its prompt, with its true answer if known."""
    return Probe(req.prompt, req.target_true)


def relation_key(prompt: str) -> str:
    """The last two words of a prompt: a cheap stand-in for its relation ("located in")."""
    return " ".join(prompt.lower().split()[-2:])


def similar_key(r: EditRequest, by: str = "relation") -> str:
    """What makes two records each other's hard locality inputs.

    "relation": prompts that end alike (`relation_key`). "answer": the same true answer,
    where known (else the relation): CounterFact's neighbourhood probes are other subjects
    with the edited subject's true answer, the inputs an edit most easily carries along
    ("French" speakers made "Russian" speakers with the edited one). "nearest": the record
    itself, whose list `similar_index` takes from `nearest_records`.
    """
    if by == "nearest":
        return "prompt:" + r.prompt
    if by == "answer" and r.target_true:
        return "answer:" + r.target_true
    return "relation:" + relation_key(r.prompt)


def similar_index(
    pool: list[EditRequest], by: str = "relation", near: list[list[int]] | None = None
) -> dict[str, list[int]]:
    """Records grouped by `similar_key`: hard locality inputs (a like fact of another subject).

    Each record is also listed under its relation, where a record without a true answer looks.
    By "nearest", `near[i]` (from `nearest_records`) is pool record i's own group.
    """
    if by == "nearest" and (near is None or len(near) != len(pool)):
        raise MendError("hard_locality 'nearest' needs one list of nearest records per record")
    index: dict[str, list[int]] = {}
    for i, r in enumerate(pool):
        if by == "nearest":  # its own list (a copy), which does not hold the record itself
            index[similar_key(r, by)] = list(near[i])
            keys = [similar_key(r, "relation")]
        else:
            keys = dict.fromkeys((similar_key(r, by), similar_key(r, "relation")))
        for key in keys:
            index.setdefault(key, []).append(i)
    return index


def nearest_records(
    me: MendEditor,
    pool: list[EditRequest],
    k: int,
    lower: torch.dtype | None = None,
    chunk: int = 64,
    progress: bool = True,
) -> list[list[int]]:
    """Per pool record, the k other records an edit of it most easily spills onto, nearest first.

    Nearness is the cosine of the prompts' inputs to the first edited weight at the prompt's
    last token (the input an edit's rank-one change acts on in proportion), and records with
    the same true answer (the one the edit takes away) come first: the k nearest of them,
    topped up with the nearest others when fewer share it.

    Args:
        lower: dtype to autocast the base model's forward passes to (e.g. bf16), or None.
    """
    param = me.params[0]
    order, _ = _by_tokens(me, [(r.prompt, None) for r in pool])
    chunks = range(0, len(order), chunk)
    batches = (me.batch([(pool[j].prompt, None) for j in order[i : i + chunk]]) for i in chunks)
    bar = tqdm(batches, total=len(chunks), desc="prompt keys", disable=not progress, leave=False)
    with torch.autocast(me.device.type, dtype=lower or torch.bfloat16, enabled=lower is not None):
        sorted_keys = prompt_keys(me.model, param, bar)
    keys = torch.empty_like(sorted_keys)
    keys[torch.tensor(order, dtype=torch.long, device=keys.device)] = sorted_keys
    unit = unit_rows(keys)
    answers: dict[str, int] = {}
    answer = torch.tensor([answers.setdefault(r.target_true, len(answers)) if r.target_true
                           else -1 for r in pool])  # fmt: skip
    near = []
    for i in range(0, len(pool), 1024):
        sims = unit[i : i + 1024] @ unit.T  # (rows, pool), cosines in [-1, 1]
        rows = answer[i : i + 1024, None]
        sims = sims + 2.0 * ((rows == answer[None]) & (rows >= 0))  # same answer first
        sims[torch.arange(len(sims)), torch.arange(i, i + len(sims))] = float("-inf")
        near += sims.topk(min(k, len(pool) - 1), dim=1).indices.tolist()
    return near


def build_rows(
    reqs: list[EditRequest],
    pool: list[EditRequest],
    cfg: TrainConfig,
    rng: random.Random | None,
    similar: dict[str, list[int]] | None = None,
    joint: int = 1,
) -> StepRows:
    """Paraphrase rows (generalisation) and locality rows for a set of edits.

    With an rng (training) one paraphrase is sampled per edit and `loc_per_edit` extra locality
    inputs are drawn from other records, half of them (when `similar`, a `similar_index` by
    `cfg.hard_locality`, is given) from records like this one: the same relation or the same
    true answer about another subject, the inputs an edit most easily spills onto. Without an
    rng (validation) every paraphrase is used and a record with no locality probe borrows the
    next record of the pool. With `joint` > 1, every `joint` consecutive edits form one
    batched edit, and their rows are scored under it.
    """
    rows = StepRows([], [], [], [], [], [])
    for i, r in enumerate(reqs):
        prompts = [r.prompt] if (cfg.edit_loss_on_prompt or not r.rephrases or rng is None) else []
        reph = list(r.rephrases)
        if rng is not None and reph:
            reph = [rng.choice(reph)]
        for p in prompts + reph:
            rows.gen.append((p, r.target))
            rows.gen_group.append(i // joint)
            rows.gen_is_prompt.append(p == r.prompt and p not in reph)
        own = list(r.locality)
        if not own and rng is None:
            own = [_probe_from(pool[(pool.index(r) + 1) % len(pool)])] if r in pool else []
        extra = []
        if rng is not None:
            n_hard = cfg.loc_per_edit // 2 if similar else 0
            near = similar.get(similar_key(r, cfg.hard_locality), []) if similar else []
            picks = [rng.choice(near) for _ in range(n_hard) if len(near) > 1]
            picks += [rng.randrange(len(pool)) for _ in range(cfg.loc_per_edit - len(picks))]
            extra = [_probe_from(pool[j]) for j in picks]
            extra = [p for p in extra if p.prompt != r.prompt]
        for j, probe in enumerate(own + extra):
            rows.loc.append((probe.prompt, probe.answer))
            rows.loc_group.append(i // joint)
            rows.loc_own.append(j < len(own))
    return rows


def record_rows(r: EditRequest) -> list[tuple[str, str | None]]:
    """A record's own rows: the edit, each paraphrase with the target, each locality probe."""
    return ([(r.prompt, r.target)] + [(p, r.target) for p in r.rephrases]
            + [(probe.prompt, probe.answer) for probe in r.locality])  # fmt: skip


def key_pairs(data: list[EditRequest], n_records: int = 512) -> list[tuple[str, str | None]]:
    """Texts whose edited-layer inputs estimate the key moments: the first records' rows."""
    return [pair for r in data[:n_records] for pair in record_rows(r)]


def _by_tokens(me: MendEditor, pairs: list[tuple[str, str | None]]):
    """(order, sizes): the pairs' indices shortest first by token count, and those counts.

    Batching rows of equal token length wastes little on padding: ordered by characters, 38%
    of the tokens CounterFact's warm-up ran were padding (4% by tokens).
    """
    lengths = [len(encode(me.tokenizer, p, t, me.max_len)[0]) for p, t in pairs]
    order = sorted(range(len(pairs)), key=lengths.__getitem__)
    return order, [lengths[i] for i in order]


def warm_rows(
    me: MendEditor,
    stack: UpperStack,
    data: list[EditRequest],
    batch_rows: int = 64,
    budget_s: float | None = None,
    progress: bool = True,
) -> bool:
    """Fill the stack's RowCache with every row a step can draw from data, before training.

    That is each record's own rows and the record as another edit's locality input. Met a few
    at a time in the first epoch's steps, a new row cost about 3x as much lower-block time as
    here, in batches of equal token length; and with ~4 locality inputs per edit drawn at random, a
    tenth of the second epoch's rows were still new. Shortest rows first, until the cache is
    full. Deterministic, so a resumed run fills the same cache.

    Args:
        budget_s: give up (leaving the rows to be cached as steps meet them) as soon as the
            whole warm-up is projected, from the tokens done so far, to take longer than this.

    Returns:
        Whether every row (or as many as the cache holds) was warmed.
    """
    as_probe = (_probe_from(r) for r in data)
    pairs = list(dict.fromkeys(
        [pair for r in data for pair in record_rows(r)] + [(q.prompt, q.answer) for q in as_probe]
    ))  # fmt: skip
    order, size = _by_tokens(me, pairs)
    todo = [pairs[i] for i in order]
    total, done, start = sum(size), 0, time.perf_counter()
    chunks = range(0, len(todo), batch_rows)
    for i in tqdm(chunks, desc="cache rows", unit="batch", disable=not progress, leave=False):
        if stack.cache.full:
            break
        if budget_s is not None and done:
            projected = (time.perf_counter() - start) * total / done
            if projected > budget_s:
                log.info("row cache warm-up skipped (%.0f s projected)", projected)
                return False
        stack.prepare(me.batch(todo[i : i + batch_rows]), base_logits=False)
        done += sum(size[i : i + batch_rows])
    return True


def text_windows(me: MendEditor, text: str, n_tokens: int, window: int = 128) -> list[TokenBatch]:
    """About n_tokens of `text` as full windows of `window` tokens, 16 windows per batch."""
    window = min(window, me.max_len)
    x = token_windows(me.tokenizer, text, max(1, -(-n_tokens // window)), window)
    return [
        TokenBatch(
            rows, torch.ones_like(rows), torch.zeros_like(rows, dtype=torch.bool),
            torch.full_like(rows, IGNORE), torch.arange(len(rows)),
        ).to(me.device)
        for rows in x.split(16)
    ]  # fmt: skip


def key_batches(me: MendEditor, data: list[EditRequest], cfg: TrainConfig) -> list[TokenBatch]:
    """The inputs whose edited-layer keys estimate C for the preconditioner.

    The training texts are the inputs an edit must leave alone most nearly (other subjects
    of the same relation). `cfg.key_text` adds as many tokens of general text in 128-token
    windows: keys from short prompts alone leave directions that long running text uses
    unmeasured, and P = (C/m + lambda I)^-1 then amplifies exactly those, which raised
    WikiText perplexity after a single edit from 16.2 to 24.8 (median of 8 edits).
    """
    pairs = key_pairs(data)
    batches = [me.batch(pairs[i : i + 64]) for i in range(0, len(pairs), 64)]
    if cfg.key_text:
        try:
            text = read_text(resolve_data(cfg.key_text))
        except MendError as e:
            log.warning("%s; estimating key statistics from the training texts only", e)
        else:
            n_tokens = sum(int(b.attention_mask.sum()) for b in batches)
            batches += text_windows(me, text, n_tokens)
    return batches


def _forward_reference(me: MendEditor, reqs: list[EditRequest], rows: StepRows, joint: int = 1):
    """Straightforward path: full forward passes for the edit, the edited rows and the base rows."""
    factors = me.factors(me.batch([(r.prompt, r.target) for r in reqs]), rows_per_edit=joint)
    both = me.batch(rows.gen + rows.loc, rows.gen_group + rows.loc_group)
    with me.applied(factors, both.group):
        edited = scored_logits(me.model, both)  # (P_gen + P_loc, V)
    rows_of = both.pos_row
    base = None
    if rows.loc:
        with torch.no_grad():
            base = scored_logits(me.model, me.batch(rows.loc, rows.loc_group))
    return factors, edited, base, rows_of, both.labels[both.pos_mask]


def _forward_fast(
    me: MendEditor, stack: UpperStack, reqs: list[EditRequest], rows: StepRows, joint: int = 1
):
    """Same results as `_forward_reference`, running the lower blocks once, without gradients.

    The edit, paraphrase and locality rows are three tightly padded batches. A no-grad pass
    of each caches the input of the first edited block and the unedited final states; the
    edit's gradient and the edited states then rerun only the upper blocks. With the stack's
    RowCache, rows seen before skip the lower blocks altogether. One vocabulary projection
    serves the edited paraphrase and locality states and the unedited locality states.
    """
    edit_b = me.batch([(r.prompt, r.target) for r in reqs])
    edit_p = stack.prepare(edit_b, base_logits=False)
    captured, _ = capture(
        me.model,
        me.params,
        edit_b,
        lambda lg: edit_loss(lg, edit_b),
        run=lambda: stack.logits(edit_p, scored_only=False),  # capture sees every position
    )
    factors = me.factors(edit_b, rows_per_edit=joint, captured=captured)
    hidden, rows_of, labels, base_hidden = [], [], [], None
    for pairs, groups, is_loc in ((rows.gen, rows.gen_group, False), (rows.loc, rows.loc_group, True)):  # fmt: skip
        if not pairs:
            continue
        b = me.batch(pairs, groups)
        prepared = stack.prepare(b, base_logits=False)
        with me.applied(factors, b.group):
            hidden.append(stack.scored_hidden(prepared))
        rows_of.append(b.pos_row + (len(rows.gen) if is_loc else 0))
        labels.append(b.labels[b.pos_mask])
        if is_loc:
            base_hidden = prepared.base_hidden
    n_edited = sum(len(h) for h in hidden)
    logits = stack.project_with_base(torch.cat(hidden), base_hidden)
    base = logits[n_edited:].detach() if base_hidden is not None else None
    return factors, logits[:n_edited], base, torch.cat(rows_of), torch.cat(labels)


def edit_step(
    me: MendEditor,
    reqs: list[EditRequest],
    rows: StepRows,
    cfg: TrainConfig,
    stack=None,
    joint: int = 1,
):
    """Losses (and accuracies) of editing each of reqs independently, or `joint` at a time.

    Args:
        rows: from `build_rows` with the same `joint`.
        stack: an UpperStack for the fast path; None runs the reference path.
        joint: edits per batched edit (1: every edit alone).

    Returns:
        (loss with graph into the editor, dict of float statistics).
    """
    if stack is None:
        factors, logits, base, rows_of, labels = _forward_reference(me, reqs, rows, joint)
    else:
        factors, logits, base, rows_of, labels = _forward_fast(me, stack, reqs, rows, joint)
    n_gen = len(rows.gen)
    gen_pos = rows_of < n_gen
    l_edit = masked_nll(logits[gen_pos], labels[gen_pos], rows_of[gen_pos], n_gen)
    gen_ok = all_correct(logits[gen_pos], labels[gen_pos], rows_of[gen_pos], n_gen)
    stats = {"l_edit": l_edit.item()}
    is_prompt = torch.tensor(rows.gen_is_prompt, device=gen_ok.device)
    if is_prompt.any():
        stats["rewrite_acc"] = gen_ok[is_prompt].float().mean().item()
    if (~is_prompt).any():
        stats["rephrase_acc"] = gen_ok[~is_prompt].float().mean().item()
    l_loc = l_gap = logits.sum() * 0
    if base is not None:
        edited = logits[~gen_pos]
        l_loc = kl_base_edited(base, edited)
        n_loc = len(rows.loc)
        same = argmax_unchanged(base, edited, rows_of[~gen_pos] - n_gen, n_loc)
        own = torch.tensor(rows.loc_own, device=same.device)
        if own.any():
            stats["locality_acc"] = same[own].float().mean().item()
        stats["l_loc"] = l_loc.item()
        if cfg.c_gap:
            l_gap = gap_hinge(base, edited)
            stats["l_gap"] = l_gap.item()
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.c_size > 0):
        l_size = edit_size(me, factors)
    stats["rel_change"] = l_size.item()
    loss = cfg.c_edit * l_edit + cfg.c_loc * l_loc + cfg.c_gap * l_gap + cfg.c_size * l_size
    stats["loss"] = loss.item()
    return loss, stats


def edit_size(me: MendEditor, factors) -> torch.Tensor:
    """Mean over edits of sum over matrices of ||Delta W||_F^2 / ||W||_F^2 (losses.relative_change).

    W is the weight as the editor found it (training never moves it).
    """
    total = 0
    for p in me.params:
        if p.name in factors:
            alpha = me.editor.alpha(p.name)
            total = total + relative_change(*factors[p.name], alpha, me.anchor_norm_sq(p.name))
    return total.mean()


def validate(
    me: MendEditor, val: list[EditRequest], cfg: TrainConfig, stack=None
) -> dict[str, float]:
    """Mean losses and accuracies over the validation edits (editor frozen, stats fixed)."""
    me.editor.eval()
    totals: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(0, len(val), cfg.batch_size):
            reqs = val[i : i + cfg.batch_size]
            _, stats = edit_step(me, reqs, build_rows(reqs, val, cfg, None), cfg, stack)
            for k, v in stats.items():
                totals.setdefault(k, []).append(v * len(reqs))
    me.editor.train()
    return {k: sum(v) / len(val) for k, v in totals.items()}


def selection_key(val: dict[str, float], select: str) -> float:
    """How good a validation result is for choosing the checkpoint; lower is better.

    "loss" is the training objective. "accuracy" is one minus the mean of the rewrite,
    rephrase and locality accuracies, ties broken by the loss. The loss and the accuracies
    can disagree: late in training the KL on a few locality probes may grow while every
    accuracy still rises, and choosing by loss then keeps a weaker editor.
    """
    if select == "loss":
        return val["loss"]
    accs = [val[k] for k in ("rewrite_acc", "rephrase_acc", "locality_acc") if k in val]
    return 1 - sum(accs) / len(accs) + 1e-4 * val["loss"]


def joint_at(step: int, cfg: TrainConfig) -> int:
    """Edits per batched edit at this step: cfg.joint_edits on a cfg.joint_fraction share of
    the steps, spread evenly (a pure function of the step, like the schedule), else 1."""
    f = cfg.joint_fraction
    return cfg.joint_edits if math.floor((step + 1) * f) > math.floor(step * f) else 1


def is_late(step: int, cfg: TrainConfig) -> bool:
    """Whether step (0-based) runs with the late locality weight (a pure function of the step,
    like the schedule, so --resume stays exact)."""
    return bool(cfg.c_loc_late) and step >= cfg.late_fraction * cfg.max_steps


def step_config(step: int, cfg: TrainConfig) -> TrainConfig:
    """The configuration of one step: in the late part of the run c_loc_late replaces c_loc,
    and hard_locality_late (where set) hard_locality."""
    if not is_late(step, cfg):
        return cfg
    return replace(
        cfg, c_loc=cfg.c_loc_late, hard_locality=cfg.hard_locality_late or cfg.hard_locality
    )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then (if cfg.cosine) a cosine decay to 10% at max_steps.

    A pure function of the step, so a resumed run follows the same schedule.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if not cfg.cosine:
        return warm
    progress = min(1.0, step / cfg.max_steps)
    return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class WeightAverage:
    """An exponential moving average of a module's parameters, swapped in to score or save.

    Buffers are not averaged: the editor's running statistics and preconditioner are used as
    they are now. The decay ramps up as min(decay, (1 + n) / (10 + n)) over the n updates
    so far, so the first averages are not held at the initial weights.
    """

    def __init__(self, module: torch.nn.Module, decay: float, state: dict | None = None):
        self.params = list(module.parameters())
        self.decay = decay
        if state is None:
            self.n, self.avg = 0, [p.detach().clone() for p in self.params]
        else:
            self.n = state["n"]
            self.avg = [
                a.to(p.device, p.dtype) for a, p in zip(state["avg"], self.params, strict=True)
            ]

    def update(self) -> None:
        self.n += 1
        weight = 1 - min(self.decay, (1 + self.n) / (10 + self.n))
        with torch.no_grad():
            torch._foreach_lerp_(self.avg, self.params, weight)

    def swapped(self):
        """Run with the averaged weights in the module; the raw ones come back after."""
        return swapped_data(self.params, self.avg)

    def state_dict(self) -> dict:
        return {"n": self.n, "avg": self.avg}


def make_optimizer(editor: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the editor: the networks at cfg.lr, the per-matrix log step sizes at alpha_lr.

    PyTorch's fused kernel (one pass over all parameters) on CPU and CUDA: the same update
    to float rounding, and a few ms a step faster; 4.5x as many parameters with --no-share
    make the optimizer a visible part of a step (`benchmarks/optimizer_step.py`).
    """
    nets = [p for n, p in editor.named_parameters() if n != "log_alpha"]
    fused = editor.log_alpha.device.type in ("cpu", "cuda")
    groups = [{"params": nets, "lr": cfg.lr}, {"params": [editor.log_alpha], "lr": cfg.alpha_lr}]
    return torch.optim.Adam(groups, fused=fused)


def apply_update(editor, opt, average: WeightAverage | None, clip: float) -> float:
    """Clip, step and average after backward; returns the gradient norm, NaN for a skipped step.

    A non-finite gradient anywhere makes the total norm non-finite, so the clip's one pass is
    also the finite check; a skipped step's clipped gradients are dropped with it.
    """
    gnorm = torch.nn.utils.clip_grad_norm_(editor.parameters(), clip).item()
    if not math.isfinite(gnorm):
        return float("nan")
    opt.step()
    if average is not None:
        average.update()
    return gnorm


def _write_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be rewritten)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


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
    out = Path(out)
    if not train_data:
        raise MendError("no training edits")
    if not val_data:
        raise MendError("no validation edits")
    model.requires_grad_(False)
    model.eval()
    names = [p.name for p in find_editable(model, cfg.editor.edit_modules)]
    identity = model_identity(model, names)
    log_path = out / LOG_FILE
    # --minutes counts from here: the key statistics, the nearest records and the row-cache
    # warm-up are training time too (until session 20 the clock began after the first two).
    began = time.perf_counter()

    if resume:
        editor = load_editor(out / LAST, model)
        state = load_train_state(out / LAST)
        if "raw" in state:  # `last` holds the averaged weights, training goes on from the raw
            with torch.no_grad():
                for p, r in zip(editor.parameters(), state.pop("raw"), strict=True):
                    p.copy_(r)
        if TrainConfig.from_dict(state["config"]) != cfg:
            log.warning("resuming with a different configuration than the checkpoint's")
        _truncate_log(log_path, state["step"])
    else:
        torch.manual_seed(cfg.seed)
        if cfg.init_editor:
            editor = load_editor(cfg.init_editor, model)
            if editor.names != names:
                raise MendError(f"--init editor edits {editor.names}, this run {names}")
        else:
            editor = Editor(identity["params"], cfg.editor)
        state = {"step": 0, "best": float("inf"), "bad": 0, "elapsed": 0.0, "skipped": 0}
        out.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
    editor.to(next(model.parameters()).device).train()
    me = MendEditor(model, tokenizer, editor)
    if not resume and not cfg.init_editor and cfg.editor.precondition is not None:
        editor.set_key_moments(key_moments(model, me.params, key_batches(me, train_data, cfg)))
    start_block = UpperStack.first_edited_block(model, names)
    stack = None
    if not cfg.reference and start_block is not None:
        cache = RowCache(cfg.row_cache_mb << 20) if cfg.row_cache_mb else None
        bf16 = cfg.lower_precision == "bf16" or (
            cfg.lower_precision == "auto" and bf16_is_fast(me.device)
        )
        lower = torch.bfloat16 if bf16 else None
        stack = UpperStack(model, start_block, cache, lower_dtype=lower)
    opt = make_optimizer(editor, cfg)
    if resume:
        opt.load_state_dict(state.pop("optimizer"))
    average = WeightAverage(editor, cfg.ema, state.pop("ema", None)) if cfg.ema else None
    # Validation and checkpoints see the averaged weights when there are any.
    averaged = average.swapped if average is not None else nullcontext
    base_lrs = [cfg.lr, cfg.alpha_lr]
    val_data = val_data[: cfg.val_edits]
    near = None
    # the hard-input modes the steps draw by (step_config): the first step's and the last's
    modes = dict.fromkeys(step_config(s, cfg).hard_locality for s in (0, cfg.max_steps - 1))
    if "nearest" in modes:
        low = stack.lower_dtype if stack is not None else None
        near = nearest_records(me, train_data, cfg.nearest_k, low, progress=progress)
    similar = {by: similar_index(train_data, by, near) for by in modes}
    n_edits = min(cfg.batch_size, len(train_data)) // cfg.joint_edits * cfg.joint_edits
    if not n_edits:
        raise MendError(f"fewer training edits ({len(train_data)}) than joint_edits")

    def checkpoint(folder: Path, extra: dict | None = None) -> None:
        with averaged():  # what validation scored
            save_editor(folder, editor, identity, extra)

    def save_last() -> None:
        extra = {"optimizer": opt.state_dict(), "config": cfg.to_dict()}
        if average is not None:
            raw = [p.detach() for p in editor.parameters()]
            extra |= {"ema": average.state_dict(), "raw": raw}
        checkpoint(out / LAST)
        save_train_state(out / LAST, state | extra)

    stop_reason = "max_steps"
    start = began - state["elapsed"]
    # With a time budget the step count is open-ended: show elapsed minutes instead of an ETA.
    total = cfg.max_steps if cfg.minutes is None else None
    # Warm the row cache when the run will meet its rows again (an epoch or more) and the
    # warm-up fits in half the time budget: it is the first epoch's lower-block work, done
    # ~3x cheaper. It counts as training time.
    epochs = (cfg.max_steps - state["step"]) * n_edits / len(train_data)
    if stack is not None and stack.cache is not None and epochs >= 1:
        budget = cfg.minutes * 30 if cfg.minutes is not None else None
        warm_rows(me, stack, train_data + val_data, budget_s=budget, progress=progress)
    bar = tqdm(total=total, initial=state["step"], disable=not progress, desc="train")
    while state["step"] < cfg.max_steps:
        step = state["step"]
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = lr * lr_factor(step, cfg)
        # Data order depends only on (seed, step): a resumed run sees the same batches.
        rng = random.Random(cfg.seed * 1_000_003 + step)
        opt.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            reqs = rng.sample(train_data, n_edits)
            joint = joint_at(step, cfg)
            scfg = step_config(step, cfg)
            rows = build_rows(reqs, train_data, scfg, rng, similar[scfg.hard_locality], joint)
            loss, stats = edit_step(me, reqs, rows, scfg, stack, joint)
            (loss / cfg.grad_accum).backward()
            for k, v in stats.items():
                agg[k] = agg.get(k, 0.0) + v / cfg.grad_accum
        gnorm = apply_update(editor, opt, average, cfg.clip)
        if math.isnan(gnorm):
            state["skipped"] += 1
        state["step"] = step + 1
        state["elapsed"] = time.perf_counter() - start
        record = {"step": state["step"], **agg, "grad_norm": gnorm, "lr": opt.param_groups[0]["lr"],
                  "alpha_mean": editor.log_alpha.exp().mean().item(), "seconds": state["elapsed"]}  # fmt: skip
        _write_log(log_path, record)
        bar.update(1)
        bar.set_postfix(loss=f"{agg['loss']:.3f}", edit=f"{agg.get('rephrase_acc', 0):.2f}",
                        loc=f"{agg.get('locality_acc', 0):.2f}",
                        min=f"{state['elapsed'] / 60:.1f}/{cfg.minutes or '-'}")  # fmt: skip

        out_of_time = cfg.minutes is not None and state["elapsed"] >= cfg.minutes * 60
        last_step = state["step"] >= cfg.max_steps or out_of_time
        if state["step"] % cfg.val_every == 0 or last_step:
            with averaged():
                val = validate(me, val_data, cfg, stack)
            key = selection_key(val, cfg.select)
            # A late locality weight trades validation accuracy for locality on purpose: the
            # checkpoints before it do not compete with the ones it shapes.
            # (state["step"] steps have run: the last was step state["step"] - 1.)
            best_step = state.get("best_step", 0)
            late = is_late(state["step"] - 1, cfg) and not is_late(best_step - 1, cfg)
            improved = key < state["best"] or late
            if improved:
                state["best"], state["bad"], state["best_val"] = key, 0, val
                state["best_step"] = state["step"]
                checkpoint(out, {"best_step": state["step"], "val": val})
            else:
                state["bad"] += 1
            _write_log(log_path, {"step": state["step"], "val": val})
            bar.write(
                f"step {state['step']}: val loss {val['loss']:.4f} rewrite "
                f"{val.get('rewrite_acc', 0):.3f} rephrase {val.get('rephrase_acc', 0):.3f} "
                f"locality {val.get('locality_acc', 0):.3f}" + (" (best)" if improved else "")
            )
            save_last()
            if state["bad"] >= cfg.patience:
                stop_reason = "early_stop"
                break
        if out_of_time:
            stop_reason = "time_budget"
            break
    bar.close()
    if cfg.shared_rank and (out / CONFIG_FILE).exists():
        # The best checkpoint learns which part of its change every edit shares (edit.fit_shared).
        best = load_editor(out, model).to(me.device)
        fit_shared(MendEditor(model, tokenizer, best), train_data[:64], cfg.shared_rank, progress)
        resave_editor(out, best)
    from mend.plots import plot_training

    plot_training(log_path, out / "train_curves.png")
    best_val = state.get("best_val", {})
    return {"steps": state["step"], "best_val_loss": best_val.get("loss"), "stop": stop_reason,
            "best_val": best_val, "skipped_steps": state["skipped"],
            "seconds": state["elapsed"]}  # fmt: skip
