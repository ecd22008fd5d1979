"""The ACL matrix of DESIGN.md, decided by broker.policy: every row, and what it must refuse."""

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
