"""JSON on the request path: msgspec's decoder and encoder, with the standard library's meaning.

A streamed answer is a dozen or more small JSON events, each decoded once by the relay; with
the standard library that parsing was the largest single cost of a short stream after the
upstream call (about 8 µs per event on the 2-core target machine, 2 µs with msgspec).

:func:`loads` accepts exactly what ``json.loads`` accepts and returns the same values: msgspec
is tried first, and anything it refuses (``NaN``/``Infinity`` literals, numbers beyond a double,
lone surrogates, UTF-16/32 input, a byte-order mark) goes to ``json.loads``, which then decides
(and raises what it always raised). Both guard deep nesting with the interpreter's recursion
limit and raise ``RecursionError``. The two agree on everything both accept (duplicate keys: the
last wins; big integers stay exact; floats round alike); property tests in
``tests/gateway/test_jsonio.py`` hold them to it.

:func:`dumps` encodes values that came out of :func:`loads` or were built from str/int/bool/
None/list/dict. Its output is compact UTF-8 (no spaces, non-ASCII not escaped), equal as JSON to
``json.dumps``'s, except that a non-finite float, which is not JSON, becomes ``null`` where the
standard library wrote ``Infinity``/``NaN``.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_MsgspecError = msgspec.MsgspecError


def loads(data: bytes | str, **kwargs: Any) -> Any:
    """``json.loads(data, **kwargs)``, faster on the JSON that upstreams and clients send.

    ``kwargs`` (e.g. ``parse_constant``) only matter for inputs msgspec refuses, which are
    exactly the ones the standard library then parses with them.
    """
    try:
        return _decode(data)
    except _MsgspecError:
        return json.loads(data, **kwargs)


def dumps(obj: Any) -> bytes:
    """Compact JSON as bytes (see the module docstring for the one difference from ``json``)."""
    return _encode(obj)
