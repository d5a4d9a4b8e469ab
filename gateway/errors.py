"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

The official ``openai`` client turns these into its own exception types by status:
400 ``BadRequestError``, 401 ``AuthenticationError``, 402 ``APIStatusError``, 404
``NotFoundError``, 429 ``RateLimitError``, 5xx ``InternalServerError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.responses import Response


class GatewayError(Exception):
    """An error that becomes an OpenAI error response."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, extra_headers: Mapping[str, str] | None = None) -> Response:
        headers = dict(self.headers)
        if extra_headers:
            headers.update(extra_headers)
        return Response(
            content=json.dumps(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=headers,
        )


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param)


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"The request body exceeds {limit} bytes.", "invalid_request_error", "request_too_large"
    )


def unauthorized(message: str = "Invalid API key. Keys look like pura_<48 hex>.") -> GatewayError:
    return GatewayError(401, message, "invalid_request_error", "invalid_api_key")


def budget_exhausted(remaining_usd: str) -> GatewayError:
    return GatewayError(
        402,
        "Daily budget exhausted for this key (it resets at 00:00 UTC).",
        "budget_exceeded",
        "budget_exhausted",
        headers={"X-Pura-Budget-Remaining": remaining_usd},
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist on this gateway; GET /v1/models lists the models.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def rate_limited(retry_after_s: int, limit: int) -> GatewayError:
    return GatewayError(
        429,
        f"Rate limit of {limit} requests per minute reached; retry in {retry_after_s} s.",
        "rate_limit_error",
        "rate_limit_exceeded",
        headers={
            "Retry-After": str(retry_after_s),
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": "0",
        },
    )


def no_route(message: str) -> GatewayError:
    return GatewayError(503, message, "service_unavailable", "no_eligible_provider")


def upstream_failed(timeout: bool, attempts: int) -> GatewayError:
    if timeout:
        return GatewayError(
            504,
            f"The upstream did not answer in time ({attempts} attempt(s), fallbacks included).",
            "upstream_error",
            "upstream_timeout",
        )
    return GatewayError(
        502,
        f"The upstream failed ({attempts} attempt(s), fallbacks included).",
        "upstream_error",
        "upstream_failed",
    )
