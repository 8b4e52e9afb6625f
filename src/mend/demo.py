"""The main job on the embedded default: train briefly on CounterFact, then edit and score."""

from __future__ import annotations

from pathlib import Path

from mend.checkpoint import load_editor
from mend.data import load_checked
from mend.edit import MendEditor
from mend.errors import MendError
from mend.evaluate import evaluate, format_report, ppl_text
from mend.files import write_json
from mend.models import context_length
from mend.models.forward import greedy
from mend.training.loop import train
from mend.training.recipe import load_recipe

SHOWCASE = 5


def _demo_data(tokenizer, max_len: int, eval_limit: int):
    """(train, validation, test) edits: the EasyEdit CounterFact split from the shared data
    folder, else the full public CounterFact (downloaded once into the cache) split here."""
    try:
        train_data = load_checked("counterfact-train", tokenizer, max_len)
        held_out = load_checked("counterfact-val", tokenizer, max_len)
        print("data: CounterFact (EasyEdit split) from the shared data folder")
    except MendError as e:
        print(f"{e}\nfalling back to the public CounterFact download")
        full = load_checked("counterfact", tokenizer, max_len)
        train_data, held_out = full[: -(eval_limit + 32)], full[-(eval_limit + 32) :]
    return train_data, held_out[:32], held_out[-eval_limit:]


def run_demo(
    model, tokenizer, out: Path, minutes: float, eval_limit: int, train_records: int | None
) -> dict:
    """Train for `minutes` on the first `train_records` CounterFact training edits (None: all),
    evaluate on `eval_limit` held-out edits, show a few.

    A few minutes of training cannot revisit 10k records, but can revisit 2k: their rows are
    cached before the first step (training.prepare.warm_rows) and every step after is a
    cached one. The settings are the shipped "demo" recipe's.
    """
    train_data, val, test = _demo_data(tokenizer, context_length(model), eval_limit)
    train_data = train_data[:train_records]
    cfg = load_recipe("demo").config.override("schedule.minutes", minutes)
    cfg = cfg.override("schedule.val_edits", len(val))
    print(f"training an editor for {minutes:g} minutes on {len(train_data)} CounterFact edits")
    summary = train(model, tokenizer, train_data, val, cfg, out)
    best = summary["best_val"]
    print(f"trained {summary['steps']} steps; best validation: rewrite {best['rewrite_acc']:.2f}, "
          f"rephrase {best['rephrase_acc']:.2f}, locality {best['locality_acc']:.2f}")  # fmt: skip

    editor = MendEditor(model, tokenizer, load_editor(out, model))
    print(f"\nediting {SHOWCASE} held-out facts, one at a time:")
    for req in test[:SHOWCASE]:
        before = greedy(model, tokenizer, req.prompt)
        result = editor.edit([req])
        after = greedy(model, tokenizer, req.prompt)
        para = greedy(model, tokenizer, req.rephrases[0]) if req.rephrases else ""
        result.revert()
        print(
            f"- {req.prompt!r} -> {req.target!r} (was {req.target_true!r}; {result.seconds * 1000:.0f} ms)"
        )
        print(f"    before: {before!r}\n    after:  {after!r}")
        if para:
            print(f"    paraphrase {req.rephrases[0]!r}: {para!r}")
    print(f"\nscoring {len(test)} held-out edits:")
    report = evaluate(model, tokenizer, editor, test, ppl_text=ppl_text())
    write_json(out / "demo_report.json", report)
    print(format_report(report))
    return report
