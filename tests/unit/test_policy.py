"""The ACL matrix of docs/design.md, decided by broker.policy: every row, what it must refuse."""

from __future__ import annotations

import pytest

from broker.policy import Action, Policy, Principal
from certs import Role

DEV = Principal("dev-1", "acme", Role.DEVICE)
DEV2 = Principal("dev-2", "acme", Role.DEVICE)
OPS = Principal("ops-1", "acme", Role.OPERATOR)
SVC = Principal("ingest-1", "platform", Role.SERVICE)
ADMIN = Principal("root-1", "platform", Role.ADMIN)
SERVER = Principal("broker", "platform", Role.SERVER)

P = Action.PUBLISH
S = Action.SUBSCRIBE
R = Action.RECEIVE
W = Action.WILL

ALLOWED = [
    (DEV, P, "fl/acme/dev-1/telemetry"),
    (DEV, P, "fl/acme/dev-1/status"),
    (DEV, P, "fl/acme/dev-1/events"),
    (DEV, P, "fl/acme/dev-1/cmd-res"),
    (DEV, S, "fl/acme/dev-1/cmd/#"),
    (DEV, S, "fl/acme/dev-1/cmd/reset"),
    (DEV, S, "fl/acme/dev-1/cmd/+"),
    (DEV, R, "fl/acme/dev-1/cmd/reset"),
    (DEV, W, "fl/acme/dev-1/status"),
    (OPS, P, "fl/acme/dev-1/cmd/reset"),
    (OPS, P, "fl/acme/dev-2/cmd/set-interval"),
    (OPS, S, "fl/acme/#"),
    (OPS, S, "fl/acme/+/telemetry"),
    (OPS, S, "fl/acme/dev-1/cmd-res"),
    (OPS, R, "fl/acme/dev-1/telemetry"),
    (SVC, S, "fl/+/+/telemetry"),
    (SVC, S, "fl/+/+/status"),
    (SVC, S, "fl/+/+/events"),
    (SVC, S, "fl/+/+/cmd-res"),
    (SVC, S, "fl/acme/+/telemetry"),
    (SVC, S, "$share/ingest/fl/+/+/telemetry"),
    (SVC, R, "fl/globex/dev-9/telemetry"),
    (ADMIN, P, "fl/acme/dev-1/cmd/reset"),
    (ADMIN, S, "#"),
    (ADMIN, S, "$SYS/#"),
]

DENIED = [
    # a device touches nothing but its own topics
    (DEV, P, "fl/acme/dev-2/telemetry"),
    (DEV, P, "fl/globex/dev-1/telemetry"),
    (DEV, P, "fl/acme/dev-1/cmd/reset"),
    (DEV, P, "fl/acme/dev-1/other"),
    (DEV, P, "fl/acme/dev-1/telemetry/extra"),
    (DEV, S, "fl/acme/dev-2/cmd/#"),
    (DEV, S, "#"),
    (DEV, S, "$SYS/#"),
    (DEV, S, "fl/+/+/cmd/#"),
    (DEV, S, "fl/acme/+/cmd/#"),
    (DEV, S, "fl/acme/dev-1/#"),
    (DEV, S, "fl/acme/dev-1/telemetry"),
    (DEV, S, "$share/g/fl/acme/dev-1/cmd/#"),
    (DEV, R, "fl/acme/dev-2/cmd/reset"),
    (DEV, R, "fl/acme/dev-1/telemetry"),
    (DEV, W, "fl/acme/dev-2/status"),
    (DEV, W, "fl/acme/dev-1/telemetry"),
    # operators stay in their tenant and only send commands
    (OPS, P, "fl/acme/dev-1/telemetry"),
    (OPS, P, "fl/globex/dev-9/cmd/reset"),
    (OPS, S, "fl/globex/#"),
    (OPS, S, "#"),
    (OPS, S, "$SYS/#"),
    (OPS, S, "fl/+/#"),
    (OPS, R, "fl/globex/dev-9/telemetry"),
    (OPS, W, "fl/acme/ops-1/status"),
    # the service reads, never writes
    (SVC, P, "fl/acme/dev-1/cmd/reset"),
    (SVC, P, "fl/acme/dev-1/telemetry"),
    (SVC, S, "fl/+/+/cmd/#"),
    (SVC, S, "fl/#"),
    (SVC, S, "#"),
    (SVC, S, "$share/ingest/fl/#"),
    (SVC, S, "$share//fl/+/+/telemetry"),
    (SVC, R, "fl/acme/dev-1/cmd/reset"),
    # a server certificate is no client identity
    (SERVER, P, "fl/acme/dev-1/telemetry"),
    (SERVER, S, "fl/#"),
    # malformed
    (ADMIN, P, "fl/acme/+/telemetry"),
    (ADMIN, P, ""),
    (DEV, S, "fl/acme/dev-1/cmd/#/x"),
    (DEV, S, "fl/acme/dev-1/cmd/re+"),
]


