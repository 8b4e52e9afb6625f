"""Readers for CounterFact (EasyEdit and ROME layouts), zsRE (MEND layout) and mend's JSONL.

mend's own JSONL format, one object per line:
    {"prompt": "The capital of France is", "target": "Lyon",
     "rephrases": ["France's capital city is"],                      # optional
     "locality": [{"prompt": "The capital of Spain is", "answer": "Madrid"}],  # optional
     "target_true": "Paris", "subject": "France"}                     # optional
A locality probe without "answer" checks the next-token prediction after its prompt.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mend.data.sources import resolve_data
from mend.errors import MendError
from mend.types import EditRequest, Probe

log = logging.getLogger(__name__)


def _need(rec: dict, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(rec, dict):
        raise MendError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for k in keys:
        if k not in rec:
            raise MendError(f"{where}: record is missing required key {k!r}")


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise MendError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _texts(value: Any, key: str, where: str) -> tuple[str, ...]:
    """A string or a list of strings -> a tuple of strings."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise MendError(f"{where}: {key!r} must be a string or a list of strings")
    return tuple(value)


def _subject(rec: dict, where: str) -> str | None:
    value = rec.get("subject")
    return _text(value, "subject", where) if value is not None else None


def _rome_target(value: Any, key: str, where: str) -> str:
    """ROME stores targets as {"str": ...}; a plain string is accepted too."""
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    return _text(value, key, where)


def _counterfact_easyedit(rec: dict, where: str) -> EditRequest:
    _need(rec, ("prompt", "target_new", "ground_truth"), where)
    reph = _texts(rec.get("rephrase_prompt") or (), "rephrase_prompt", where)
    loc_prompt = rec.get("locality_prompt")
    locality, neighborhood = (), ()
    if loc_prompt:
        answer = rec.get("locality_ground_truth") or rec["ground_truth"]
        locality = (Probe(_text(loc_prompt, "locality_prompt", where), answer),)
        neighborhood = (loc_prompt,)
    return EditRequest(
        prompt=_text(rec["prompt"], "prompt", where),
        target=_text(rec["target_new"], "target_new", where),
        rephrases=reph,
        locality=locality,
        target_true=rec["ground_truth"],
        neighborhood=neighborhood,
        subject=_subject(rec, where),
    )


def _counterfact_rome(rec: dict, where: str) -> EditRequest:
    _need(rec, ("requested_rewrite",), where)
    rw = rec["requested_rewrite"]
    _need(rw, ("prompt", "subject", "target_new", "target_true"), where)
    true = _rome_target(rw["target_true"], "target_true", where)
    neighbors = _texts(rec.get("neighborhood_prompts", ()), "neighborhood_prompts", where)
    prompt = _text(rw["prompt"], "prompt", where)
    if "{}" not in prompt:
        raise MendError(f"{where}: requested_rewrite prompt has no '{{}}' for the subject")
    return EditRequest(
        prompt=prompt.format(_text(rw["subject"], "subject", where)),
        target=_rome_target(rw["target_new"], "target_new", where),
        rephrases=_texts(rec.get("paraphrase_prompts", ()), "paraphrase_prompts", where),
        locality=tuple(Probe(p, true) for p in neighbors),
        target_true=true,
        neighborhood=neighbors,
        subject=_subject(rw, where),
    )


def _zsre(rec: dict, where: str) -> EditRequest | None:
    _need(rec, ("src", "alt"), where)
    if isinstance(rec["alt"], str) and not rec["alt"].strip():
        return None  # the public MEND zsRE train split has a few records with no new answer
    reph = _texts(rec.get("rephrase") or (), "rephrase", where)
    locality = ()
    if rec.get("loc"):
        locality = (Probe(_text(rec["loc"], "loc", where), rec.get("loc_ans") or None),)
    answers = rec.get("answers") or []
    return EditRequest(
        prompt=_text(rec["src"], "src", where),
        target=_text(rec["alt"], "alt", where),
        rephrases=reph,
        locality=locality,
        target_true=answers[0] if answers else None,
        subject=_subject(rec, where),
    )


def _jsonl(rec: dict, where: str) -> EditRequest:
    _need(rec, ("prompt", "target"), where)
    probes = []
    for p in rec.get("locality", ()):
        if isinstance(p, str):
            probes.append(Probe(p))
        else:
            _need(p, ("prompt",), f"{where} locality probe")
            probes.append(Probe(_text(p["prompt"], "prompt", where), p.get("answer")))
    return EditRequest(
        prompt=_text(rec["prompt"], "prompt", where),
        target=_text(rec["target"], "target", where),
        rephrases=_texts(rec.get("rephrases", ()), "rephrases", where),
        locality=tuple(probes),
        target_true=rec.get("target_true"),
        neighborhood=_texts(rec.get("neighborhood", ()), "neighborhood", where),
        subject=_subject(rec, where),
    )


def _detect(rec: Any, where: str) -> Callable[[dict, str], EditRequest]:
    if not isinstance(rec, dict):
        raise MendError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "requested_rewrite" in rec:
        return _counterfact_rome
    if "target_new" in rec:
        return _counterfact_easyedit
    if "src" in rec or "alt" in rec:
        return _zsre
    if "prompt" in rec and "target" in rec:
        return _jsonl
    raise MendError(
        f"{where}: unrecognised record layout with keys {sorted(rec)[:8]}; expected CounterFact, "
        "zsRE or mend JSONL (prompt, target)"
    )


def _read_records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MendError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MendError(f"cannot read data file {path}: {e}") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise MendError(f"{path}: not valid JSON or JSONL ({e})") from None


_SLICE = re.compile(r"^(?P<name>.+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def load_requests(name_or_path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read edit requests from a file or a known data set name (as `mend --data` takes them).

    The layout is detected from the records. A name or path may end in a slice of its
    records, e.g. "zsre-eval[600:]" (records 600 on) or "counterfact-val[:500]".
    """
    start = stop = None
    match = _SLICE.match(str(name_or_path))
    if match and not Path(name_or_path).exists():
        name_or_path = match["name"]
        start, stop = (int(match[k]) if match[k] else None for k in ("start", "stop"))
    path = resolve_data(name_or_path)
    if path.is_dir():
        raise MendError(f"data path is a folder, not a file: {path}")
    records = _read_records(path)[start:stop]
    if not records or limit == 0:
        raise MendError(
            f"{path}: no records" + (f" in [{start or ''}:{stop or ''}]" if match else "")
        )
    parse = _detect(records[0], f"{path}: record 0")
    out, skipped = [], []
    for i, rec in enumerate(records):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}: record {i}"
        req = parse(rec, where)
        if req is None:
            skipped.append(i)
            continue
        if not req.prompt.strip():
            raise MendError(f"{where}: empty prompt")
        if not req.target.strip():
            raise MendError(f"{where}: empty target")
        out.append(req)
    if skipped:
        log.warning("%s: skipped %d zsRE records with an empty 'alt' (records %s)",
                    path, len(skipped), ", ".join(map(str, skipped[:10])))  # fmt: skip
    if not out:
        raise MendError(f"{path}: no usable records")
    return out
