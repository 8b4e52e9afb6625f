"""The edited model behind the service: one writer at a time, and readers that never see half
an edit.

Concurrency. An edit swaps new tensors into the model one matrix at a time, and computing it
briefly swaps the base weights back in (anchored edits take their gradient there), so a
reader running beside it could see a mixture of weights. `RWLock` keeps that from happening
in the plainest way: any number of readers (generate, score, list, state) run together, a
writer (edit, remove) runs alone, and a waiting writer lets no new reader in, so a stream of
reads cannot starve edits. An edit holds the write lock from its computation until its
journal row is committed, so a reader sees the weights before the edit or after it, and only
ever weights whose edits are durable.

Readers also take one of `workers` slots before the lock: on a CPU, dozens of generations at
once run no faster in total than a few (they share the same cores, and their Python halves the
same interpreter lock), and each would finish late; a slot is taken before the read lock, so
a reader waiting for one never holds a writer up.

Editing goes through mend's own paths only: `EditSequence.edit` (which calls
`MendEditor.edit`: one request is a single edit, several one batched edit, and each edit
joins the sequence of those before it), `EditSequence.remove` and `revert_last`, and on start
`EditSequence.restore`, which adds the journaled factors to the freshly loaded base weights in
order, the same function that added them when they were made: the weights after a restart
are, bit for bit, those before it.

Rolling an edit back (`remove`) sets the weights to the base weights plus every other edit's
stored factors, added in order by that same function: bit for bit the weights of a model
that received every other edit, as it was made, in the same order (what a restart on a
journal without the removed edit gives). With the anchored, summed editor (the default) an
edit made while others are applied is computed on the base weights, so for any edit but the
first this is also the model of a service that never made it (the first edit's removal keeps
the later edits as made, where a fresh service would have checked its new first edit). A
least-squares editor, whose later edits were solved around the earlier ones, may remove only
its last edit (409).
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager

import torch

from mend.checkpoint import model_identity
from mend.data.collate import encode
from mend.errors import MendError
from mend.metrics import all_correct, row_logprobs
from mend.models import context_length
from mend.models.forward import greedy, sample, scored_logits
from mend.sequence import EditSequence, record_entry, record_tensors
from mend.serve.journal import Journal
from mend.types import EditRequest


class RequestError(Exception):
    """A request the service refuses with an HTTP status (404 unknown edit, 409 conflict)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RWLock:
    """Many readers or one writer; a waiting writer goes before readers that come later."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting = 0  # writers waiting

    @contextmanager
    def read(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writing and not self._readers)
            self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def digest(checksums: dict[str, str]) -> str:
    """One sha256 over every weight's sha256, in name order."""
    return hashlib.sha256("".join(checksums[n] for n in sorted(checksums)).encode()).hexdigest()


