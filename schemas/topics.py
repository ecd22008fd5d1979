"""The topic grammar of docs/design.md: the only place that builds or parses fieldline topics.

    fl/{tenant}/{device}/telemetry | status | events | cmd-res
    fl/{tenant}/{device}/cmd/{name}

Also the MQTT 3.1.1 wildcard semantics (section 4.7) the broker policy is built on.
`parse` and the builders run per message in the ingest worker: plain `str.split` and
precompiled regexes, no pydantic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from schemas.errors import InvalidFilterError, InvalidIdError, InvalidTopicError

__all__ = [
    "ID_PATTERN",
    "MAX_FILTER_BYTES",
    "MAX_ID_LENGTH",
    "PREFIX",
    "SHARE_PREFIX",
    "Kind",
    "Topic",
    "command",
    "command_result",
    "device_command_filter",
    "device_topics",
    "events",
    "filter_contains",
    "filter_matches",
    "parse",
    "service_filters",
    "shared",
    "status",
    "telemetry",
    "tenant_command_filter",
    "tenant_filter",
    "validate_filter",
    "validate_id",
]

PREFIX = "fl"
SHARE_PREFIX = "$share/"
MAX_ID_LENGTH = 64
# The spec limit on a UTF-8 encoded topic or filter (a two-byte length prefix).
MAX_FILTER_BYTES = 65535

ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
# fullmatch, not match + `$`: `$` also matches before a trailing newline.
_ID_RE = re.compile(ID_PATTERN, re.ASCII)
_ALLOWED_ID = "use 1-64 of a-z 0-9 _ - starting with a letter or digit"
# Characters with a meaning in MQTT, each refused with the reason it matters.
_RESERVED = {
    "/": "'/' is not allowed (it separates topic levels)",
    "+": "'+' is not allowed (it is the MQTT single-level wildcard)",
    "#": "'#' is not allowed (it is the MQTT multi-level wildcard)",
    "$": "'$' is not allowed (it marks broker topics such as $SYS)",
}


class Kind(StrEnum):
    """The last level of a device topic (`cmd` is followed by the command name)."""

    TELEMETRY = "telemetry"
    STATUS = "status"
    EVENTS = "events"
    COMMAND = "cmd"
    COMMAND_RESULT = "cmd-res"


_KINDS: dict[str, Kind] = {k.value: k for k in Kind}
# Kinds a device publishes (and the ingest service subscribes to), in docs/design.md order.
_UPSTREAM = (Kind.TELEMETRY, Kind.STATUS, Kind.EVENTS, Kind.COMMAND_RESULT)


def _id_problems(value: str) -> str:
    """Why `value` is not an id, every distinct problem once, most telling first."""
    if value == "":
        return "it is empty"
    reserved: list[str] = []
    problems: list[str] = []
    seen: set[str] = set()
    for ch in value:
        if ch in seen or ("a" <= ch <= "z") or ("0" <= ch <= "9") or ch in "_-":
            continue
        seen.add(ch)
        if ch in _RESERVED:
            reserved.append(_RESERVED[ch])
        elif not ch.isascii():
            problems.append(f"non-ASCII character {ch!r} (U+{ord(ch):04X}) is not allowed")
        elif "A" <= ch <= "Z":
            problems.append(f"uppercase {ch!r} is not allowed (ids are lowercase)")
        else:
            problems.append(f"{ch!r} is not allowed")
    if value[0] in "_-":
        problems.append(f"it starts with {value[0]!r}")
    if len(value) > MAX_ID_LENGTH:
        problems.append(f"it is {len(value)} characters long (at most {MAX_ID_LENGTH})")
    return ", ".join(reserved + problems)


def validate_id(value: str, what: str = "device id") -> str:
    """Return `value` if it is a valid tenant/device/command id, else raise InvalidIdError."""
    if type(value) is str and _ID_RE.fullmatch(value) is not None:
        return value
    if not isinstance(value, str):
        raise InvalidIdError(value, what, f"it must be a string, not {type(value).__name__}")
    raise InvalidIdError(value, what, _id_problems(value))


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed fieldline topic; `str(topic)` is the topic name."""

    tenant: str
    device: str
    kind: Kind
    command: str | None = None

    def __post_init__(self) -> None:
        if type(self.kind) is not Kind:
            try:
                object.__setattr__(self, "kind", Kind(self.kind))
            except ValueError:
                known = ", ".join(k.value for k in Kind)
                raise InvalidTopicError(self.kind, f"unknown kind (known: {known})") from None
        validate_id(self.tenant, "tenant id")
        validate_id(self.device, "device id")
        if self.kind is Kind.COMMAND:
            if self.command is None:
                raise InvalidIdError(None, "command name", "a cmd topic needs a command name")
            validate_id(self.command, "command name")
        elif self.command is not None:
            raise InvalidIdError(
                self.command, "command name", f"only cmd topics have one, not {self.kind.value}"
            )

    def __str__(self) -> str:
        if self.command is not None:
            return f"{PREFIX}/{self.tenant}/{self.device}/cmd/{self.command}"
        return f"{PREFIX}/{self.tenant}/{self.device}/{self.kind.value}"


