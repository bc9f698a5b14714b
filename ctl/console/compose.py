"""A bulletin from the console's form, as signed commands (SPEC §7): text to speech becomes
``say``, uploaded recordings (one per language) become ``play`` with media hosted here
(:class:`ctl.media.MediaStore`); targets, priority, ``at``, ``repeat`` and board text as the
form says. Arguments are checked with the agent's own validators before anything is signed;
the user's right to each target and priority is checked here, on the server."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from agent import protocol
from agent.audio.commands import validate_play, validate_say
from ctl.send import make_envelope

TTL_S = 600  # a command not taken within 10 minutes expires (a device offline longer)
MAX_TARGETS = 200


class Refused(Exception):
    """The user may not do this (403): ``message`` is shown, the refusal audited."""


class Invalid(ValueError):
    """The form is not a valid bulletin (400): every problem is listed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class Bulletin:
    targets: list[str]
    priority: str = "normal"
    text: str | None = None  # text to speech ...
    lang: str = "vi"
    media: list[dict] = field(default_factory=list)  # ... or recordings {url, sha256, lang}
    at_ms: int | None = None
    repeat: int = 1
    volume: int | None = None
    board_text: str | None = None

    def command(self) -> tuple[str, dict]:
        """(type, args) of the command each target gets."""
        extra: dict = {"priority": self.priority}
        if self.repeat != 1:
            extra["repeat"] = self.repeat
        if self.volume is not None:
            extra["volume"] = self.volume
        if self.board_text:
            extra["board_text"] = self.board_text
        if self.at_ms is not None:
            extra["at"] = self.at_ms
        if self.media:
            return "play", {"media": self.media if len(self.media) > 1 else self.media[0],
                            **extra}
        return "say", {"text": self.text or "", "lang": self.lang, **extra}


def parse_at(value: str, tz: str) -> int | None:
    """``YYYY-MM-DDTHH:MM`` (a datetime-local field) in ``tz`` as Unix milliseconds."""
    value = value.strip()
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid([f"at: {value!r} is not a date and time"]) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ZoneInfo(tz))
    return int(dt.timestamp() * 1000)


def authorize(targets: list[str], priority: str, user, groups: dict[str, list[str]]) -> None:
    """Refused unless ``user`` may send at ``priority`` to every target (checked before any
    upload is stored or any text is spoken)."""
    if not user.can_send:
        raise Refused("tài khoản chỉ xem (viewer) không gửi được bản tin")
    if not targets:
        raise Invalid(["targets: chọn ít nhất một nhóm hoặc cụm loa"])
    if len(targets) > MAX_TARGETS:
        raise Invalid([f"targets: at most {MAX_TARGETS}"])
    bad = [t for t in targets if not protocol.TARGET_RE.fullmatch(t)]
    if bad:
        raise Invalid([f"targets: not dev/ID or grp/G: {', '.join(bad[:5])}"])
    refused = [t for t in targets if not user.may_target(t, groups)]
    if refused:
        raise Refused(f"không có quyền gửi tới: {', '.join(refused[:10])}")
    if not user.may_priority(priority):
        raise Refused(f"không có quyền gửi bản tin mức {priority}")


def check(b: Bulletin, user, groups: dict[str, list[str]], now_ms: int) -> tuple[str, dict]:
    """(type, args) when ``user`` may send ``b`` and it is valid; else Refused / Invalid."""
    authorize(b.targets, b.priority, user, groups)
    if b.media and b.text:
        raise Invalid(["chọn văn bản đọc (TTS) hoặc bản ghi âm, không cả hai"])
    if not b.media and not (b.text or "").strip():
        raise Invalid(["nhập văn bản để đọc hoặc tải lên bản ghi âm"])
    typ, args = b.command()
    problems = (validate_play if typ == "play" else validate_say)(args, now_ms)
    if problems:
        raise Invalid(problems)
    return typ, args


def envelopes(b: Bulletin, typ: str, args: dict, key, kid: str, now_ms: int,
              ) -> tuple[str, list[dict]]:
    """(batch id, one signed envelope per target)."""
    batch = f"b-{secrets.token_hex(6)}"
    out = []
    for target in b.targets:
        env = make_envelope(target, typ, args, ttl_s=TTL_S, cmd_id=None, now_ms=now_ms)
        out.append(protocol.sign(env, key, kid))
    return batch, out
