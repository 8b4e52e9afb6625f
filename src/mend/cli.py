"""`mend train | eval | data | edit | apply | demo | fit-shared | build-shield | serve`:
parsing and printing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from mend.config import AGGREGATES
from mend.errors import MendError
from mend.training.recipe import recipe_names

BASELINE_NAMES = (
    "ft",
    "ft-kl",
    "grad",
    "ls",
    "none",
    "rome",
    "memit",
    "alphaedit",
)  # mend.baselines.BASELINES, without loading torch


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder or hub id")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _boost_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--boost", type=float, nargs="*", default=[1.5, 2.0], metavar="S",
        help="scales tried in turn on a single edit whose target is not yet the model's answer "
        "to its prompt (default: 1.5 2; none given: apply MEND's change unchecked; batched "
        "edits, --batch-size > 1, are applied unchecked)",
    )  # fmt: skip
    p.add_argument(
        "--start", type=float, default=1.0, metavar="S",
        help="the scale of MEND's change the check tries first and falls back to when no "
        "--boost scale reaches the target (default 1; e.g. 0.9 with --boost 1 1.25 1.5 2 "
        "trades a little rephrase for locality)",
    )  # fmt: skip
    p.add_argument(
        "--shield", type=float, default=None, metavar="BETA",
        help="keep BETA (0-1] of each single edit off the inputs of the known facts nearest "
        "it, from the editor's key bank (`mend build-shield`; see mend/shield.py); batched "
        "edits are not shielded. Default: off",
    )  # fmt: skip
    p.add_argument("--shield-facts", type=int, default=16, help="nearest facts to shield")
    p.add_argument(
        "--aggregate", choices=AGGREGATES, default=None,
        help="how the requests of a batched edit combine: MEND's changes summed (sum), one "
        "least-squares change giving every edited token's key its value (ls), or each "
        "request's own checked single edit, combined by least squares at their keys "
        "(singles; see MendEditor); default: what the editor was trained for",
    )  # fmt: skip
    p.add_argument("--ridge", type=float, default=None,
                   help="--aggregate ls/singles: relative ridge (default: the editor's own, "
                   "1e-4 unless learned; singles 1e-6)")  # fmt: skip
    p.add_argument(
        "--preserve", type=float, default=0.0, metavar="MU",
        help="--aggregate ls/singles (and --method ls): hold the outputs of ordinary text's keys "
        "(WikiText, cached once per model) with this weight (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--null-space", type=float, default=None, metavar="THRESHOLD",
        help="--aggregate ls (and --method ls, alphaedit): change only the directions of "
        "ordinary text's keys that together carry at most THRESHOLD (0-1) of their energy, so "
        "the rest of text's keys keep their outputs exactly (AlphaEdit's null space). "
        "Default: off (alphaedit: 0.02)",
    )  # fmt: skip
    p.add_argument("--adapt-stats", action="store_true",
                   help="every edit also updates the editor's input statistics with its own "
                   "tokens (UltraEdit's lifelong normalisation; not reverted with the edit)")  # fmt: skip
    p.add_argument(
        "--editor-fp32", action="store_true",
        help="run the editor networks in fp32 throughout (default: their large products in "
        "bf16 where the hardware has fast bf16, halving the editor's share of an edit)",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mend", description="Train MEND editors and edit models.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser(
        "train", help="train an editor network",
        description="Train an editor. A recipe (--recipe) holds the settings behind a result; "
        "the flags below override its data and common settings, --set any other one.",
    )  # fmt: skip
    t.add_argument(
        "--recipe", metavar="NAME_OR_FILE",
        help=f"shipped recipe ({', '.join(recipe_names())}) or a recipe JSON file "
        "(default: the library's defaults)",
    )  # fmt: skip
    t.add_argument("--data", help="training edits: file or data set name (default: the recipe's)")
    t.add_argument("--val", help="validation edits (default: the recipe's, else held out)")
    t.add_argument("--out", required=True, help="output folder")
    _common(t)
    t.add_argument("--minutes", type=float, help="wall-clock budget, passes before step 0 included")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--seed", type=int)
    t.add_argument("--rank", type=int, help="editor rank")
    t.add_argument(
        "--edit-modules", nargs="+", help="weights to edit (default: MLPs of the last 3 blocks)"
    )
    t.add_argument("--lr", type=float)
    t.add_argument("--edits-per-step", type=int, help="edits trained side by side in a step")
    t.add_argument("--init", metavar="EDITOR_DIR", help="start from this trained editor")
    t.add_argument("--limit", type=int, help="use only the first N training edits")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any other setting by its name in the recipe, e.g. schedule.cosine=true "
        "or loss.locality=2 (repeatable; values are JSON, else text)",
    )  # fmt: skip

    e = sub.add_parser("eval", help="evaluate an editor (or a baseline) on a data set")
    _common(e)
    e.add_argument("--method", default="mend", choices=["mend", *BASELINE_NAMES])
    e.add_argument("--editor", help="editor checkpoint folder (--method mend)")
    _boost_flag(e)
    e.add_argument("--ft-lr", type=float, default=5e-4, help="ft / ft-kl learning rate")
    e.add_argument("--ft-steps", type=int, default=40, help="ft / ft-kl step limit per edit")
    e.add_argument("--grad-lr", type=float, default=1e-3, help="grad: step size")
    e.add_argument("--ls-lr", type=float, default=0.003,
                   help="ls: step of the identity editor (0.003: WikiText perplexity +6%% at 100 "
                   "CounterFact edits in one change; 0.01 lands more edits and breaks more)")  # fmt: skip
    e.add_argument("--loc-data", default="wikitext-valid", help="ft-kl: text for locality inputs")
    e.add_argument(
        "--layers", type=int, nargs="+", metavar="L",
        help="rome / memit / alphaedit: the blocks whose MLP output matrix is edited (default: "
        "MEMIT's GPT-J window, blocks 3-8 of 28, scaled to the model; ROME its last block)",
    )  # fmt: skip
    e.add_argument("--mom2-weight", type=float, default=None,
                   help="memit: weight of ordinary text's key covariance (default 15000, MEMIT's "
                   "GPT-J value; 150 chose best on SmolLM2-135M's training edits)")  # fmt: skip
    e.add_argument("--stats-text", default=None, metavar="TEXT",
                   help="rome / memit / alphaedit: the text (a data set name or a file) whose "
                   "keys' covariance is held (default wikitext-valid; cached per model and matrix)")  # fmt: skip
    e.add_argument("--data", required=True)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument(
        "--skip", type=int, default=0, metavar="N",
        help="leave out the first N records (e.g. to tune settings on records a benchmark "
        "does not score)",
    )  # fmt: skip
    e.add_argument("--batch-size", type=int, default=1, help="edits applied together")
    e.add_argument(
        "--sequential", action="store_true",
        help="keep every batch applied, one after another, and score all edits at the end "
        "(default: each batch scored and reverted before the next)",
    )  # fmt: skip
    e.add_argument("--every", type=int, metavar="M",
                   help="with --sequential: also re-score all edits so far every M edits")  # fmt: skip
    e.add_argument(
        "--ppl-windows", type=int, default=4, metavar="N",
        help="WikiText perplexity before and after editing (the first batch applied; with "
        "--sequential, all of them) on N windows of 512 tokens (default 4; 0: off)",
    )  # fmt: skip
    e.add_argument(
        "--generation", action="store_true",
        help="also score each target as a continuation (edits from `mend data wikitext`): "
        "every token right, greedy decoding exact, token accuracy and NLL before and after, "
        "and the perplexity of held-out WikiText after every edit (single edits only)",
    )  # fmt: skip
    e.add_argument("--heldout-windows", type=int, default=4, metavar="N",
                   help="with --generation: windows of 128 held-out tokens measured after each "
                   "edit (default 4; 0: none)")  # fmt: skip
    e.add_argument("--out", required=True, help="report JSON path")

    w = sub.add_parser("data", help="build edit records").add_subparsers(dest="builder",
                                                                          required=True)  # fmt: skip
    g = w.add_parser(
        "wikitext", help="generation edits from raw WikiText text",
        description="Edit records of one split of raw WikiText text: a passage prefix and a "
        "continuation sampled from --model after it, locality on other passages. Training and "
        "evaluation records come from disjoint articles; the articles from the first one past "
        "the text's middle are held out for perplexity.",
    )  # fmt: skip
    _common(g)
    g.add_argument("--text", default="wikitext-valid", help="raw WikiText file or data set name")
    g.add_argument("--split", required=True, choices=["train", "eval"])
    g.add_argument("--out", required=True, help="JSONL file to write")
    g.add_argument("--seed", type=int, default=0, help="article split, order, samples")
    g.add_argument("--prefix-tokens", type=int, default=32, help="longest prefix, in tokens")
    g.add_argument("--tokens", type=int, default=10, help="continuation tokens sampled")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--locality", type=int, default=1, help="locality passages per record")
    g.add_argument("--eval-fraction", type=float, default=0.25,
                   help="share of the edit articles' text that goes to evaluation")  # fmt: skip
    g.add_argument("--limit", type=int, help="at most N records")

    d = sub.add_parser("edit", help="edit facts and show the answers before and after")
    _common(d)
    d.add_argument("--editor", required=True)
    _boost_flag(d)
    d.add_argument("--prompt", help="the prompt of one edit (with --target)")
    d.add_argument("--target")
    d.add_argument(
        "--requests", metavar="FILE",
        help="edit every record of this file instead (CounterFact, zsRE or JSONL): one batched "
        "edit, or one edit after another with --one-by-one",
    )  # fmt: skip
    d.add_argument(
        "--one-by-one", action="store_true",
        help="with --requests: apply the edits in turn (anchored: each computed on the unedited "
        "weights and checked in the model as it is then)",
    )  # fmt: skip
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.add_argument("--save-model", help="save the edited model to this folder")
    d.add_argument("--save-delta", help="save only the weight change (safetensors)")
    d.add_argument(
        "--state", metavar="DIR",
        help="keep the model's edits in this folder (an EditSequence): the edits saved there "
        "are made again first, bit for bit, the new ones join them, and it is saved again",
    )  # fmt: skip
    d.add_argument("--revert", type=int, metavar="K",
                   help="with --state: undo the last K edits kept there (no new edit)")  # fmt: skip

    a = sub.add_parser(
        "apply", help="add saved weight deltas (`mend edit --save-delta`) to a model, no editor"
    )
    _common(a)
    a.add_argument("--delta", required=True, nargs="+", metavar="FILE", help="added in order")
    a.add_argument("--prompt", nargs="*", default=[], help="prompts to answer before and after")
    a.add_argument("--max-new-tokens", type=int, default=8)
    a.add_argument("--save-model", help="save the model with the deltas added to this folder")

    f = sub.add_parser(
        "fit-shared", help="fit (or refit) the part of an editor's change that all edits share"
    )
    _common(f)
    f.add_argument("--editor", required=True, help="editor checkpoint folder (updated in place)")
    f.add_argument("--data", required=True, help="training edits (the first --limit are used)")
    f.add_argument("--limit", type=int, default=64)
    f.add_argument("--rank", type=int, default=16, help="rank of the shared part")

    n = sub.add_parser(
        "finetune", help="fine-tune a whole model on (prompt, target) pairs, e.g. a classifier",
        description="Train every weight on (prompt, target) pairs as the model's kind reads "
        "them (a classifier: target = label name); save the model with its tokenizer.",
    )  # fmt: skip
    _common(n)
    n.add_argument("--recipe", help="fine-tuning recipe (shipped: factcheck-minilm) or a file")
    n.add_argument("--data", help="training pairs (default: the recipe's)")
    n.add_argument("--val", help="held-out pairs whose accuracy is reported (default: recipe's)")
    n.add_argument("--labels", nargs="+", help="a classifier's label names, class 0 first")
    n.add_argument("--epochs", type=int)
    n.add_argument("--lr", type=float)
    n.add_argument("--out", required=True, help="folder for the fine-tuned model")

    c = sub.add_parser(
        "factcheck-data", help="write the fact-checking claims and verdict edits as JSONL",
        description="From CounterFact and zsRE: labelled claims for fine-tuning a verdict "
        "classifier and scoring it, and edits that flip a claim's verdict (mend.data.factcheck).",
    )  # fmt: skip
    c.add_argument("--out", required=True, help="folder for claims-*.jsonl and edits-*.jsonl")

    s = sub.add_parser(
        "build-shield", help="store the known facts an edit can be shielded from (--shield)"
    )
    _common(s)
    s.add_argument("--editor", required=True, help="editor checkpoint folder (bank saved in it)")
    s.add_argument("--data", required=True, help="known facts: prompts with their true answers")
    s.add_argument("--limit", type=int, default=3000, help="how many of them")
    s.add_argument(
        "--leave-out",
        metavar="DATA",
        help="leave out facts whose prompt is a locality probe of these edits (the ones you will "
        "measure locality on: a shield on the probe itself flatters the number)",
    )

    m = sub.add_parser("demo", help="train a small editor on CounterFact, then edit and score")
    _common(m)
    m.add_argument("--minutes", type=float, default=8.0)
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--eval-limit", type=int, default=50)
    m.add_argument(
        "--train-records", type=int, default=2000,
        help="train on the first N CounterFact training edits (0: all)",
    )  # fmt: skip
    v = sub.add_parser(
        "serve", help="serve the model over HTTP: edit, roll back, ask; a web page at /",
        description="Serve the model kept edited by an editor: edits and removals are journaled "
        "in --state and replayed, bit for bit, on the next start. Writes need a bearer token; "
        "with none given they are refused. API docs at /docs.",
    )  # fmt: skip
    _common(v)
    v.add_argument("--editor", required=True)
    _boost_flag(v)
    v.add_argument("--state", required=True, metavar="DIR", help="folder of the edit journal")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--token-file", help="file holding the write token (else $MEND_TOKEN)")
    v.add_argument("--no-auth", action="store_true", help="accept writes without a token")
    v.add_argument("--workers", type=int, default=1,
                   help="generate and score calls run at once (default 1; more wait their turn)")  # fmt: skip
    return ap


def _load(args):
    import torch

    from mend.models import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise MendError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load_model(args.model, dtype=args.dtype, device=args.device)


def _load_data(name: str, tokenizer, model, limit: int | None = None):
    from mend.data import load_checked
    from mend.models import context_length
    from mend.models.forward import layout

    return load_checked(name, tokenizer, context_length(model), limit, layout(model))


# flag -> the setting it overrides
_TRAIN_FLAGS = {"minutes": "schedule.minutes", "max_steps": "schedule.max_steps", "seed": "seed",
                "rank": "editor.rank", "edit_modules": "editor.edit_modules", "lr": "schedule.lr",
                "edits_per_step": "sampling.edits_per_step", "init": "init_editor"}  # fmt: skip


def _train_config(args):
    """(TrainConfig, data, val): the recipe's, with the flags' and --set overrides applied."""
    from mend.config import TrainConfig
    from mend.training.recipe import load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None
    cfg = recipe.config if recipe else TrainConfig()
    overrides = [(key, getattr(args, flag)) for flag, key in _TRAIN_FLAGS.items()
                 if getattr(args, flag) is not None]  # fmt: skip
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise MendError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        overrides.append((key.strip(), value))
    for key, value in overrides:
        try:
            cfg = cfg.override(key, value)
        except TypeError as e:
            raise MendError(f"{key}={value!r}: {e}") from None
    if recipe and recipe.needs_init and not cfg.init_editor:
        raise MendError(f"recipe {recipe.name!r} fine-tunes a trained editor: give --init DIR")
    data = args.data or (recipe.data if recipe else None)
    if data is None:
        raise MendError("give --data (training edits), or a --recipe that names them")
    return cfg, data, args.val or (recipe.val if recipe else None)


def cmd_train(args) -> int:
    from mend.training.loop import train

    cfg, data_name, val_name = _train_config(args)
    if args.limit is not None and args.limit < 2:
        raise MendError("--limit must be >= 2")
    _check_out_dir(args.out, "--out")
    if cfg.init_editor and not Path(cfg.init_editor).is_dir():
        raise MendError(f"--init: editor folder not found: {cfg.init_editor}")
    model, tok = _load(args)
    data = _load_data(data_name, tok, model, args.limit)
    if val_name:
        val = _load_data(val_name, tok, model)
    else:
        if len(data) < 2:
            raise MendError("need at least 2 records to hold some out for validation")
        n_val = min(cfg.schedule.val_edits, max(1, len(data) // 10))
        data, val = data[:-n_val], data[-n_val:]
    summary = train(model, tok, data, val, cfg, args.out, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def _check_out_dir(path: str | None, flag: str) -> None:
    """An output folder must be a folder or not exist yet."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise MendError(f"{flag} {path}: an existing file, not a folder")