@pytest.mark.parametrize(("who", "action", "topic"), ALLOWED)
def test_allowed(who: Principal, action: Action, topic: str) -> None:
    decision = Policy().decide(who, action, topic)
    assert decision.allowed, decision.reason


@pytest.mark.parametrize(("who", "action", "topic"), DENIED)
def test_denied(who: Principal, action: Action, topic: str) -> None:
    decision = Policy().decide(who, action, topic)
    assert not decision.allowed
    assert decision.reason


def test_retain_only_on_own_status() -> None:
    policy = Policy()
    assert policy.allows(DEV, P, "fl/acme/dev-1/status", retain=True)
    assert not policy.allows(DEV, P, "fl/acme/dev-1/telemetry", retain=True)
    assert not policy.allows(OPS, P, "fl/acme/dev-1/cmd/reset", retain=True)
    denied = policy.decide(DEV, P, "fl/acme/dev-1/events", retain=True)
    assert "status topic only" in denied.reason


def test_decisions_are_cached_per_principal() -> None:
    policy = Policy()
    first = policy.decide(DEV, P, "fl/acme/dev-1/telemetry")
    assert policy.decide(DEV, P, "fl/acme/dev-1/telemetry") is first
    assert policy.decide(DEV2, P, "fl/acme/dev-1/telemetry") is not first
    assert not policy.allows(DEV2, P, "fl/acme/dev-1/telemetry")


# -- exhaustive: every principal x action x topic of a small universe, against an oracle ------
# The oracle restates docs/design.md's matrix in its own terms (level by level, no filters), and
# decides SUBSCRIBE by brute force: a filter is allowed when every topic it can match, over
# the literals the matrix distinguishes plus a fresh one, may be received.
TENANTS = ("acme", "globex")
PRINCIPALS = [
    *(Principal(d, t, Role.DEVICE) for t in TENANTS for d in ("dev-1", "dev-2")),
    *(Principal("ops-1", t, Role.OPERATOR) for t in TENANTS),
    Principal("ingest-1", "platform", Role.SERVICE),
    Principal("root-1", "platform", Role.ADMIN),
    Principal("broker", "platform", Role.SERVER),
]
ALPHABET = [
    ("fl", "zz", "$SYS"),
    ("acme", "globex", "zz"),
    ("dev-1", "dev-2", "zz"),
    ("telemetry", "status", "events", "cmd-res", "cmd", "zz"),
    ("reset", "zz"),
    ("zz",),
]
UPSTREAM = ("telemetry", "status", "events", "cmd-res")


def _topics(max_len: int = 5) -> list[str]:
    out: list[list[str]] = [[]]
    result = []
    for depth in range(max_len):
        out = [[*t, level] for t in out for level in ALPHABET[depth]]
        result += ["/".join(t) for t in out]
    return result


def _filters() -> list[str]:
    out: list[list[str]] = [[]]
    result = []
    for depth in range(5):
        result += ["/".join([*t, "#"]) for t in out]
        out = [[*t, level] for t in out for level in (*ALPHABET[depth], "+")]
        result += ["/".join(t) for t in out]
    return result


TOPICS = _topics()
FILTERS = _filters()


