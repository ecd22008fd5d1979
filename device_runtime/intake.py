"""Command intake: whether a message on `.../cmd/<name>` may run, and its answer.

`CommandIntake` refuses a command delivered retained, one whose id it answered lately, one
without `ts`, from too far in the future or past `ts + ttl_s` before anything runs
(`rejected`, or `expired`), so a command runs at most once; then it runs the device's
`apply` and turns what it raised into the result status.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from device_runtime.args import describe
from device_runtime.errors import CommandError, DeviceError
from schemas.messages import Command, CommandStatus


def open_command(topic: str, payload: bytes) -> Command:
    """The command a message on `.../cmd/<name>` carries.

    CommandError (`command_id` set when the payload has a usable one) for an invalid body
    or a name that differs from the topic's.
    """
    try:
        command = Command.model_validate_json(payload)
    except ValidationError as exc:
        error = CommandError(
            CommandStatus.ERROR, f"not a valid command: {describe(exc.errors()[0])}"
        )
        error.command_id = _id_of(payload)
        raise error from exc
    name = topic.rsplit("/", 1)[-1]
    if command.name != name:
        error = CommandError(
            CommandStatus.ERROR, f"name {command.name!r} differs from topic {name!r}"
        )
        error.command_id = str(command.id)
        raise error
    return command


def _id_of(payload: bytes) -> str | None:
    """The command id of a payload not opened (invalid, or refused unread), if it has one."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    value = body.get("id") if isinstance(body, dict) else None
    try:
        return str(uuid.UUID(value))
    except (TypeError, ValueError, AttributeError):
        return None


# -- replays ----------------------------------------------------------------------------------

CLOCK_SET_FROM = datetime(2024, 1, 1, tzinfo=UTC)
"""A wall clock reading earlier than this was never set (a board without RTC boots in 1970):
such a device cannot judge `ts`, so it skips the time checks (retained and repeated ids are
still refused). The Pico W firmware uses the same year."""


class Refusal(StrEnum):
    """Why a command was refused before it ran: the label of the refusal counters."""

    RETAINED = "retained"
    DUPLICATE = "duplicate"
    NO_TS = "no_ts"
    FUTURE_TS = "future_ts"
    EXPIRED = "expired"


@dataclass(frozen=True)
class ReplayPolicy:
    """How long a command may live and how many ids a device remembers."""

    recent_ids: int = 256
    """Command ids remembered, oldest forgotten first: a repeat among them is `rejected`."""
    default_ttl_s: int = 60
    """The ttl_s of a command that carries ts but no ttl_s (`fieldline cmd send`'s default)."""
    max_clock_skew_s: float = 60.0
    """How far ts may lie ahead of the device's clock before the command is `rejected`."""

    def __post_init__(self) -> None:
        if self.recent_ids < 1:
            raise ValueError("ReplayPolicy.recent_ids must be at least 1")
        if self.default_ttl_s < 1:
            raise ValueError("ReplayPolicy.default_ttl_s must be at least 1")
        if self.max_clock_skew_s < 0:
            raise ValueError("ReplayPolicy.max_clock_skew_s must not be negative")


class RecentIds:
    """The last `size` command ids seen, each with the status it was answered with."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.forgotten = 0
        self._ids: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def status(self, command_id: str) -> str | None:
        """How the command of this id was answered, or None when it is not remembered."""
        return self._ids.get(command_id)

    def add(self, command_id: str, status: str) -> None:
        """Remember an id (or update its status); the oldest goes when there are `size`."""
        self._ids[command_id] = status
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)
            self.forgotten += 1


def _iso_ms(epoch_s: float) -> str:
    text = datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


class CommandIntake:
    """Answers command messages for one device: refuses replays, then runs `apply`.

    `clock` is the device's wall clock (epoch seconds); `on_refused` is told the reason of
    every refusal (for a metric)."""

    def __init__(
        self,
        policy: ReplayPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_refused: Callable[[Refusal], None] | None = None,
    ) -> None:
        self.policy = policy or ReplayPolicy()
        self.recent = RecentIds(self.policy.recent_ids)
        self.refused: dict[str, int] = {}
        self._clock = clock
        self._on_refused = on_refused

    def _refuse(self, reason: Refusal, status: str, detail: str) -> CommandError:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self._on_refused is not None:
            self._on_refused(reason)
        return CommandError(status, detail)

    def answer(
        self,
        topic: str,
        payload: bytes,
        retained: bool,
        apply: Callable[[str, dict[str, Any]], str],
        errors: tuple[type[Exception], ...] = (DeviceError,),
    ) -> tuple[str | None, str, str]:
        """(command id or None, result status, detail) for one command message: refused if it
        came retained, was seen lately or is out of its time; else `apply(name, args)`, whose
        CommandError keeps its status while the other `errors` become `error`."""
        if retained:
            # before anything else: a retained command comes back on every resubscribe
            refusal = self._refuse(
                Refusal.RETAINED,
                CommandStatus.REJECTED,
                "refused: delivered retained, and a retained command would run again on every "
                "reconnect; publish commands without retain, and clear this one with an "
                f"empty retained message on {topic}",
            )
            return _id_of(payload), refusal.status, refusal.detail
        try:
            command = open_command(topic, payload)
        except CommandError as exc:
            return exc.command_id, exc.status, exc.detail
        cid = str(command.id)
        first = self.recent.status(cid)
        if first is not None:
            refusal = self._refuse(
                Refusal.DUPLICATE,
                CommandStatus.REJECTED,
                f"refused: command {cid} was received before (answered {first}); an id runs "
                "once: send a new id to run it again",
            )
            return cid, refusal.status, refusal.detail
        status: str = CommandStatus.OK
        try:
            self._check_time(command)
            detail = apply(command.name, dict(command.args))
        except CommandError as exc:
            status, detail = exc.status, exc.detail
        except errors as exc:
            status, detail = CommandStatus.ERROR, str(exc)
        self.recent.add(cid, status)
        return cid, status, detail

    def _check_time(self, command: Command) -> None:
        now = self._clock()
        if now < CLOCK_SET_FROM.timestamp():
            return  # no wall clock: ts cannot be judged either way
        if command.ts is None:
            raise self._refuse(
                Refusal.NO_TS,
                CommandStatus.REJECTED,
                "refused: no ts; a command says when it was issued (epoch ms) so that it can "
                "expire (`fieldline cmd send` sets ts and ttl_s)",
            )
        issued = command.ts.timestamp()
        skew = self.policy.max_clock_skew_s
        if issued - now > skew:
            raise self._refuse(
                Refusal.FUTURE_TS,
                CommandStatus.REJECTED,
                f"refused: ts {_iso_ms(issued)} is {issued - now:.0f} s ahead of this device's "
                f"clock ({_iso_ms(now)}; at most {skew:g} s allowed): the sender's or the "
                "device's clock is wrong",
            )
        ttl = command.ttl_s if command.ttl_s is not None else self.policy.default_ttl_s
        if now > issued + ttl:
            given = "" if command.ttl_s is not None else ", the default for a command without one"
            raise self._refuse(
                Refusal.EXPIRED,
                CommandStatus.EXPIRED,
                f"expired at {_iso_ms(issued + ttl)} (ts + ttl_s {ttl} s{given}); "
                f"this device's clock reads {_iso_ms(now)}",
            )


def result_payload(command_id: str, status: str, detail: str) -> bytes:
    """The `cmd-res` message answering a command: its id, status, detail and the time now."""
    body = {"id": command_id, "status": status, "detail": detail, "ts": int(time.time() * 1000)}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
