"""The v1 wire contract: topics, envelopes, canonical JSON, Ed25519 signatures, reason codes.

Everything here is pure: it parses and checks bytes and returns values or raises
:class:`Rejected`. What is remembered (replay ids) and what the clock says are passed in.
See docs/PROTOCOL.md.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAX_PAYLOAD = 64 * 1024
# The largest integer an envelope or document may hold, anywhere in it (``ts``, ``exp``, ``rev``,
# arguments): 2^53 - 1, JSON's exactly representable range (I-JSON, RFC 7493 §2.2), which RFC 8785
# canonical JSON assumes. Larger values would also overflow SQLite's 64-bit integers.
MAX_INT = 2**53 - 1
CMD_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
DEVICE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
TARGET_RE = re.compile(r"^(dev|grp)/[a-z0-9][a-z0-9-]{0,63}$")
KID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

COMMAND_TYPES = ("play", "live", "say", "stop", "volume", "board", "test", "state", "ping")
DOCUMENT_TYPES = ("schedule", "board")

# Ack stages (SPEC §7); the final ones end a command's lifecycle.
STAGES = ("received", "rejected", "queued", "started", "done", "preempted", "resumed",
          "stopped", "failed", "expired")
FINAL_STAGES = frozenset({"rejected", "done", "stopped", "failed", "expired"})

# Reason codes.
BAD_JSON = "bad_json"
BAD_ENVELOPE = "bad_envelope"
BAD_ARGS = "bad_args"
UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown_key"
BAD_SIGNATURE = "bad_signature"
WRONG_TARGET = "wrong_target"
REPLAYED = "replayed"
EXPIRED = "expired"
CLOCK_SKEW = "clock_skew"
RETAINED_COMMAND = "retained_command"
TOO_LARGE = "too_large"
UNSUPPORTED_TYPE = "unsupported_type"
STALE_REV = "stale_rev"
INTERNAL_ERROR = "internal_error"  # a handler raised: a bug, answered, never fatal

_COMMAND_KEYS = {"v", "id", "type", "target", "ts", "exp", "args", "sig"}
_DOCUMENT_KEYS = _COMMAND_KEYS | {"rev"}


class Priority(enum.StrEnum):
    """How urgent an audio item or a board message is: the one definition (SPEC §7).

    A member is its wire string (``Priority.EMERGENCY == "emergency"``, same hash, and JSON
    writes it as that string), so it can stand wherever the string stood. Members compare by
    urgency, never alphabetically: ``EMERGENCY > PRIORITY > NORMAL``; comparing with anything
    that is not a priority raises TypeError. To put the most urgent first, sort by
    :attr:`order`. Both come from the order of the members below, most urgent first.
    """

    EMERGENCY = "emergency"
    PRIORITY = "priority"
    NORMAL = "normal"

    @classmethod
    def parse(cls, value: object) -> Priority | None:
        """The priority a wire string names, or None."""
        return _PRIORITY_BY_WIRE.get(value) if isinstance(value, str) else None

    @property
    def order(self) -> int:
        """Place in airing order: 0 for the most urgent. Sort ascending by it."""
        return _PRIORITY_ORDER[self]

    def _versus(self, other: object) -> int:
        other_p = Priority.parse(other)
        if other_p is None:
            raise TypeError(f"a priority compares only with a priority, not {other!r}")
        return other_p.order - self.order  # > 0: self is more urgent

    def __gt__(self, other: object) -> bool:
        return self._versus(other) > 0

    def __ge__(self, other: object) -> bool:
        return self._versus(other) >= 0

    def __lt__(self, other: object) -> bool:
        return self._versus(other) < 0

    def __le__(self, other: object) -> bool:
        return self._versus(other) <= 0


_PRIORITY_ORDER = {p: i for i, p in enumerate(Priority)}
_PRIORITY_BY_WIRE = {p.value: p for p in Priority}


class Rejected(Exception):
    """An inbound message refused with a reason code (and the id, once it is known)."""

    def __init__(self, reason: str, message: str, cmd_id: str | None = None, **detail: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.cmd_id = cmd_id
        self.detail = detail


@dataclass
class Envelope:
    id: str | None
    type: str
    target: str
    ts: int
    args: dict
    exp: int | None = None
    rev: int | None = None
    kid: str | None = None
    signed: bool = False
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def priority(self) -> Priority:
        """The command's priority; normal when missing or not a priority."""
        return Priority.parse(self.args.get("priority", "normal")) or Priority.NORMAL


