"""Request bodies of the OpenAI and Anthropic endpoints (pydantic models) and the error a request can end in.

The models validate types and ranges only; what a value means for generation (the context check, the tool
choice, the prompt) is decided by the server. Fields clients send by default but flashmoe does not implement
are accepted at their neutral values and refused otherwise (`unsupported()`), as are the API's other options
that would shape the output (response_format, logit_bias, ...); fields that change nothing in the output
(user, metadata, store, service_tier) are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse


class SamplingBody(BaseModel):
    """Fields every generation request shares: the sampling settings (flashmoe.serve.sampling.SAMPLING_KEYS)
    and the seed; None means the model's default."""

    # JSON as Python reads it has NaN and Infinity: refused as "not a finite number", not as out of range.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-1, description="-1: a random seed, as None")
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
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        names = [k for k in ("presence_penalty", "frequency_penalty", "logit_bias") if getattr(self, k)]
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
    # OpenAI options that shape the output in ways flashmoe does not implement: refused when set (see
    # unsupported); a field that is none of these nor above is ignored, as OpenAI's API does with most.
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.response_format is not None and self.response_format.get("type") != "text":
            names.append("response_format")  # json_object, json_schema: no constrained decoding
        if self.modalities not in (None, ["text"]):
            names.append("modalities")
        return names + [k for k in ("top_logprobs", "audio", "prediction", "web_search_options", "functions",
                                    "function_call") if getattr(self, k)]


class CompletionRequest(OpenAIBody):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        extra = [k for k in ("echo", "suffix") if getattr(self, k)] + (["best_of"] if (self.best_of or 1) > 1 else [])
        return super().unsupported() + extra


# ---- the Anthropic Messages API ------------------------------------------------------------------

class AnthropicMessage(BaseModel):
    """One turn; content is a string or a list of content blocks (text, tool_use, tool_result, thinking), read
    by flashmoe.serve.anthropic_api."""

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class AnthropicToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(BaseModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)


class CountTokensRequest(SamplingBody):
    """POST /v1/messages/count_tokens: everything that makes the prompt."""

    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages. temperature is 0..1 in Anthropic's API; flashmoe accepts OpenAI's 0..2."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    metadata: dict[str, Any] | None = None
    # Server-side tools Anthropic runs for the model: refused when set.
    mcp_servers: list[Any] | None = None
    container: str | dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        return [k for k in ("mcp_servers", "container") if getattr(self, k)]


class APIError(Exception):
    """An error reported to the client with an HTTP status; each API writes it in its own shape.

    Args:
        status: the HTTP status.
        message: what went wrong, for a person.
        param: the request field at fault (dotted path), when one is.
        type: OpenAI's error type (invalid_request_error, server_error, ...).
        code: OpenAI's error code where its API gives one (invalid_api_key, model_not_found), else None.
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                           "message": self.message}}

    def response(self, path: str, headers: dict[str, str] | None = None) -> JSONResponse:
        """The error in the shape of the API `path` belongs to: Anthropic's under /v1/messages, else OpenAI's."""
        if path.startswith("/v1/messages"):
            return JSONResponse(self.anthropic_body(), status_code=self.status, headers=headers)
        return JSONResponse(self.openai_body(), status_code=self.status, headers=headers)


# Anthropic's error type for each HTTP status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