def _device(tenant: str, device: str) -> str:
    validate_id(tenant, "tenant id")
    validate_id(device, "device id")
    return f"{PREFIX}/{tenant}/{device}/"


def telemetry(tenant: str, device: str) -> str:
    """`fl/{tenant}/{device}/telemetry`."""
    return _device(tenant, device) + "telemetry"


def status(tenant: str, device: str) -> str:
    """`fl/{tenant}/{device}/status` (retained; also the device's Will topic)."""
    return _device(tenant, device) + "status"


def events(tenant: str, device: str) -> str:
    """`fl/{tenant}/{device}/events`."""
    return _device(tenant, device) + "events"


def command(tenant: str, device: str, name: str) -> str:
    """`fl/{tenant}/{device}/cmd/{name}`: a command sent to the device."""
    return _device(tenant, device) + "cmd/" + validate_id(name, "command name")


def command_result(tenant: str, device: str) -> str:
    """`fl/{tenant}/{device}/cmd-res`: the device's answers to commands."""
    return _device(tenant, device) + "cmd-res"


def device_topics(tenant: str, device: str) -> dict[Kind, str]:
    """The topics a device publishes to, by kind (commands have their own filter)."""
    base = _device(tenant, device)
    return {k: base + k.value for k in _UPSTREAM}


def parse(topic: str) -> Topic:
    """Parse a topic name into a Topic; raise InvalidTopicError saying what is wrong."""
    if type(topic) is not str:
        raise InvalidTopicError(topic, f"a topic must be a string, not {type(topic).__name__}")
    return _parse(topic)


# A worker sees the same few topics per device over and over; only valid topics are cached
# (a raising call caches nothing), so junk cannot evict them faster than real traffic.
@lru_cache(maxsize=16384)
def _parse(topic: str) -> Topic:
    parts = topic.split("/")
    n = len(parts)
    if (n == 4 or n == 5) and parts[0] == PREFIX:
        kind = _KINDS.get(parts[3])
        if n == 4 and kind is not None and kind is not Kind.COMMAND:
            tenant, device, name = parts[1], parts[2], None
        elif n == 5 and kind is Kind.COMMAND:
            tenant, device, name = parts[1], parts[2], parts[4]
        else:
            raise InvalidTopicError(topic, _topic_problem(topic, parts))
        if (
            _ID_RE.fullmatch(tenant) is not None
            and _ID_RE.fullmatch(device) is not None
            and (name is None or _ID_RE.fullmatch(name) is not None)
        ):
            return _trusted_topic(tenant, device, kind, name)
    raise InvalidTopicError(topic, _topic_problem(topic, parts))


_new_topic = object.__new__
_set = object.__setattr__


def _trusted_topic(tenant: str, device: str, kind: Kind, name: str | None) -> Topic:
    # parse() has already matched every id: skip __post_init__'s second round of checks.
    topic: Topic = _new_topic(Topic)
    _set(topic, "tenant", tenant)
    _set(topic, "device", device)
    _set(topic, "kind", kind)
    _set(topic, "command", name)
    return topic


def _topic_problem(topic: str, parts: list[str]) -> str:
    """Why a string that failed the fast path of `parse` is not a fieldline topic."""
    if topic == "":
        return "it is empty"
    if topic.startswith(SHARE_PREFIX):
        return "'$share/...' is a shared-subscription filter, not a topic name"
    if topic.startswith("$"):
        return "topics starting with '$' are broker topics, not fieldline topics"
    if "+" in topic or "#" in topic:
        return "wildcards '+' and '#' are allowed in subscription filters, not in topic names"
    if parts[0] != PREFIX:
        return f"it must start with '{PREFIX}/' (got {parts[0]!r} as the first level)"
    for i, level in enumerate(parts):
        if level == "":
            return f"level {i + 1} is empty (no '//' and no leading or trailing '/')"
    n = len(parts)
    if n < 4 or n > 5:
        return (
            f"it has {n} levels; expected fl/{{tenant}}/{{device}}/{{kind}} "
            "or fl/{tenant}/{device}/cmd/{name}"
        )
    last = parts[3]
    if last not in _KINDS:
        known = ", ".join(k.value for k in Kind)
        return f"unknown kind {last!r} (known: {known})"
    if n == 4 and last == Kind.COMMAND:
        return "a command topic needs a name: fl/{tenant}/{device}/cmd/{name}"
    if n == 5 and last != Kind.COMMAND:
        return f"only cmd topics have a fifth level, {last!r} does not"
    ids = [(parts[1], "tenant id"), (parts[2], "device id")]
    if n == 5:
        ids.append((parts[4], "command name"))
    for value, what in ids:
        try:
            validate_id(value, what)
        except InvalidIdError as exc:
            return str(exc)
    return "it is not a fieldline topic"  # pragma: no cover - every failure is named above


