"""The flags of `mend`'s commands (`mend.cli` runs them)."""

from __future__ import annotations

import argparse

from mend.config import AGGREGATES
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


def build_parser() -> argparse.ArgumentParser:
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
