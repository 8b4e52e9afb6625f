"""What the service accepts: request bodies (unknown fields refused) and their limits."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mend.types import EditRequest

MAX_BODY_BYTES = 64 * 1024  # a request body, in bytes (413 above)
MAX_PROMPT_CHARS = 2000  # a prompt, paraphrase or target, in characters (422 above)
MAX_REQUESTS = 32  # requests in one edit or one score call
MAX_REPHRASES = 8  # paraphrases of one request
MAX_NEW_TOKENS = 64  # tokens one generate call may ask for
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
    """One edit of every request together."""

    requests: list[Fact] = Field(min_length=1, max_length=MAX_REQUESTS)
    compare: bool = False  # answer every prompt and paraphrase before and after


class ScoreIn(Strict):
    requests: list[Fact] = Field(min_length=1, max_length=MAX_REQUESTS)


class GenerateIn(Strict):
    prompt: Text
    max_new_tokens: int = Field(default=8, ge=1, le=MAX_NEW_TOKENS)