# --- topics ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Topics:
    prefix: str
    device: str

    def dev(self, leaf: str) -> str:
        return f"{self.prefix}/dev/{self.device}/{leaf}"

    def grp(self, group: str, leaf: str) -> str:
        return f"{self.prefix}/grp/{group}/{leaf}"

    def inbound(self, groups: list[str]) -> list[tuple[str, str]]:
        """(topic, kind) for every inbound subscription; kind is cmd, schedule or board."""
        targets = [f"dev/{self.device}"] + [f"grp/{g}" for g in _with_all(groups)]
        out = []
        for t in targets:
            out.append((f"{self.prefix}/{t}/cmd", "cmd"))
            out.append((f"{self.prefix}/{t}/desired/schedule", "schedule"))
            out.append((f"{self.prefix}/{t}/desired/board", "board"))
        return out

    def classify(self, topic: str) -> tuple[str, str] | None:
        """Map an inbound topic to (target, kind), or None if it is not one of ours."""
        if not topic.startswith(self.prefix + "/"):
            return None
        rest = topic[len(self.prefix) + 1:].split("/")
        if len(rest) == 3 and rest[2] == "cmd":
            kind = "cmd"
        elif len(rest) == 4 and rest[2] == "desired" and rest[3] in DOCUMENT_TYPES:
            kind = rest[3]
        else:
            return None
        if rest[0] not in ("dev", "grp"):
            return None
        return f"{rest[0]}/{rest[1]}", kind


def _with_all(groups: list[str]) -> list[str]:
    return list(dict.fromkeys([*groups, "all"]))


# --- canonical JSON and signatures -------------------------------------------------------

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(obj: dict) -> bytes:
    """RFC 8785 (JCS) canonical form of a float-free JSON object."""
    return _CANONICAL.encode(obj).encode()


def signed_bytes(envelope: dict) -> bytes:
    return canonical({k: v for k, v in envelope.items() if k != "sig"})


def sign(envelope: dict, private_key: Ed25519PrivateKey, kid: str) -> dict:
    """Return a copy of ``envelope`` with its ``sig``."""
    out = {k: v for k, v in envelope.items() if k != "sig"}
    val = private_key.sign(signed_bytes(out))
    out["sig"] = {"kid": kid, "alg": "Ed25519", "val": base64.b64encode(val).decode()}
    return out


def load_public_keys(trusted: dict[str, str]) -> dict[str, Ed25519PublicKey]:
    return {kid: Ed25519PublicKey.from_public_bytes(base64.b64decode(b64))
            for kid, b64 in trusted.items()}


