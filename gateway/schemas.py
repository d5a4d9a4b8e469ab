"""Typed request models of the HTTP API (validation and the OpenAPI document).

The gateway validates the fields it *uses* (strictly: ``"true"`` is not a boolean) and forwards
the client's original JSON object to the upstream, so every other OpenAI field (temperature,
tools, response_format, stop, n, user, seed, logit_bias, ... and fields that do not exist yet)
reaches the upstream unchanged. Only ``routing`` (Pura's extension) is removed, ``model`` is set
to the upstream's id of the chosen model, and ``stream_options.include_usage`` may be added so
that streams report usage.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

EXPERIMENTAL_HINTS = ("maxCost", "maxLatency", "excludeProviders", "cascadeThreshold", "cascadeMaxEscalations")


class RoutingHints(BaseModel):
    """Pura's routing extension of the request body (``"routing": {...}``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    quality: Literal["low", "balanced", "high"] | None = Field(
        default=None, description="shift the complexity tier down (low) or up (high)"
    )
    prefer: str | None = Field(
        default=None, min_length=1, max_length=64, description="provider whose weight is doubled"
    )
    maxCost: float | None = Field(
        default=None,
        gt=0,
        validation_alias=AliasChoices("maxCost", "max_cost"),
        description="experimental: max price in USD per 1K tokens (the route's higher price)",
    )
    maxLatency: float | None = Field(
        default=None,
        gt=0,
        validation_alias=AliasChoices("maxLatency", "max_latency"),
        description="experimental: max average latency in ms over the route's window",
    )
    excludeProviders: list[str] | None = Field(
        default=None,
        max_length=64,
        validation_alias=AliasChoices("excludeProviders", "exclude_providers"),
        description="experimental: providers never to use for this request",
    )
    cascade: bool | None = Field(
        default=None, description="cascade on/off for model auto (default from the routing file)"
    )
    cascadeThreshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        validation_alias=AliasChoices("cascadeThreshold", "cascade_threshold"),
        description="experimental: accept threshold of the answer score",
    )
    cascadeMaxEscalations: int | None = Field(
        default=None,
        ge=0,
        le=3,
        validation_alias=AliasChoices("cascadeMaxEscalations", "cascade_max_escalations"),
        description="experimental: at most this many escalations",
    )

    def experimental_used(self) -> list[str]:
        return [name for name in EXPERIMENTAL_HINTS if getattr(self, name) is not None]


class ChatMessage(BaseModel):
    """One message; unknown fields are allowed and forwarded."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.role in ("system", "developer", "user", "tool") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Unknown fields are allowed and forwarded."""

    model_config = ConfigDict(extra="allow", strict=True)

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    model: str | None = Field(
        default=None, min_length=1, max_length=256, description='"auto" or absent: Pura chooses'
    )
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    routing: RoutingHints | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used for every error status."""

    error: ErrorBody
