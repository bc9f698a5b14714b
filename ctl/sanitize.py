"""Rules for what devices send: every field is hostile input to the controller.

A device may publish its own ``event``, ``health`` and ``status`` (the broker's ACL allows it),
so a stolen cabinet can publish anything there. What the relay stores and what staff read is
bounded and cleaned here, in one place:

- text is cleaned before it is shown: line breaks, tabs and other whitespace controls become
  a space; every other control or format character (C0/C1, bidirectional overrides,
  zero-width marks, line/paragraph separators, surrogates, private use, unassigned) is
  removed; the rest is NFC and cut to a length, marked with ``…``;
- a value that is not one of ours (an unknown alert code, an odd key or reason) is shown as
  data: quoted, JSON-escaped, never as words staff would read as the relay's own;
- a device time (ms since the epoch) must lie within a window around the relay's clock;
  outside it the relay uses its own receive time and flags the record;
- a structured value (an alert's ``detail``) is kept only while its JSON stays small.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from agent.protocol import DEVICE_RE, MAX_PAYLOAD

CODE_MAX = 40  # alert codes (the agent's are ≤ 20)
KEY_MAX = 64  # alert keys (a path name, an item id)
REASON_MAX = 32  # status reasons
TEXT_MAX = 120  # any other device text shown in a table or a line
DETAIL_MAX_BYTES = 2048  # an alert's detail, as JSON
ELLIPSIS = "…"

TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # event types
WORD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")  # shown bare when it matches
_SPACE = {"\t", "\n", "\v", "\f", "\r", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028",
          "\u2029"}
_SPACES = re.compile(r"  +")
_DROP = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def parse_object(payload: bytes, max_bytes: int = MAX_PAYLOAD) -> dict | None:
    """A device's payload as a JSON object, or None: too large (64 KiB, the agent's own
    inbound limit), not UTF-8, not JSON (also nested too deep), or not an object."""
    if len(payload) > max_bytes:
        return None
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def clean(value: Any, max_len: int = TEXT_MAX) -> str:
    """``value`` as one line of plain text of at most ``max_len`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           default=str)
    text = text[: max_len * 4]  # bound the work before normalising
    out = []
    for ch in text:
        if ch in _SPACE:
            out.append(" ")
        elif unicodedata.category(ch) not in _DROP:
            out.append(ch)
    text = unicodedata.normalize("NFC", _SPACES.sub(" ", "".join(out)))
    return text if len(text) <= max_len else text[: max_len - 1] + ELLIPSIS


def quote(value: Any, max_len: int = TEXT_MAX) -> str:
    """``value`` shown as data: cleaned, in double quotes, JSON-escaped."""
    return json.dumps(clean(value, max_len), ensure_ascii=False)


def shown(value: Any, max_len: int = TEXT_MAX, safe: re.Pattern = WORD_RE) -> str:
    """``value`` bare when it is a plain word (``safe``), else quoted."""
    if isinstance(value, str) and len(value) <= max_len and safe.fullmatch(value):
        return value
    return quote(value, max_len)


def device_id(name: Any) -> str | None:
    """A device id as the protocol allows it (``[a-z0-9][a-z0-9-]{0,63}``), else None."""
    return name if isinstance(name, str) and DEVICE_RE.fullmatch(name) else None


def as_int(value: Any) -> int | None:
    """An integer (not a boolean) of sane size, else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**62
    return value if ok else None


def device_time(value: Any, now_ms: int, past_ms: int, future_ms: int) -> int | None:
    """A device time within [now - past, now + future], else None."""
    ts = as_int(value)
    return ts if ts is not None and now_ms - past_ms <= ts <= now_ms + future_ms else None


def bounded(value: Any, max_bytes: int = DETAIL_MAX_BYTES) -> Any:
    """``value`` when its JSON is at most ``max_bytes``, else None."""
    try:
        size = len(json.dumps(value, ensure_ascii=False).encode())
    except (TypeError, ValueError, RecursionError):
        return None
    return value if size <= max_bytes else None


def utf16_len(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2