class Engine:
    """A `MendEditor`'s model, edited through an `EditSequence` and journaled.

    Args:
        editor: a `MendEditor` just created on the freshly loaded base model.
        journal: where accepted edits and removals are committed; its edits are replayed now.
        swap_depth: `EditSequence`'s (how many latest edits revert by a storage swap).
        workers: how many reads run the model at once.

    Raises:
        MendError: the journal was made on other base weights, or is corrupt.
    """

    def __init__(self, editor, journal: Journal, swap_depth: int = 1, workers: int = 1):
        if workers < 1:
            raise MendError(f"workers must be >= 1, got {workers}")
        self.editor, self.journal = editor, journal
        self.tokenizer = editor.tokenizer
        self.lock = RWLock()
        self._slots = threading.Semaphore(workers)
        self.seq = EditSequence(editor, swap_depth)
        self.max_len = context_length(editor.model)
        self._check_base()
        entries, factors, keys, next_id = journal.live()
        self.seq.restore(entries, factors, keys, next_id, str(journal.path))

    def _check_base(self) -> None:
        names = [p.name for p in self.editor.params]
        here = {
            "model": model_identity(self.editor.model, names),
            "base_sha256": digest(self.seq.checksums()["base"]),
        }
        saved = self.journal.meta("base")
        if saved is None:
            self.journal.set_meta("base", here)
        elif saved["base_sha256"] != here["base_sha256"]:
            raise MendError(
                f"{self.journal.path} holds edits of other weights ({saved['model']['name']}, "
                f"{len(saved['model']['params'])} edited matrices): start it on that base model"
            )

    # -- checks made before any lock is taken: bad input costs nothing and changes nothing

    def check_edit(self, requests: list[EditRequest]) -> None:
        """Raise MendError for a request mend cannot edit (empty or too long, a target that
        tokenises to nothing), naming the request."""
        for i, r in enumerate(requests):
            where = f"request {i}" if len(requests) > 1 else "the request"
            try:
                encode(self.tokenizer, r.prompt, r.target, self.max_len)
                for p in r.rephrases:
                    encode(self.tokenizer, p, r.target, self.max_len)
            except MendError as e:
                raise MendError(f"{where}: {e}") from None

    def check_prompt(self, prompt: str, max_new_tokens: int) -> None:
        """Raise MendError for a prompt that cannot be continued by `max_new_tokens` tokens."""
        room = self.max_len - max_new_tokens
        ids, _ = encode(self.tokenizer, prompt, None, self.max_len)
        if len(ids) > room:
            raise MendError(
                f"prompt of {len(ids)} tokens plus {max_new_tokens} new ones is longer than "
                f"the model's context of {self.max_len}"
            )

    # -- readers

    def generate(
        self, prompt: str, max_new_tokens: int, seed: int | None = None, **sampling
    ) -> str:
        """The greedy continuation of `prompt`, or with a `seed` one sampled
        (`mend.models.forward.sample`, given `sampling`'s temperature and top_p)."""
        self.check_prompt(prompt, max_new_tokens)
        model, tok = self.editor.model, self.tokenizer
        with self._slots, self.lock.read():
            if seed is None:
                return greedy(model, tok, prompt, max_new_tokens)
            return sample(model, tok, prompt, max_new_tokens, seed=seed, **sampling)

    def score(self, prompt: str, answers: list[str]) -> list[dict]:
        """Each answer's log-probability after `prompt` (teacher-forced, natural log, its
        tokens summed), its number of tokens, and whether every one of them is the argmax."""
        for i, a in enumerate(answers):
            try:
                encode(self.tokenizer, prompt, a, self.max_len)
            except MendError as e:
                raise MendError(f"answer {i}: {e}") from None
        with self._slots, self.lock.read(), torch.no_grad():
            batch = self.editor.batch([(prompt, a) for a in answers])
            logits = scored_logits(self.editor.model, batch)
        labels, rows = batch.labels[batch.pos_mask], batch.pos_row
        logprob, tokens = row_logprobs(logits, labels, rows, len(batch))
        argmax = all_correct(logits, labels, rows, len(batch))
        return [
            {"answer": a, "logprob": lp, "tokens": n, "argmax": ok}
            for a, lp, n, ok in zip(
                answers, logprob.tolist(), tokens.tolist(), argmax.tolist(), strict=True
            )
        ]

    def edits(self, offset: int = 0, limit: int | None = None) -> tuple[list[dict], int]:
        """(the edits applied from the `offset`-th on, at most `limit` of them, in the order
        they were made; how many are applied in all)."""
        with self.lock.read():
            records = self.seq.records
            end = None if limit is None else offset + limit
            return [record_entry(r) for r in records[offset:end]], len(records)

    def edit_by_id(self, edit_id: int) -> dict:
        with self.lock.read():
            for r in self.seq.records:
                if r.id == edit_id:
                    return record_entry(r)
        raise RequestError(404, f"no edit {edit_id}: it was never made or was removed")

    def state(self) -> dict:
        """The number of edits applied and checksums of the edited weights."""
        with self.lock.read():
            sums = self.seq.checksums()
            ids = [r.id for r in self.seq.records]
        return {
            "edits": len(ids),
            "ids": ids,
            "weights_sha256": digest(sums["edited"]),
            "base_sha256": digest(sums["base"]),
            "weights": sums["edited"],
        }

    # -- writers

    def edit(self, requests: list[EditRequest], compare: bool = True) -> dict:
        """Make one edit of all `requests` (`EditSequence.edit`: a batched edit when there are
        several), journal it, and describe it: its entry, `holds` (each request's target the
        argmax after its prompt now) and `answers`, for every prompt and paraphrase, whether
        its target is now reached that way and, with `compare`, the greedy answers before and
        after (all taken inside the write lock, so no other edit comes between them).
        """
        self.check_edit(requests)
        asked = [(p, r.target) for r in requests for p in (r.prompt, *r.rephrases)]
        prompts = [p for p, _ in asked]
        with self.lock.write():
            before = self._answers(prompts) if compare else None
            result = self.seq.edit(requests)
            record = self.seq.records[-1]
            try:
                self.journal.add_edit(record_entry(record), *record_tensors(record))
            except BaseException:
                self.seq.revert_last(1)  # not durable, so not applied
                raise
            after = self._answers(prompts) if compare else None
            reached = self.editor.holds([EditRequest(p, t) for p, t in asked])
        answers = [
            {"prompt": p, "target": t, "reached": ok}
            for (p, t), ok in zip(asked, reached, strict=True)
        ]
        if compare:
            for a, b, c in zip(answers, before, after, strict=True):
                a |= {"before": b, "after": c}
        firsts = [sum(1 + len(r.rephrases) for r in requests[:i]) for i in range(len(requests))]
        holds = [reached[i] for i in firsts]
        return record_entry(record) | {
            "seconds": result.seconds,
            "holds": holds,
            "answers": answers,
        }

    def remove(self, edit_id: int) -> dict:
        """Undo edit `edit_id`, keeping the edits made after it (`EditSequence.remove`)."""
        with self.lock.write():
            ids = [r.id for r in self.seq.records]
            if edit_id not in ids:
                raise RequestError(404, f"no edit {edit_id}: it was never made or was removed")
            if self.editor.aggregate == "ls" and edit_id != ids[-1]:
                raise RequestError(
                    409,
                    f"edit {edit_id} is not the last: this editor solves each edit holding the "
                    "earlier edits' keys, so the later ones would keep changes made for it; "
                    "remove the edits after it first",
                )
            self.journal.add_removal(edit_id)
            self.seq.remove(edit_id)
            return {"removed": edit_id, "edits": len(self.seq)}

    def _answers(self, prompts: list[str]) -> list[str]:
        return [greedy(self.editor.model, self.tokenizer, p) for p in prompts]
