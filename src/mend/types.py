"""Plain records that describe edits: what a user asks for, before any tokenisation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Probe:
    """An input whose prediction the edit must not change.

    Attributes:
        prompt: the text fed to the model.
        answer: the expected continuation; None means "the next token after the prompt".
    """

    prompt: str
    answer: str | None = None


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: for `prompt` the model should now answer `target`.

    Attributes:
        prompt: x_e, e.g. "The mother tongue of Danielle Darrieux is".
        target: y_e, e.g. "English" (a space is put between prompt and target).
        rephrases: paraphrases x'_e of the prompt that should give the same answer.
        locality: probes whose predictions should stay as they were.
        target_true: the answer before the edit, when known (CounterFact scores).
        neighborhood: prompts of unrelated subjects whose answer is `target_true` (CounterFact).
        subject: the entity the fact is about, as written in the prompt, when known
            (CounterFact, zsRE): where the locate-then-edit methods read their keys.
    """

    prompt: str
    target: str
    rephrases: tuple[str, ...] = field(default_factory=tuple)
    locality: tuple[Probe, ...] = field(default_factory=tuple)
    target_true: str | None = None
    neighborhood: tuple[str, ...] = field(default_factory=tuple)
    subject: str | None = None


# The three kinds of model (see mend.models.archs): how a (prompt, target) pair is read.
CAUSAL, SEQ2SEQ, CLASSIFIER = "causal", "seq2seq", "classifier"
KINDS = (CAUSAL, SEQ2SEQ, CLASSIFIER)


@dataclass(frozen=True)
class Layout:
    """How one model reads edit rows: what `mend.data.collate.make_batch` needs of it.

    Attributes:
        kind: "causal", "seq2seq" or "classifier".
        decoder_start: the token a seq2seq decoder starts from.
        labels: a classifier's label names -> class index (`config.label2id`).
    """

    kind: str = CAUSAL
    decoder_start: int | None = None
    labels: tuple[tuple[str, int], ...] = ()

    def label_index(self, target: str) -> int | None:
        """A classifier target's class: a label name (any case) or a class index; None if
        it is neither."""
        names = {name.lower(): i for name, i in self.labels}
        text = target.strip()
        if text.lower() in names:
            return names[text.lower()]
        if text.isdigit() and int(text) in names.values():
            return int(text)
        return None