def device_command_filter(tenant: str, device: str) -> str:
    """`fl/{tenant}/{device}/cmd/#`: what a device subscribes to."""
    return _device(tenant, device) + "cmd/#"


def tenant_filter(tenant: str) -> str:
    """`fl/{tenant}/#`: everything of one tenant (an operator's subscribe grant)."""
    return f"{PREFIX}/{validate_id(tenant, 'tenant id')}/#"


def tenant_command_filter(tenant: str) -> str:
    """`fl/{tenant}/+/cmd/#`: commands to any device of a tenant (an operator's publish grant)."""
    return f"{PREFIX}/{validate_id(tenant, 'tenant id')}/+/cmd/#"


def service_filters() -> tuple[str, ...]:
    """The ingest service's filters: `fl/+/+/telemetry`, `status`, `events`, `cmd-res`."""
    return tuple(f"{PREFIX}/+/+/{k.value}" for k in _UPSTREAM)


def shared(group: str, topic_filter: str) -> str:
    """`$share/{group}/{filter}`: a shared subscription (MQTT 5, Mosquitto, EMQX)."""
    validate_id(group, "share group")
    validate_filter(topic_filter)
    if topic_filter.startswith(SHARE_PREFIX):
        raise InvalidFilterError(topic_filter, "it is already a shared subscription")
    return f"{SHARE_PREFIX}{group}/{topic_filter}"


def validate_filter(topic_filter: str) -> str:
    """Return `topic_filter` if it is a well-formed MQTT filter, else raise InvalidFilterError."""
    if type(topic_filter) is not str:
        raise InvalidFilterError(
            topic_filter, f"a filter must be a string, not {type(topic_filter).__name__}"
        )
    if topic_filter == "":
        raise InvalidFilterError(topic_filter, "it is empty")
    if "\x00" in topic_filter:
        raise InvalidFilterError(topic_filter, "it contains a NUL character")
    try:
        size = len(topic_filter.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidFilterError(topic_filter, "it is not valid UTF-8 (lone surrogate)") from None
    if size > MAX_FILTER_BYTES:
        raise InvalidFilterError(
            topic_filter, f"it is {size} bytes of UTF-8 (at most {MAX_FILTER_BYTES})"
        )
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            raise InvalidFilterError(
                topic_filter, "'#' must be the whole last level (as in 'a/b/#')"
            )
        if "+" in level and level != "+":
            raise InvalidFilterError(
                topic_filter, f"'+' must be a whole level (as in 'a/+/c'), not {level!r}"
            )
    return topic_filter


def filter_matches(topic_filter: str, topic: str) -> bool:
    """True if the MQTT filter matches the topic name (MQTT 3.1.1 section 4.7).

    Malformed input matches nothing: a topic name containing a wildcard, an empty topic,
    a `#` that is not last. Filters starting with a wildcard do not match `$` topics.
    """
    if not topic or "+" in topic or "#" in topic:
        return False
    if topic[0] == "$" and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    n_topic = len(t_levels)
    last = len(f_levels) - 1
    for i, level in enumerate(f_levels):
        if level == "#":
            # `a/#` also matches `a`, its parent level: i <= n_topic holds here.
            return i == last
        if i >= n_topic:
            return False
        if level != "+" and level != t_levels[i]:
            # A malformed level such as `a+` can only equal a topic level holding a
            # wildcard, and such topics were refused above.
            return False
    return last + 1 == n_topic


def filter_contains(outer: str, inner: str) -> bool:
    """True if every topic matched by filter `inner` is also matched by filter `outer`.

    This is the SUBSCRIBE check: `a/+` does not contain `a/#`; `a/#` contains `a/+/b` and `a`.
    Malformed filters contain and are contained in nothing.
    """
    try:
        validate_filter(outer)
        validate_filter(inner)
    except InvalidFilterError:
        return False
    o_levels = outer.split("/")
    i_levels = inner.split("/")
    n_inner = len(i_levels)
    for i, o in enumerate(o_levels):
        if o == "#":
            # Everything below (and the parent level) is covered, except that a leading
            # wildcard never covers `$` topics, which a literal `$...` first level names.
            return not (i == 0 and i_levels[0].startswith("$"))
        if i >= n_inner:
            return False
        n = i_levels[i]
        if n == "#":
            # Inner reaches any depth (and its parent level), outer does not. Except when that
            # parent would be the empty topic, which is no topic: then `#` and `/#` match one
            # level or more, exactly as `+/#` and `/+/#` do.
            parent_is_empty = i == 0 or (i == 1 and i_levels[0] == "")
            return parent_is_empty and o == "+" and o_levels[i + 1 :] == ["#"]
        if o == "+":
            if i == 0 and n.startswith("$"):
                return False
            continue
        if n == "+" or n != o:
            return False
    return len(o_levels) == n_inner