def _check_out_file(path: str | None, flag: str) -> None:
    """An output file must not be a folder, and its folder must not be a file."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise MendError(f"{flag} {path}: an existing folder, not a file")
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise MendError(f"{flag} {path}: {parent} is a file, not a folder")


def _mend_editor(args, model, tok):
    from mend.checkpoint import load_editor
    from mend.edit import MendEditor

    net = load_editor(args.editor, model)
    editor = MendEditor(model, tok, net, boost=args.boost, start=args.start,
                        editor_bf16=False if args.editor_fp32 else None,
                        aggregate=args.aggregate, ridge=args.ridge,
                        preserve=args.preserve, null_space=args.null_space,
                        adapt_stats=args.adapt_stats)  # fmt: skip
    if args.shield is not None:
        from mend.shield import BANK_FILE, KeyBank, Shield

        bank = KeyBank.load(Path(args.editor) / BANK_FILE, editor.params)
        editor.shield = Shield(bank, m=args.shield_facts, beta=args.shield)
    return editor


def _method(args, model, tok):
    """The editing method named by --method, on the same weights MEND edits."""
    from mend.baselines import OPTIONS, make_baseline

    if args.method == "mend":
        return _mend_editor(args, model, tok)
    options = {k: getattr(args, k) for k in OPTIONS}
    return make_baseline(args.method, model, tok, **options)


def cmd_eval(args) -> int:
    from mend.evaluate import evaluate, format_report, ppl_text
    from mend.files import write_json

    if args.limit is not None and args.limit < 1:
        raise MendError("--limit must be >= 1")
    if args.batch_size < 1:
        raise MendError("--batch-size must be >= 1")
    if args.skip < 0:
        raise MendError("--skip must be >= 0")
    if args.ppl_windows < 0:
        raise MendError("--ppl-windows must be >= 0")
    if args.method == "mend" and not args.editor:
        raise MendError("--method mend needs --editor")
    if args.every is not None and not args.sequential:
        raise MendError("--every needs --sequential")
    if args.every is not None and (args.every < 1 or (args.limit and args.every > args.limit)):
        raise MendError(f"--every must be between 1 and --limit, got {args.every}")
    if args.generation and (args.sequential or args.batch_size != 1):
        raise MendError("--generation scores single edits: not with --sequential or --batch-size")
    if args.heldout_windows < 0:
        raise MendError("--heldout-windows must be >= 0")
    _check_out_file(args.out, "--out")
    model, tok = _load(args)
    method = _method(args, model, tok)
    end = None if args.limit is None else args.skip + args.limit
    data = _load_data(args.data, tok, model, end)[args.skip :]
    if not data:
        raise MendError(f"no records left after --skip {args.skip}")
    ppl = {"ppl_text": ppl_text() if args.ppl_windows else None, "ppl_windows": args.ppl_windows}
    if args.sequential:
        from mend.evaluate import evaluate_sequential

        report = evaluate_sequential(model, tok, method, data, args.batch_size, args.every, **ppl)
        last = "curve"
    elif args.generation:
        from mend.generation.score import evaluate_generation

        heldout = ppl_text() if args.heldout_windows else None
        report = evaluate_generation(model, tok, method, data, heldout, args.heldout_windows,
                                     per_edit=True, **ppl)  # fmt: skip
        last = "edits"
    else:
        report = evaluate(model, tok, method, data, batch_size=args.batch_size, per_edit=True,
                          **ppl)  # fmt: skip
        last = "edits"
    listed = report.pop(last)  # (listed last in the file)
    report |= {"method": args.method, "model": args.model, "editor": args.editor, "data": args.data}
    report[last] = listed
    write_json(args.out, report)
    print(format_report(report))
    if "generation" in report:
        from mend.generation.score import format_generation

        print(format_generation(report["generation"]))
    return 0


def cmd_data(args) -> int:
    from mend.data.sources import resolve_data
    from mend.data.wikitext import read_articles
    from mend.generation.build import BuildConfig, build_records, write_records

    cfg = BuildConfig(split=args.split, seed=args.seed, prefix_tokens=args.prefix_tokens,
                      n_tokens=args.tokens, temperature=args.temperature,
                      locality=args.locality, eval_fraction=args.eval_fraction, limit=args.limit)  # fmt: skip
    _check_out_file(args.out, "--out")
    text = resolve_data(args.text)
    read_articles(text)  # a bad text fails before the model loads
    model, tok = _load(args)
    records, summary = build_records(model, tok, text, cfg)
    if not records:
        raise MendError(f"{args.text}: no passage gave a record")
    write_records(args.out, records)
    summary["articles"] = len(summary["articles"])
    print(json.dumps(summary | {"text": str(text), "out": args.out}, indent=2))
    return 0


def cmd_edit(args) -> int:
    from tqdm import tqdm

    from mend.data.collate import encode_row
    from mend.models import context_length
    from mend.models.forward import greedy, layout
    from mend.result import save_delta
    from mend.types import EditRequest

    no_fact = args.prompt is None
    if args.revert is not None:
        if not no_fact or args.target is not None or args.requests is not None:
            raise MendError("--revert undoes edits: give it no --prompt, --target or --requests")
        if args.save_delta:
            raise MendError("--save-delta saves an edit's change: not with --revert")
    elif no_fact != (args.target is None) or no_fact == (args.requests is None):
        raise MendError("give either --prompt and --target, or --requests FILE")
    if args.one_by_one and args.requests is None:
        raise MendError("--one-by-one needs --requests FILE")
    _check_out_dir(args.save_model, "--save-model")
    _check_out_file(args.save_delta, "--save-delta")
    _check_state(args.state, args.revert)
    model, tok = _load(args)
    method = _mend_editor(args, model, tok)
    seq = None
    if args.state is not None:
        from mend.sequence import EditSequence

        seq = EditSequence.open(args.state, method)
    if args.revert is not None:
        return _revert(args, seq, tok)
    if args.requests is not None:
        requests = _load_data(args.requests, tok, model)
    else:
        encode_row(tok, args.prompt, args.target, context_length(model), layout(model))
        requests = [EditRequest(args.prompt, args.target)]
    before = [greedy(model, tok, r.prompt, args.max_new_tokens) for r in requests]
    # edits swap new tensors in, so these references keep the unedited weights for free
    unedited = {p.name: p.weight.detach() for p in method.params}
    edit = method.edit if seq is None else seq.edit
    if args.one_by_one:
        results = [edit([r]) for r in tqdm(requests, desc="edit", leave=False)]
    else:
        results = [edit(requests)]
    holds = method.holds(requests)  # every target token the argmax after its prompt
    for r, b, ok in zip(requests, before, holds, strict=True):
        print(f"prompt: {r.prompt}")
        if len(requests) > 1:
            print(f"target: {r.target!r}")
        print(f"before: {b!r}")
        after = greedy(model, tok, r.prompt, args.max_new_tokens)
        print(f"after:  {after!r}" + ("" if ok else "  (target not reached)"))
    seconds = sum(res.seconds for res in results)
    what = "edit" if len(requests) == 1 else f"{len(requests)} edits"
    how = " one by one" if args.one_by_one else (" as one batch" if len(requests) > 1 else "")
    reached = f"targets reached: {sum(holds)} of {len(holds)}"
    print(f"{what}{how} took {seconds * 1000:.1f} ms; {reached}")
    if args.save_model:
        results[-1].save_pretrained(args.save_model, tok)
        print(f"saved edited model to {args.save_model}")
    if args.save_delta:
        if len(results) == 1:
            results[0].save_delta(args.save_delta)
        else:  # everything the edits applied one by one changed
            deltas = {p.name: p.weight.detach() - unedited[p.name] for p in method.params}
            save_delta(args.save_delta, model, deltas)
        print(f"saved weight delta to {args.save_delta}")
    if seq is not None:
        seq.save(args.state)
        print(f"saved the {len(seq)} edit(s) of the model to {args.state}")
    return 0


def _check_state(path: str | None, revert: int | None) -> None:
    """--state must be a saved sequence, or a folder still to make; --revert needs a saved one."""
    from mend.sequence import STATE_FILE

    if path is None:
        if revert is not None:
            raise MendError("--revert needs --state DIR: the folder the edits are kept in")
        return
    _check_out_dir(path, "--state")
    saved = (Path(path) / STATE_FILE).is_file()
    if revert is not None and revert < 1:
        raise MendError(f"--revert must be >= 1, got {revert}")
    if revert is not None and not saved:
        raise MendError(f"--state {path}: no saved edits to revert")
    if not saved and Path(path).is_dir() and any(Path(path).iterdir()):
        raise MendError(f"--state {path}: a folder that holds no saved edits ({STATE_FILE})")


def _revert(args, seq, tok) -> int:
    """mend edit --state DIR --revert K: undo the last K edits kept in DIR and save it."""
    from mend.result import save_model

    seq.revert_last(args.revert)
    seq.save(args.state)
    print(f"reverted the last {args.revert} edit(s) of {args.state}; {len(seq)} kept")
    if args.save_model:
        save_model(args.save_model, seq.model, tok)
        print(f"saved the model to {args.save_model}")
    return 0


def cmd_apply(args) -> int:
    from mend.models.forward import greedy
    from mend.result import apply_delta

    if not args.prompt and not args.save_model:
        raise MendError("nothing to do: give --prompt P ... to answer, or --save-model DIR")
    for path in args.delta:
        if not Path(path).is_file():
            raise MendError(f"delta file not found: {path}")
    _check_out_dir(args.save_model, "--save-model")
    model, tok = _load(args)
    before = [greedy(model, tok, p, args.max_new_tokens) for p in args.prompt]
    applied = [apply_delta(model, path) for path in args.delta]
    for prompt, b in zip(args.prompt, before, strict=True):
        print(f"prompt: {prompt}")
        print(f"before: {b!r}")
        print(f"after:  {greedy(model, tok, prompt, args.max_new_tokens)!r}")
    changed = {name for result in applied for name in result.deltas}
    print(f"added {len(applied)} delta(s) to {len(changed)} weights")
    if args.save_model:
        applied[-1].save_pretrained(args.save_model, tok)
        print(f"saved the model to {args.save_model}")
    return 0


def cmd_fit_shared(args) -> int:
    from mend.checkpoint import load_editor, resave_editor
    from mend.edit import MendEditor, fit_shared

    if args.rank < 1 or args.limit < 1:
        raise MendError("--rank and --limit must be >= 1")
    model, tok = _load(args)
    net = load_editor(args.editor, model)
    data = _load_data(args.data, tok, model, args.limit)
    fit_shared(MendEditor(model, tok, net), data, args.rank, progress=True)
    resave_editor(args.editor, net)
    print(f"{args.editor}: shared part of rank {net.cfg.shared_rank} saved")
    return 0


def cmd_build_shield(args) -> int:
    from mend.checkpoint import load_editor
    from mend.edit import MendEditor
    from mend.shield import BANK_FILE, KeyBank, known_facts

    if args.limit < 1:
        raise MendError("--limit must be >= 1")
    model, tok = _load(args)
    editor = MendEditor(model, tok, load_editor(args.editor, model))
    data = _load_data(args.data, tok, model, args.limit)
    leave_out = _load_data(args.leave_out, tok, model, None) if args.leave_out else []
    facts, left = known_facts(data, leave_out)
    if not facts:
        why = f" not left out by {args.leave_out}" if left else ""
        raise MendError(f"{args.data} has no true answers (target_true){why} to shield")
    bank = KeyBank.build(model, tok, editor.params, facts, editor.max_len, progress=True)
    bank.save(Path(args.editor) / BANK_FILE)
    print(f"{args.editor}: key bank of {len(facts)} facts ({len(bank.owner)} inputs) saved"
          + (f"; {left} left out: locality probes of {args.leave_out}" if args.leave_out else ""))  # fmt: skip
    return 0


def cmd_demo(args) -> int:
    from mend.demo import run_demo

    _check_out_dir(args.out, "--out")
    model, tok = _load(args)
    run_demo(model, tok, Path(args.out), args.minutes, args.eval_limit, args.train_records or None)
    return 0


def cmd_serve(args) -> int:
    from mend.serve import Engine, Journal, create_app, load_token, serve

    token = load_token(args.token_file)
    journal = Journal(args.state)
    model, tok = _load(args)
    engine = Engine(_mend_editor(args, model, tok), journal, workers=args.workers)
    print(f"{len(engine.seq)} edit(s) replayed from {journal.path}", flush=True)
    serve(create_app(engine, token, args.no_auth), args.host, args.port)
    return 0


def cmd_finetune(args) -> int:
    from mend.training import finetune as ft

    recipe = ft.load_finetune_recipe(args.recipe) if args.recipe else None
    recipe = recipe or ft.FinetuneRecipe("", "", ft.FinetuneConfig())
    data, val = args.data or recipe.data, args.val or recipe.val
    if data is None or val is None:
        raise MendError("give --data and --val (pairs), or a --recipe that names them")
    _check_out_dir(args.out, "--out")
    cfg = recipe.config
    for name in ("epochs", "lr"):
        if getattr(args, name) is not None:
            cfg = dataclasses.replace(cfg, **{name: getattr(args, name)})
    model, tok = _load(args)
    labels = tuple(args.labels or recipe.labels)
    if labels:
        ft.set_labels(model, labels)
    report = ft.finetune(model, tok, _load_data(data, tok, model), _load_data(val, tok, model), cfg,
                      args.out)  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


def cmd_factcheck_data(args) -> int:
    from mend.data.factcheck import SPLITS, build_split, to_record
    from mend.files import atomic_write

    _check_out_dir(args.out, "--out")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        rows = [json.dumps(to_record(r)) for r in build_split(name)]
        atomic_write(Path(args.out) / f"{name}.jsonl",
                     lambda tmp, rows=rows: Path(tmp).write_text("\n".join(rows) + "\n"))  # fmt: skip
        print(f"{name}.jsonl: {len(rows)} records")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    handler = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "edit": cmd_edit,
               "apply": cmd_apply,
               "demo": cmd_demo, "fit-shared": cmd_fit_shared, "finetune": cmd_finetune,
               "factcheck-data": cmd_factcheck_data,
               "build-shield": cmd_build_shield, "serve": cmd_serve}[args.cmd]  # fmt: skip
    try:
        return handler(args)
    except MendError as e:
        print(f"mend: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
