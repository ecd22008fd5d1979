"""The ACL matrix of docs/design.md as one pure policy: principal x action x topic -> allow or deny.

The amqtt plugins ask it per packet; the Mosquitto renderer asks it for the grants of every
issued principal, so both brokers enforce the same matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from certs import Role
from schemas.topics import Kind, filter_contains, filter_matches, validate_filter

SHARE_PREFIX = "$share/"
# decisions on longer topics are not cached (fieldline's own topics are far shorter)
CACHED_TOPIC_CHARS = 256


class Action(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"
    WILL = "will"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection is, as its verified certificate says (CN, O, OU)."""

    id: str
    tenant: str
    role: Role

    def __str__(self) -> str:
        return f"{self.role.value}:{self.tenant}/{self.id}"


@dataclass(frozen=True, slots=True)
class Decision:
    """Allow or deny, with a short `rule` for metrics and a sentence for logs."""

    allowed: bool
    reason: str
    rule: str = "granted"

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class Grants:
    """The filters a principal may publish to, subscribe to, and may retain on."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    retain: tuple[str, ...]
    shared_subscriptions: bool = False


_SERVICE_KINDS = (Kind.TELEMETRY, Kind.STATUS, Kind.EVENTS, Kind.COMMAND_RESULT)


def grants_for(principal: Principal) -> Grants:
    """The rows of docs/design.md's ACL matrix for this principal."""
    t, d = principal.tenant, principal.id
    match principal.role:
        case Role.DEVICE:
            own = [f"fl/{t}/{d}/{k.value}" for k in _SERVICE_KINDS]
            return Grants(
                publish=tuple(own),
                subscribe=(f"fl/{t}/{d}/cmd/#",),
                retain=(f"fl/{t}/{d}/status",),
            )
        case Role.OPERATOR:
            return Grants(publish=(f"fl/{t}/+/cmd/#",), subscribe=(f"fl/{t}/#",), retain=())
        case Role.SERVICE:
            return Grants(
                publish=(),
                subscribe=tuple(f"fl/+/+/{k.value}" for k in _SERVICE_KINDS),
                retain=(),
                shared_subscriptions=True,
            )
        case Role.ADMIN:
            return Grants(
                publish=("#",), subscribe=("#", "$SYS/#"), retain=("#",), shared_subscriptions=True
            )
        case _:
            return Grants(publish=(), subscribe=(), retain=())


class Policy:
    """Deny by default; decisions are cached per principal, action and topic."""

    def __init__(self, cache_size: int = 65536) -> None:
        self._decide = lru_cache(maxsize=cache_size)(self._decide_uncached)

    def grants(self, principal: Principal) -> Grants:
        return grants_for(principal)

    def decide(
        self, principal: Principal, action: Action, topic: str, *, retain: bool = False
    ) -> Decision:
        """Whether principal may do action on topic (a filter for SUBSCRIBE)."""
        if len(topic) > CACHED_TOPIC_CHARS:
            # a client choosing long, distinct topics must not fill the cache with them
            return self._decide_uncached(principal, action, topic, retain)
        return self._decide(principal, action, topic, retain)

    def allows(
        self, principal: Principal, action: Action, topic: str, *, retain: bool = False
    ) -> bool:
        return self.decide(principal, action, topic, retain=retain).allowed

    def _decide_uncached(
        self, principal: Principal, action: Action, topic: str, retain: bool
    ) -> Decision:
        grants = grants_for(principal)
        if action is Action.SUBSCRIBE:
            return self._subscribe(principal, grants, topic)
        if not topic or "+" in topic or "#" in topic:
            return Decision(False, "a topic name may not be empty or hold wildcards", "malformed")
        if action is Action.RECEIVE:
            if any(filter_matches(f, topic) for f in grants.subscribe):
                return Decision(True, "receive granted")
            reason = f"{principal} may not receive {short_topic(topic)}"
            return Decision(False, reason, "not-granted")
        if action is Action.WILL:
            own_status = principal.role is Role.DEVICE and topic == (
                f"fl/{principal.tenant}/{principal.id}/status"
            )
            if not own_status and principal.role is not Role.ADMIN:
                return Decision(False, "a Will must be the client's own status topic", "will")
        if not any(filter_matches(f, topic) for f in grants.publish):
            reason = f"{principal} may not publish to {short_topic(topic)}"
            return Decision(False, reason, "not-granted")
        if retain and not any(filter_matches(f, topic) for f in grants.retain):
            return Decision(False, "retain is allowed on the device's status topic only", "retain")
        return Decision(True, f"{action.value} granted")

    @staticmethod
    def _subscribe(principal: Principal, grants: Grants, topic_filter: str) -> Decision:
        inner = topic_filter
        if inner.startswith(SHARE_PREFIX):
            if not grants.shared_subscriptions:
                return Decision(False, f"{principal} may not use shared subscriptions", "shared")
            parts = inner.split("/", 2)
            if len(parts) != 3 or not parts[1] or "+" in parts[1] or "#" in parts[1]:
                return Decision(
                    False, "a shared subscription is $share/<group>/<filter>", "malformed"
                )
            inner = parts[2]
        try:
            validate_filter(inner)
        except ValueError as exc:
            return Decision(False, f"malformed filter: {exc}", "malformed")
        # contained, not merely overlapping: `a/+` granted does not grant `a/#`
        if any(filter_contains(allowed, inner) for allowed in grants.subscribe):
            return Decision(True, "subscribe granted")
        return Decision(
            False, f"{principal} may not subscribe to {short_topic(topic_filter)}", "not-granted"
        )


def short_topic(topic: str) -> str:
    """A topic as a reason quotes it: a hostile one can be 64 KiB long."""
    return topic if len(topic) <= 120 else f"{topic[:100]}...({len(topic)} chars)"