def oracle_receive(p: Principal, topic: str) -> bool:
    lv = topic.split("/")
    if p.role is Role.ADMIN:
        return True
    if lv[0] != "fl":
        return False
    if p.role is Role.DEVICE:
        # `fl/t/d/cmd/#` also matches its parent level `fl/t/d/cmd` (MQTT 4.7.1.2), in both
        # brokers alike; such a topic has no command name and devices reject it
        return len(lv) >= 4 and lv[1:4] == [p.tenant, p.id, "cmd"]
    if p.role is Role.OPERATOR:
        return lv[1:2] == [p.tenant]
    if p.role is Role.SERVICE:
        return len(lv) == 4 and lv[3] in UPSTREAM
    return False


def oracle_publish(p: Principal, topic: str, retain: bool = False) -> bool:
    lv = topic.split("/")
    if p.role is Role.ADMIN:
        return not topic.startswith("$")
    if p.role is Role.DEVICE:
        own = len(lv) == 4 and lv[:3] == ["fl", p.tenant, p.id] and lv[3] in UPSTREAM
        return own and (not retain or lv[3] == "status")
    if p.role is Role.OPERATOR:
        return not retain and len(lv) >= 4 and lv[:2] == ["fl", p.tenant] and lv[3] == "cmd"
    return False


def oracle_will(p: Principal, topic: str) -> bool:
    if p.role is Role.ADMIN:
        return oracle_publish(p, topic)
    return p.role is Role.DEVICE and topic == f"fl/{p.tenant}/{p.id}/status"


def _expansions(topic_filter: str) -> list[str]:
    """Topics the filter matches, one per distinction the matrix makes (plus 'zz')."""
    out: list[list[str]] = [[]]
    levels = topic_filter.split("/")
    for depth, level in enumerate(levels):
        if level == "#":
            grown, result = out, []
            for extra in range(len(ALPHABET) - depth + 1):
                result += grown
                grown = [[*t, v] for t in grown for v in ALPHABET[min(depth + extra, 5)]]
            # `#` and `+` at the first level never match a `$` topic (MQTT 4.7.2)
            return ["/".join(t) for t in result if t and not (depth == 0 and t[0].startswith("$"))]
        if level == "+":
            values = [v for v in ALPHABET[min(depth, 5)] if not (depth == 0 and v.startswith("$"))]
            out = [[*t, v] for t in out for v in values]
        else:
            out = [[*t, level] for t in out]
    return ["/".join(t) for t in out]


def oracle_subscribe(p: Principal, topic_filter: str) -> bool:
    if p.role is Role.SERVER:
        return False
    return all(oracle_receive(p, t) for t in _expansions(topic_filter))


def test_publish_receive_will_and_retain_everywhere() -> None:
    policy = Policy()
    checked = 0
    for p in PRINCIPALS:
        for topic in TOPICS:
            assert policy.allows(p, R, topic) is oracle_receive(p, topic), (p, "receive", topic)
            assert policy.allows(p, P, topic) is oracle_publish(p, topic), (p, "publish", topic)
            retained = policy.allows(p, P, topic, retain=True)
            assert retained is oracle_publish(p, topic, retain=True), (p, "retain", topic)
            assert policy.allows(p, W, topic) is oracle_will(p, topic), (p, "will", topic)
            checked += 4
    assert checked > 10_000


def test_subscribe_everywhere() -> None:
    policy = Policy()
    allowed = 0
    for p in PRINCIPALS:
        for topic_filter in FILTERS:
            expected = oracle_subscribe(p, topic_filter)
            assert policy.allows(p, S, topic_filter) is expected, (p, topic_filter)
            allowed += expected
    assert len(FILTERS) * len(PRINCIPALS) > 5_000
    assert allowed > 100  # the universe exercises both answers


def test_shared_subscriptions_are_the_services_alone() -> None:
    policy = Policy()
    for p in PRINCIPALS:
        for topic_filter in ("fl/+/+/telemetry", "fl/acme/+/status", "fl/#"):
            shared = policy.allows(p, S, f"$share/ingest/{topic_filter}")
            expected = p.role in (Role.SERVICE, Role.ADMIN) and oracle_subscribe(p, topic_filter)
            assert shared is expected, (p, topic_filter)
