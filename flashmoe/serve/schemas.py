"""Request bodies of the OpenAI-compatible endpoints (pydantic models) and the error a request can end in.

The models validate types and ranges only; what a value means for generation (the context check, the tool
choice, the prompt) is decided by the server. Fields clients send by default but flashmoe does not implement
are accepted at their neutral values and refused otherwise (`unsupported()`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingBody(BaseModel):
    """Fields every generation request shares: the sampling settings (flashmoe.serve.sampling.SAMPLING_KEYS)
    and the seed; None means the model's default."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stream: bool = False

    def unsupported(self) -> list[str]:
        """Names of options this request sets that flashmoe does not implement."""
        return []


class OpenAIBody(SamplingBody):
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    # Accepted only at their neutral values (clients send them by default); anything else is a 400.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None

    def unsupported(self) -> list[str]:
        names = [k for k in ("presence_penalty", "frequency_penalty") if getattr(self, k)]
        return names + (["logprobs"] if self.logprobs not in (None, False) else [])


class FunctionDef(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(OpenAIBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(OpenAIBody):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        extra = [k for k in ("echo", "suffix") if getattr(self, k)] + (["best_of"] if (self.best_of or 1) > 1 else [])
        return super().unsupported() + extra


class APIError(Exception):
    """An error reported to the client with an HTTP status; each API writes it in its own shape.

    Args:
        status: the HTTP status.
        message: what went wrong, for a person.
        param: the request field at fault (dotted path), when one is.
        type: OpenAI's error type (invalid_request_error, server_error, ...).
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}
