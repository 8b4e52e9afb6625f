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
