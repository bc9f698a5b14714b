"""Inbound messages: classify, verify, refuse replays, dispatch to the registered handler.

This is the one place where a handler's exception is caught: a command handler that raises
gets its command answered ``failed``/``internal_error`` (logged with its traceback), whatever the
command type, so no command stays open until the next restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from agent import protocol
from agent.args import Obj, problems
from agent.core.clock import Clock, ClockTrust
from agent.core.store import Store
from agent.protocol import Envelope, Rejected, Topics

log = logging.getLogger(__name__)

class CommandHandler(Protocol):
    def validate(self, args: dict) -> list[str]:
        """Problems with ``args`` (each naming the key), empty when they are good."""

    def execute(self, env: Envelope) -> None:
        """Carry the command out; report its stages through ``core.ack``."""


class DocumentHandler(Protocol):
    def apply(self, target: str, env: Envelope, raw: bytes) -> tuple:
        """Apply a verified document; return (result, reason) or (result, reason, detail).
        Result ``unchanged`` is not recorded as an event (the broker re-delivers retained
        documents at every connect)."""


class FuncHandler:
    """A command handler from two functions."""

    def __init__(self, execute: Callable[[Envelope], None],
                 validate: Callable[[dict], list[str]] = lambda args: []) -> None:
        self._execute = execute
        self._validate = validate

    def validate(self, args: dict) -> list[str]:
        return self._validate(args)

    def execute(self, env: Envelope) -> None:
        self._execute(env)


_NO_ARGS = Obj()  # ping and state take no arguments


def no_args(args: dict) -> list[str]:
    return problems(_NO_ARGS, args)


class Inbound:
    """Commands and documents from the broker, checked before any handler sees them.

    ``ack(cmd_id, stage, reason, detail)`` and ``emit_event(body)`` are the core's; the
    handlers are registered by the services (:meth:`register_command`,
    :meth:`register_document`).
    """

    def __init__(self, cfg: dict, *, clock: Clock, store: Store, trust: ClockTrust,
                 topics: Topics, ack: Callable[..., None],
                 emit_event: Callable[[dict], Any],
                 state_changed: Callable[[], None]) -> None:
        self.cfg = cfg
        self.clock = clock
        self.store = store
        self.trust = trust
        self.topics = topics
        self._ack = ack
        self._emit_event = emit_event
        self._state_changed = state_changed
        self.commands: dict[str, CommandHandler] = {}
        self.documents: dict[str, DocumentHandler] = {}
        self.keys = protocol.load_public_keys(cfg["security"]["trusted_keys"])

    def register_command(self, typ: str, handler: CommandHandler) -> None:
        self.commands[typ] = handler

    def register_document(self, kind: str, handler: DocumentHandler) -> None:
        self.documents[kind] = handler

    def reload(self, cfg: dict) -> None:
        self.keys = protocol.load_public_keys(cfg["security"]["trusted_keys"])

    def message(self, topic: str, payload: bytes, retain: bool) -> None:
        where = self.topics.classify(topic)
        if where is None:
            log.warning("message on unexpected topic %s ignored", topic)
            return
        target, kind = where
        if kind == "cmd":
            self.command(target, payload, retain)
        else:
            self.document(kind, target, payload)

    def _check(self, obj: dict, kind: str, target: str) -> Envelope:
        env = protocol.parse_envelope(obj, kind)
        if env.target != target:
            raise Rejected(protocol.WRONG_TARGET,
                           f"target {env.target!r} does not match the topic's {target!r}", env.id)
        protocol.verify(env, self.keys, self.cfg["security"]["require_signed"])
        return env

    def command(self, target: str, payload: bytes, retain: bool) -> None:
        try:
            obj = protocol.decode(payload)
            if retain:
                raise Rejected(protocol.RETAINED_COMMAND,
                               "retained commands are never executed", protocol.peek_id(obj))
            env = self._check(obj, "cmd", target)
            first = self.store.seen_get(env.id)
            if first is not None:
                raise Rejected(protocol.REPLAYED, "this command id was already accepted",
                               env.id, first_seen=first)
            protocol.check_time(env, self.clock.now_ms(), self.trust.trusted(),
                                self.cfg["security"]["max_skew_s"])
            handler = self._handler_for(env)
            errors = handler.validate(env.args)
            if errors:
                raise Rejected(protocol.BAD_ARGS, "; ".join(errors), env.id, errors=errors)
        except Rejected as r:
            log.info("command %s rejected: %s (%s)", r.cmd_id, r.reason, r.message)
            self._ack(r.cmd_id, "rejected", r.reason, {"message": r.message, **r.detail})
            return
        self.store.seen_add(env.id, env.kid, env.ts, self.clock.now_ms())
        self.store.open_add(env.id, env.type, self.clock.now_ms())
        # Written before anything airs or is acked (a crashed agent remembers it); flushed to
        # the card at the end of this batch, before the broker hears it was delivered.
        self.store.commit()
        self._ack(env.id, "received", detail={"type": env.type})
        try:
            handler.execute(env)
        except Exception as e:
            log.exception("command %s (%s) failed inside its handler", env.id, env.type)
            self._ack(env.id, "failed", protocol.INTERNAL_ERROR,
                      {"message": f"{type(e).__name__}: {e}"[:300]})

    def _handler_for(self, env: Envelope) -> CommandHandler:
        handler = self.commands.get(env.type)
        if handler is not None:
            return handler
        if env.type in protocol.COMMAND_TYPES:
            msg = f"{env.type!r} is not available on this device (no such hardware configured)"
        else:
            msg = f"unknown command type {env.type!r}"
        raise Rejected(protocol.UNSUPPORTED_TYPE, msg, env.id)

    def document(self, kind: str, target: str, payload: bytes) -> None:
        topic = f"{target}/desired/{kind}"
        if not payload:
            # A retained document being cleared at the broker (an empty retained publish): the
            # device keeps what it has; only a newer signed document replaces it.
            log.info("%s document on %s cleared at the broker; keeping the one in force", kind,
                     topic)
            return
        rev = None
        try:
            obj = protocol.decode(payload)
            rev = obj.get("rev") if protocol.valid_int(obj.get("rev")) else None
            env = self._check(obj, kind, target)
            handler = self.documents.get(kind)
            if handler is None:
                raise Rejected(protocol.UNSUPPORTED_TYPE, f"no {kind} support on this device")
            result, reason, *extra = handler.apply(target, env, payload)
            detail = extra[0] if extra else None
        except Rejected as r:
            result, reason, detail = "rejected", r.reason, {"message": r.message}
            log.info("%s document on %s rejected: %s (%s)", kind, topic, r.reason, r.message)
        except Exception as e:
            log.exception("%s document on %s failed inside its handler", kind, topic)
            result, reason = "refused", protocol.INTERNAL_ERROR
            detail = {"message": f"{type(e).__name__}: {e}"[:300]}
        if result == "unchanged":
            return
        body: dict[str, Any] = {"type": kind, "topic": topic, "rev": rev, "result": result}
        if reason:
            body["reason"] = reason
        if detail:
            body["detail"] = detail
        self._emit_event(body)
        self._state_changed()
