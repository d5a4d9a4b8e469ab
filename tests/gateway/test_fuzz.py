"""Schema-driven fuzz of the HTTP API with hypothesis: no 500s, every error OpenAI-shaped.

Request bodies are generated from the gateway's own OpenAPI document (the JSON schema of
``ChatCompletionRequest`` and its components), then sometimes mutated (a value replaced by
arbitrary JSON, a required field dropped) so both the valid and the invalid space are explored.
Quick profile by default; ``PURA_LONG=1`` runs the long one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LONG = os.environ.get("PURA_LONG") == "1"
EXAMPLES = 1500 if LONG else 120

JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
ANY_JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


class SchemaStrategies:
    """A JSON-schema (OpenAPI 3.1 subset) to hypothesis strategy compiler."""

    def __init__(self, components: dict[str, Any]) -> None:
        self.components = components

    def build(self, schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy:
        if "$ref" in schema:
            return st.deferred(lambda: self.build(self.components[schema["$ref"].rsplit("/", 1)[1]], depth))
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return st.one_of([self.build(s, depth) for s in schema[key]])
        kind = schema.get("type")
        if isinstance(kind, list):
            return st.one_of([self.build(dict(schema, type=k), depth) for k in kind])
        if kind == "null":
            return st.none()
        if kind == "boolean":
            return st.booleans()
        if kind == "integer":
            low = schema.get("minimum", -(2**40))
            high = schema.get("maximum", 2**40)
            if "exclusiveMinimum" in schema:
                low = schema["exclusiveMinimum"] + 1
            return st.integers(low, high)
        if kind == "number":
            low = schema.get("minimum", schema.get("exclusiveMinimum"))
            high = schema.get("maximum")
            return st.floats(
                min_value=low, max_value=high, allow_nan=False, allow_infinity=False,
                exclude_min="exclusiveMinimum" in schema,
            )
        if kind == "string":
            return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
        if kind == "array":
            items = schema.get("items", {})
            inner = self.build(items, depth + 1) if items else ANY_JSON
            return st.lists(inner, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
        if kind == "object" or "properties" in schema:
            props = schema.get("properties", {})
            required = set(schema.get("required", []))
            optional = {k: self.build(v, depth + 1) for k, v in props.items() if k not in required}
            fixed = {k: self.build(v, depth + 1) for k, v in props.items() if k in required}
            extra = (
                st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in props), ANY_JSON, max_size=2)
                if schema.get("additionalProperties", True) is not False and depth < 2
                else st.just({})
            )
            return st.builds(
                lambda a, b, c: {**c, **a, **b},
                st.fixed_dictionaries(fixed, optional=optional),
                st.just({}),
                extra,
            )
        return ANY_JSON


def _mutate(value: Any, data: st.DataObject) -> Any:
    """Sometimes replace a nested value with arbitrary JSON or drop a key."""
    if isinstance(value, dict) and value and data.draw(st.booleans(), label="descend"):
        key = data.draw(st.sampled_from(sorted(value)), label="key")
        action = data.draw(st.sampled_from(["replace", "drop", "descend"]), label="action")
        out = dict(value)
        if action == "replace":
            out[key] = data.draw(ANY_JSON, label="replacement")
        elif action == "drop":
            del out[key]
        else:
            out[key] = _mutate(out[key], data)
        return out
    if isinstance(value, list) and value and data.draw(st.booleans(), label="descend-list"):
        i = data.draw(st.integers(0, len(value) - 1), label="index")
        out = list(value)
        out[i] = _mutate(out[i], data)
        return out
    return value


def _assert_openai_error(response: httpx.Response) -> None:
    assert response.status_code != 500, response.text
    assert response.status_code < 600
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]


@pytest.fixture(scope="module")
def openapi(stack) -> dict:
    return httpx.get(stack.gateway.url + "/openapi.json").json()


@pytest.fixture(scope="module")
def fuzz_key(stack) -> str:
    return stack.create_key(daily_budget_usd="100000", rate_limit_per_min=10_000_000)


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as client:
        yield client


def test_openapi_documents_the_chat_body(openapi: dict) -> None:
    body = openapi["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert "RoutingHints" in openapi["components"]["schemas"]


def test_fuzz_chat_completions_never_500(openapi: dict, fuzz_key: str, http: httpx.Client) -> None:
    compiler = SchemaStrategies(openapi["components"]["schemas"])
    bodies = compiler.build({"$ref": "#/components/schemas/ChatCompletionRequest"})

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies, data=st.data(), mutate=st.booleans())
    def run(body: dict, data: st.DataObject, mutate: bool) -> None:
        if mutate:
            body = _mutate(body, data)
        if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = min(body["max_tokens"], 2_000)  # keep stand-in answers small
        response = http.post(
            "/v1/chat/completions",
            content=json.dumps(body),
            headers={"Authorization": f"Bearer {fuzz_key}", "Content-Type": "application/json"},
        )
        _assert_openai_error(response)
        if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
            assert "data: " in response.text

    run()


def test_fuzz_raw_bodies_headers_and_paths(fuzz_key: str, http: httpx.Client) -> None:
    raw_bodies = st.one_of(
        st.binary(max_size=200),
        ANY_JSON.map(lambda v: json.dumps(v).encode()),
        st.integers(1_000, 50_000).map(lambda depth: b"[" * depth),  # deep nesting
        st.just(b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
        st.just(b'{"messages": [{"role": "user", "content": "x"}], "top_p": 1e400, "seed": 1e-400}'),
    )
    auth = st.one_of(
        st.just(f"Bearer {fuzz_key}"), st.just("Bearer"), st.just(""), st.text(max_size=30),
        st.just("Basic abc"), st.just("Bearer pura_" + "0" * 48),
    )
    paths = st.one_of(
        st.sampled_from(["/v1/models", "/api/report", "/api/income", "/health", "/v1/models/x"]),
        st.text(alphabet="abcxyz/._-%", max_size=30).map(lambda p: "/" + p.lstrip("/")),
    )
    query = st.sampled_from(["", "?scope=all", "?scope=key", "?scope=zzz", "?scope="])

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=raw_bodies, authorization=auth, path=paths, q=query,
           method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    def run(body: bytes, authorization: str, path: str, q: str, method: str) -> None:
        headers = {"Content-Type": "application/json"}
        # only values that are legal in an HTTP header (others never reach the application:
        # the client library or the HTTP server's parser rejects them first)
        if authorization.isascii() and authorization.isprintable() and authorization.strip() == authorization:
            headers["Authorization"] = authorization
        response = http.post("/v1/chat/completions", content=body, headers=headers)
        _assert_openai_error(response)
        other = http.request(method, path + q, headers=headers)
        assert other.status_code != 500, (method, path, other.text)

    run()


def test_oversized_body_is_413(http: httpx.Client, fuzz_key: str) -> None:
    response = http.post(
        "/v1/chat/completions",
        content=b'{"messages": [{"role": "user", "content": "' + b"x" * (9 * 1024 * 1024) + b'"}]}',
        headers={"Authorization": f"Bearer {fuzz_key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
