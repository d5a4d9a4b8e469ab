"""gateway.jsonio: msgspec underneath, the standard library's meaning on top.

The relay decodes every upstream stream event with ``jsonio.loads`` and re-encodes the events it
changes with ``jsonio.dumps``; these tests hold both to ``json``'s behaviour on what clients and
upstreams can send, malformed input included.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.jsonio import dumps, loads

SETTINGS = settings(max_examples=300, deadline=None, database=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


def same(a: object, b: object) -> bool:
    """Equal values of equal JSON types (True == 1 and 1 == 1.0 in Python; not here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def outcome(fn, data):
    try:
        return "ok", fn(data)
    except ValueError:
        return "error", None  # json.JSONDecodeError or UnicodeDecodeError: both ValueErrors


@SETTINGS
@given(json_values, st.booleans(), st.sampled_from([None, 1]), st.sampled_from(["bytes", "str"]))
def test_loads_equals_json_loads_on_valid_json(value, ascii_only, indent, kind):
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    data = text.encode() if kind == "bytes" else text
    assert same(loads(data), json.loads(data))


@SETTINGS
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_loads_accepts_and_refuses_exactly_what_json_loads_does(data):
    mine, theirs = outcome(loads, data), outcome(json.loads, data)
    assert mine[0] == theirs[0]
    if mine[0] == "ok":
        assert same(mine[1], theirs[1])


@pytest.mark.parametrize("data", [
    b'{"a": NaN}', b"Infinity", b"-Infinity", b"[1e400]", b'"\\ud800"', b'{"a":1,"a":2}',
    b"123456789012345678901234567890", "{\"\u00e9\": 1}".encode("utf-16"), b"\xef\xbb\xbf{}",
    b'{"a":1} trailing', b"", b"   ", b'{"a": [1, 2.5, null, true, false, "x"]}',
])
def test_loads_matches_json_loads_on_the_edge_cases_msgspec_refuses(data):
    mine, theirs = outcome(loads, data), outcome(json.loads, data)
    assert mine[0] == theirs[0], data
    if mine[0] == "ok":
        assert same(mine[1], theirs[1])


def test_loads_passes_the_standard_librarys_hooks_for_what_it_parses():
    def refuse(name):
        raise ValueError(name)

    with pytest.raises(ValueError, match="NaN"):
        loads(b'{"t": NaN}', parse_constant=refuse)
    assert loads(b'{"t": 0.5}', parse_constant=refuse) == {"t": 0.5}


@pytest.mark.parametrize("depth", [100, 5_000])
def test_deep_nesting_fails_or_succeeds_like_json(depth):
    # Both guard their recursion with the interpreter's limit: the same RecursionError (a 400
    # at the endpoint), or the same value. The limit is the server's default here; test
    # plugins may have raised it for their own use.
    deep = b"[" * depth + b"]" * depth

    def result(fn):
        try:
            return fn(deep)
        except RecursionError:
            return RecursionError

    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        assert result(loads) == result(json.loads)
    finally:
        sys.setrecursionlimit(saved)


@SETTINGS
@given(json_values)
def test_dumps_round_trips_through_both_decoders(value):
    encoded = dumps(value)
    assert isinstance(encoded, bytes)
    assert same(json.loads(encoded), value) and same(loads(encoded), value)


def test_dumps_writes_non_finite_floats_as_null():
    assert json.loads(dumps({"x": float("inf"), "y": float("nan")})) == {"x": None, "y": None}
