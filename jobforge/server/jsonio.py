"""Strict JSON in and out of the HTTP server: bounded nesting, no NaN/Infinity, no lone surrogates.

Python's `json` accepts `NaN`/`Infinity`, turns `1e999` into `inf`, keeps a lone `"\\ud800"` as a surrogate that
no encoder can write back, and raises `RecursionError` on `'[' * 10000`. Every request body goes through `loads`
(which turns each of these into a `BadJson` naming the rule and where it was found) and every reply through
`dumps` (`allow_nan=False`), so nothing the server writes is invalid JSON.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting of arrays/objects a request may have (a job config needs 5)."""


class BadJson(ValueError):
    """The body is not acceptable JSON; the message names the rule (and the JSON path when there is one)."""


def _reject_constant(name: str) -> Any:
    raise BadJson(f"{name} is not valid JSON (numbers must be finite)")


_PIECEWISE_BYTES = 64 * 1024
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SPACE = re.compile(r"[ \t\n\r]*")


def loads(body: bytes | str) -> Any:
    """Parse a request body; raises `BadJson` (never `RecursionError`) with a message naming the rule."""
    try:
        doc = _piecewise(body) if len(body) > _PIECEWISE_BYTES else json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise BadJson(f"nesting deeper than {MAX_DEPTH} levels") from None
    except BadJson:
        raise
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, int digit limit, bad UTF-8
        raise BadJson(str(exc)) from None
    _check(doc)
    return doc


def _piecewise(body: bytes | str) -> Any:
    """A top-level array decoded one element at a time. The C decoder holds the GIL for a whole document (a
    1 MiB batch of 10,000 calls: tens of milliseconds in which the event loop, and /health, wait on the thread
    parsing it); between elements the loop gets its turn. Same result and errors as `json.loads`."""
    text = body if isinstance(body, str) else body.decode(json.detect_encoding(body), "surrogatepass")
    pos = _SPACE.match(text).end()
    if not text.startswith("[", pos):
        return json.loads(text, parse_constant=_reject_constant)
    items: list[Any] = []
    pos = _SPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            item, pos = _DECODER.raw_decode(text, pos)
            items.append(item)
            pos = _SPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    end = _SPACE.match(text, pos).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return items


def _check(doc: Any) -> None:
    """Depth and string check without recursion: one pass over every value (and object key).

    Paths are kept as shared (parent, key) links and rendered only for the error, so a long key costs nothing
    per descendant."""
    stack: list[tuple[Any, int, Any]] = [(doc, 1, None)]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise BadJson(f"nesting deeper than {MAX_DEPTH} levels at {_path(where)}")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, where, " (an object key)")
                    stack.append((item, depth + 1, (where, key)))
            else:
                stack.extend((item, depth + 1, (where, i)) for i, item in enumerate(value))


def _check_text(text: str, where: Any, what: str = "") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadJson(f"string at {_path(where)}{what} holds a lone UTF-16 surrogate (\\ud800-\\udfff): "
                      "not valid Unicode") from None


def _path(where: Any) -> str:
    """`$.params.job_config.owner`, `$[3].id`: the JSON path of a value (keys shortened to 40 characters)."""
    parts: list[str] = []
    while where is not None:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else "." + (key if len(key) <= 40 else key[:40] + "..."))
    return "$" + "".join(reversed(parts[-MAX_DEPTH - 1:]))


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dumps(obj: Any) -> str:
    """Reply bodies: strict JSON (ValueError on NaN/Infinity instead of writing them).

    A list of more than `_PIECE` items (a history page) is encoded item by item, with the same text as one
    `json.dumps`: in a thread (`jsonrpc`), the event loop then takes the GIL between items instead of waiting
    for one long C call (a 500-job page is ~2 MB, tens of ms)."""
    return _dumps(obj, 0)


_PIECE = 64
_PIECE_DEPTH = 3  # a reply -> its result -> the result's list: how deep a long list is looked for


def _dumps(obj: Any, depth: int) -> str:
    if isinstance(obj, list) and len(obj) > _PIECE:
        return "[" + ", ".join(json.dumps(item, allow_nan=False) for item in obj) + "]"
    if depth < _PIECE_DEPTH and isinstance(obj, dict) and all(type(key) is str for key in obj) \
            and any(isinstance(value, (list, dict)) for value in obj.values()):
        return "{" + ", ".join(f"{json.dumps(key)}: {_dumps(value, depth + 1)}" for key, value in obj.items()) + "}"
    return json.dumps(obj, allow_nan=False)
