"""What the service accepts: request bodies (unknown fields refused) and their limits."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from mend.types import EditRequest

MAX_BODY_BYTES = 64 * 1024  # a request body, in bytes (413 above)
MAX_PROMPT_CHARS = 2000  # a prompt, paraphrase or target, in characters (422 above)
MAX_REQUESTS = 32  # requests in one edit or one score call
MAX_REPHRASES = 8  # paraphrases of one request
MAX_NEW_TOKENS = 64  # tokens one generate call may ask for
MAX_ANSWERS = 32  # candidate answers one score call may weigh
MAX_PAGE = 100  # edits one page of GET /v1/edits may hold
# Prompts are also held to the model's context (in tokens) by mend's own tokenisation.

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Fact(Strict):
    """One request: for `prompt` the model should answer `target`."""

    prompt: Text
    target: Text
    rephrases: list[Text] = Field(default_factory=list, max_length=MAX_REPHRASES)

    def request(self) -> EditRequest:
        return EditRequest(self.prompt, self.target, tuple(self.rephrases))


class EditIn(Strict):
    """One edit of every request together (one request: a single edit; several: a batched
    edit, made and rolled back as one)."""

    requests: list[Fact] = Field(min_length=1, max_length=MAX_REQUESTS)
    compare: bool = Field(
        default=True, description="answer every prompt and paraphrase greedily before and after"
    )


class ScoreIn(Strict):
    """Candidate answers to weigh after one prompt."""

    prompt: Text
    answers: list[Text] = Field(min_length=1, max_length=MAX_ANSWERS)


class GenerateIn(Strict):
    """A continuation: greedy, or sampled when a seed is given (the same seed, the same text
    on the same weights)."""

    prompt: Text
    max_new_tokens: int = Field(default=8, ge=1, le=MAX_NEW_TOKENS)
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="sample with this seed")
    temperature: float = Field(default=1.0, gt=0, le=10)
    top_p: float = Field(default=1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _sampled_with_a_seed(self):
        if self.seed is None and {"temperature", "top_p"} & self.model_fields_set:
            raise ValueError("temperature and top_p choose how to sample: give a seed too")
        return self

    def sampling(self) -> dict:
        return {} if self.seed is None else {"temperature": self.temperature, "top_p": self.top_p}