def public_key_b64(private_key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


# --- parsing -----------------------------------------------------------------------------

def decode(payload: bytes) -> dict:
    """Bytes to a JSON object, or :class:`Rejected` (too_large, bad_json)."""
    if len(payload) > MAX_PAYLOAD:
        raise Rejected(TOO_LARGE, f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        obj = _DECODER.decode(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Rejected(BAD_JSON, f"not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise Rejected(BAD_JSON, "payload must be a JSON object")
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # made once: it is on every command


def peek_id(obj: dict) -> str | None:
    """The command id if it is well formed (so early rejections can name it)."""
    cid = obj.get("id")
    return cid if isinstance(cid, str) and CMD_ID_RE.match(cid) else None


def parse_envelope(obj: dict, kind: str) -> Envelope:
    """Check the envelope's shape (not its signature). ``kind``: cmd, schedule or board."""
    cid = peek_id(obj)
    allowed = _COMMAND_KEYS if kind == "cmd" else _DOCUMENT_KEYS

    def bad(msg: str) -> Rejected:
        return Rejected(BAD_ENVELOPE, msg, cid)

    extra = sorted(set(obj) - allowed)
    if extra:
        raise bad(f"unknown envelope keys: {', '.join(extra)}")
    if obj.get("v") != 1 or isinstance(obj.get("v"), bool):
        raise bad("v must be 1")
    problem = _number_problem(obj)
    if problem:
        raise bad(problem)
    if (kind == "cmd" or "id" in obj) and cid is None:
        raise bad("id must be 1-64 of [A-Za-z0-9._:-]")
    typ = obj.get("type")
    if not isinstance(typ, str) or not typ:
        raise bad("type must be a non-empty string")
    if kind != "cmd" and typ != kind:
        raise bad(f"a desired/{kind} document must have type {kind!r}")
    target = obj.get("target")
    if not isinstance(target, str) or not TARGET_RE.match(target):
        raise bad("target must be dev/ID or grp/G")
    ts = obj.get("ts")
    if not _is_int(ts) or ts < 0:
        raise bad(f"ts must be an integer 0-{MAX_INT} (ms since the epoch)")
    exp = obj.get("exp")
    if exp is not None and (not _is_int(exp) or exp < 0):
        raise bad(f"exp must be an integer 0-{MAX_INT} (ms since the epoch)")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise bad("args must be an object")
    rev = obj.get("rev")
    if kind != "cmd" and (not _is_int(rev) or rev < 0):
        raise bad(f"rev must be an integer 0-{MAX_INT}")
    sig = obj.get("sig")
    kid = None
    if sig is not None:
        if not isinstance(sig, dict) or set(sig) != {"kid", "alg", "val"}:
            raise bad("sig must be {kid, alg, val}")
        kid = sig["kid"]
        if not isinstance(kid, str) or not KID_RE.match(kid):
            raise bad("sig.kid must be 1-64 of [A-Za-z0-9._:-]")
        if sig["alg"] != "Ed25519":
            raise bad("sig.alg must be Ed25519")
        if not isinstance(sig["val"], str):
            raise bad("sig.val must be a base64 string")
    return Envelope(id=cid, type=typ, target=target, ts=ts, args=args, exp=exp, rev=rev,
                    kid=kid, raw=obj)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def valid_int(v: Any) -> bool:
    """An integer an envelope may hold: not a boolean, within ±:data:`MAX_INT`."""
    return _is_int(v) and -MAX_INT <= v <= MAX_INT


def _numbers(obj: Any) -> Iterator[int | float]:
    """Every number in ``obj``, at any depth (iteratively: a 64 KiB payload may nest deep)."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield value


def _has_float(obj: Any) -> bool:
    return any(isinstance(n, float) for n in _numbers(obj))


def _number_problem(obj: Any) -> str | None:
    """Why the numbers in ``obj`` are not v1's, or None: v1 is float-free (so the canonical
    form is plain ``json.dumps``) and its integers are within ±:data:`MAX_INT`."""
    for n in _numbers(obj):
        if isinstance(n, float):
            return "v1 envelopes hold no floating-point numbers"
        if not -MAX_INT <= n <= MAX_INT:
            return f"integers must be within ±{MAX_INT} (2^53 - 1)"
    return None


def verify(env: Envelope, keys: dict[str, Ed25519PublicKey], require_signed: bool) -> None:
    """Check the signature; with ``require_signed`` a missing or bad one is refused."""
    sig = env.raw.get("sig")
    if sig is None:
        if require_signed:
            raise Rejected(UNSIGNED, "the command is not signed", env.id)
        return
    key = keys.get(env.kid or "")
    if key is None:
        if require_signed:
            raise Rejected(UNKNOWN_KEY, f"key {env.kid!r} is not trusted", env.id)
        return
    try:
        val = base64.b64decode(sig["val"], validate=True)
        key.verify(val, signed_bytes(env.raw))
    except (InvalidSignature, binascii.Error, ValueError):
        raise Rejected(BAD_SIGNATURE, "the signature does not verify", env.id) from None
    env.signed = True


def check_time(env: Envelope, now_ms: int, trusted: bool, max_skew_s: int) -> None:
    """Expiry and clock skew. An untrusted clock never blocks an emergency (SPEC §6)."""
    emergency = env.priority is Priority.EMERGENCY
    if env.exp is not None and now_ms > env.exp and (trusted or not emergency):
        raise Rejected(EXPIRED, "the command is past its exp", env.id, exp=env.exp, now=now_ms)
    if trusted and now_ms - env.ts > max_skew_s * 1000:
        raise Rejected(EXPIRED, f"ts is more than {max_skew_s} s in the past",
                       env.id, ts=env.ts, now=now_ms)
    if trusted and env.ts - now_ms > max_skew_s * 1000:
        raise Rejected(CLOCK_SKEW, f"ts is more than {max_skew_s} s in the future",
                       env.id, ts=env.ts, now=now_ms)


Validator = Callable[[dict], list[str]]


def ack(cmd_id: str | None, stage: str, ts: int, reason: str | None = None,
        detail: dict | None = None) -> dict:
    out: dict[str, Any] = {"v": 1, "id": cmd_id, "stage": stage, "ts": ts}
    if reason:
        out["reason"] = reason
    if detail:
        out["detail"] = detail
    return out
