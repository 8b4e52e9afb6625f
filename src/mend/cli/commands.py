"""`mend train | eval | data | edit | apply | demo | fit-shared | build-shield | serve`:
running and printing (their flags: `parser.py`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from mend.cli.parser import build_parser
from mend.errors import MendError


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
    args = build_parser().parse_args(argv)
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
