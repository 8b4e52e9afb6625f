"""Fine-tune a whole model on (prompt, target) pairs: e.g. a verdict classifier from a
pretrained encoder, before an editor is trained for it.

The loss is the mean target NLL of each row (a classifier's cross-entropy on its label), as
the model's kind reads a pair (`mend.data.collate`); the model after the last epoch is saved
with its tokenizer, and its accuracy on held-out pairs (every target token the argmax) is
reported before and after. Recipes (`recipes/finetune/*.json`) hold the settings behind a
published model.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mend.config import _from_dict
from mend.data.collate import make_batch
from mend.errors import MendError
from mend.files import atomic_folder, write_json
from mend.losses import masked_nll
from mend.metrics import all_correct
from mend.models import context_length
from mend.models.forward import layout, scored_logits
from mend.training.recipe import read_recipe_file
from mend.types import EditRequest

FINETUNE_RECIPES = Path(__file__).parent / "recipes" / "finetune"
REPORT_FILE = "finetune_report.json"


@dataclass
class FinetuneConfig:
    """Attributes:
    lr: AdamW learning rate (linear warm-up over the first 5% of steps, then linear decay).
    epochs: passes over the training pairs.
    batch_size: pairs per step.
    weight_decay: AdamW's.
    seed: the data order.
    """

    lr: float = 5e-5
    epochs: int = 1
    batch_size: int = 32
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1 or self.weight_decay < 0:
            raise MendError(f"invalid fine-tuning settings: {self}")


@dataclass(frozen=True)
class FinetuneRecipe:
    name: str
    description: str
    config: FinetuneConfig
    data: str | None = None
    val: str | None = None
    labels: tuple[str, ...] = ()  # a classifier's label names, class 0 first


def load_finetune_recipe(name_or_path: str | Path) -> FinetuneRecipe:
    """A shipped fine-tuning recipe by name, or a recipe file by path."""
    keys = {"description", "config", "data", "val", "labels"}
    path, raw = read_recipe_file(name_or_path, FINETUNE_RECIPES, keys, "fine-tuning recipe")
    try:
        config = _from_dict(FinetuneConfig, raw.get("config", {}))
    except (MendError, TypeError) as e:
        raise MendError(f"fine-tuning recipe {path}: {e}") from None
    return FinetuneRecipe(path.stem, raw.get("description", ""), config, raw.get("data"),
                          raw.get("val"), tuple(raw.get("labels", ())))  # fmt: skip


def set_labels(model, labels: tuple[str, ...]) -> None:
    """Name a classifier's classes (class 0 first); their number must be the head's."""
    n = model.config.num_labels
    if len(labels) != n:
        raise MendError(f"{len(labels)} label names for a classifier of {n} classes")
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}


@torch.no_grad()
def accuracy(model, tokenizer, pairs: list[EditRequest], batch_size: int = 128) -> float:
    """Share of pairs whose every target token is the argmax (a classifier: its label)."""
    lay, max_len, device = layout(model), context_length(model), next(model.parameters()).device
    right = 0
    for i in range(0, len(pairs), batch_size):
        chunk = [(r.prompt, r.target) for r in pairs[i : i + batch_size]]
        b = make_batch(tokenizer, chunk, max_len=max_len, layout=lay).to(device)
        logits = scored_logits(model, b)
        right += int(all_correct(logits, b.labels[b.pos_mask], b.pos_row, len(b)).sum())
    return right / len(pairs)


def finetune(model, tokenizer, data: list[EditRequest], val: list[EditRequest],
             cfg: FinetuneConfig, out: str | Path, progress: bool = True) -> dict:  # fmt: skip
    """Train every weight of `model` on data's (prompt, target) pairs; save it into `out`.

    Returns:
        The report (also written to out/finetune_report.json): held-out accuracy before and
        after, the last steps' mean loss, steps, seconds.
    """
    if not data or not val:
        raise MendError("fine-tuning needs training and held-out pairs")
    lay, max_len, device = layout(model), context_length(model), next(model.parameters()).device
    before = accuracy(model, tokenizer, val)
    steps_per_epoch = -(-len(data) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, total // 20)
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    rng, losses, start = random.Random(cfg.seed), [], time.perf_counter()
    bar = tqdm(total=total, desc="fine-tune", disable=not progress)
    for _ in range(cfg.epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            pairs = [(data[j].prompt, data[j].target) for j in order[i : i + cfg.batch_size]]
            b = make_batch(tokenizer, pairs, max_len=max_len, layout=lay).to(device)
            loss = masked_nll(scored_logits(model, b), b.labels[b.pos_mask], b.pos_row, len(b))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    bar.close()
    model.requires_grad_(False).eval()
    report = {
        "n_train": len(data), "n_val": len(val), "steps": total,
        "seconds": time.perf_counter() - start, "loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "val_accuracy_before": before, "val_accuracy": accuracy(model, tokenizer, val),
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(Path(tmp) / REPORT_FILE, report)
    return report
