"""Topic grammar (build, parse, ids) and MQTT filter semantics of schemas.topics."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import topics
from schemas.errors import InvalidFilterError, InvalidIdError, InvalidTopicError, SchemaError
from schemas.topics import Kind, Topic, filter_contains, filter_matches, parse, validate_id

ids = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,63}", fullmatch=True)
UPSTREAM = {
    Kind.TELEMETRY: topics.telemetry,
    Kind.STATUS: topics.status,
    Kind.EVENTS: topics.events,
    Kind.COMMAND_RESULT: topics.command_result,
}


def _is_id(value: str) -> bool:
    """The id grammar spelled out character by character, independent of the regex."""
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
    return 1 <= len(value) <= 64 and set(value) <= allowed and value[0] not in "_-"


# --- ids -------------------------------------------------------------------------------


@given(value=ids)
def test_valid_ids_are_returned_unchanged(value: str) -> None:
    assert validate_id(value) == value


@given(value=st.text(max_size=70))
def test_validate_id_agrees_with_the_grammar(value: str) -> None:
    if _is_id(value):
        assert validate_id(value, "tenant id") == value
    else:
        with pytest.raises(InvalidIdError, match=r"^tenant id .* is invalid: "):
            validate_id(value, "tenant id")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "it is empty"),
        ("a" * 65, "it is 65 characters long (at most 64)"),
        ("Pump/1", "'/' is not allowed"),
        ("pump+1", "'+' is not allowed (it is the MQTT single-level wildcard)"),
        ("pump#", "'#' is not allowed (it is the MQTT multi-level wildcard)"),
        ("$sys", "'$' is not allowed"),
        ("Pump", "uppercase 'P' is not allowed"),
        ("pümp", "non-ASCII character 'ü' (U+00FC)"),
        ("pump 1", "' ' is not allowed"),
        ("pump.1", "'.' is not allowed"),
        ("_pump", "it starts with '_'"),
        ("-pump", "it starts with '-'"),
        ("pump\n", "'\\n' is not allowed"),  # a `$`-anchored regex would let this through
        ("pump\x00", "'\\x00' is not allowed"),
        ("\u0661", "non-ASCII"),  # Arabic-Indic digit one: `\d` without re.ASCII matches it
    ],
)
def test_bad_ids_say_what_is_wrong(value: str, fragment: str) -> None:
    with pytest.raises(InvalidIdError) as caught:
        validate_id(value)
    message = str(caught.value)
    assert fragment in message
    assert message.startswith(f"device id {value!r} is invalid: ")
    assert message.endswith("use 1-64 of a-z 0-9 _ - starting with a letter or digit")
    assert isinstance(caught.value, SchemaError)
    assert isinstance(caught.value, ValueError)


def test_non_string_id_is_refused() -> None:
    with pytest.raises(InvalidIdError, match="must be a string, not int"):
        validate_id(7)  # type: ignore[arg-type]


def test_the_design_example_message() -> None:
    with pytest.raises(InvalidIdError) as caught:
        validate_id("Pump/1")
    assert str(caught.value).startswith("device id 'Pump/1' is invalid: '/' is not allowed")


# --- building and parsing ------------------------------------------------------------


def test_builders_produce_the_design_topics() -> None:
    assert topics.telemetry("acme", "pump-1") == "fl/acme/pump-1/telemetry"
    assert topics.status("acme", "pump-1") == "fl/acme/pump-1/status"
    assert topics.events("acme", "pump-1") == "fl/acme/pump-1/events"
    assert topics.command("acme", "pump-1", "set-interval") == "fl/acme/pump-1/cmd/set-interval"
    assert topics.command_result("acme", "pump-1") == "fl/acme/pump-1/cmd-res"
    assert topics.device_topics("acme", "pump-1") == {
        Kind.TELEMETRY: "fl/acme/pump-1/telemetry",
        Kind.STATUS: "fl/acme/pump-1/status",
        Kind.EVENTS: "fl/acme/pump-1/events",
        Kind.COMMAND_RESULT: "fl/acme/pump-1/cmd-res",
    }


def test_kind_values() -> None:
    assert [k.value for k in Kind] == ["telemetry", "status", "events", "cmd", "cmd-res"]


@given(tenant=ids, device=ids, kind=st.sampled_from(sorted(UPSTREAM)))
def test_build_parse_round_trip(tenant: str, device: str, kind: Kind) -> None:
    name = UPSTREAM[kind](tenant, device)
    topic = parse(name)
    assert (topic.tenant, topic.device, topic.kind, topic.command) == (tenant, device, kind, None)
    assert str(topic) == name
    assert str(Topic(tenant, device, kind)) == name


@given(tenant=ids, device=ids, name=ids)
def test_command_round_trip(tenant: str, device: str, name: str) -> None:
    built = topics.command(tenant, device, name)
    topic = parse(built)
    assert topic == Topic(tenant, device, Kind.COMMAND, name)
    assert str(topic) == built


@pytest.mark.parametrize(
    "builder", [topics.telemetry, topics.status, topics.events, topics.command_result]
)
def test_builders_validate_ids(builder: object) -> None:
    with pytest.raises(InvalidIdError, match="tenant id 'Acme'"):
        builder("Acme", "pump-1")  # type: ignore[operator]
    with pytest.raises(InvalidIdError, match="device id 'pump/1'"):
        builder("acme", "pump/1")  # type: ignore[operator]


def test_command_builder_validates_the_name() -> None:
    with pytest.raises(InvalidIdError, match="command name 'Reset'"):
        topics.command("acme", "pump-1", "Reset")


def test_topic_checks_its_fields() -> None:
    with pytest.raises(InvalidIdError, match="a cmd topic needs a command name"):
        Topic("acme", "pump-1", Kind.COMMAND)
    with pytest.raises(InvalidIdError, match="only cmd topics have one"):
        Topic("acme", "pump-1", Kind.STATUS, "reset")
    with pytest.raises(InvalidIdError, match="device id '#'"):
        Topic("acme", "#", Kind.STATUS)
    with pytest.raises(InvalidTopicError, match="unknown kind"):
        Topic("acme", "pump-1", "metrics")  # type: ignore[arg-type]
    assert Topic("acme", "pump-1", "status").kind is Kind.STATUS  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [
        ("", "it is empty"),
        ("x/acme/pump-1/telemetry", "it must start with 'fl/'"),
        ("FL/acme/pump-1/telemetry", "it must start with 'fl/'"),
        ("fl/acme/pump-1", "it has 3 levels"),
        ("fl/acme/pump-1/cmd/reset/now", "it has 6 levels"),
        ("fl/acme/pump-1/metrics", "unknown kind 'metrics'"),
        ("fl/acme/pump-1/cmd", "a command topic needs a name"),
        ("fl/acme/pump-1/status/x", "only cmd topics have a fifth level"),
        ("fl//pump-1/telemetry", "level 2 is empty"),
        ("fl/acme/pump-1/telemetry/", "level 5 is empty"),
        ("/fl/acme/pump-1/telemetry", "it must start with 'fl/'"),
        ("fl/acme/+/telemetry", "wildcards '+' and '#' are allowed in subscription filters"),
        ("fl/acme/pump-1/#", "wildcards"),
        ("$share/ingest/fl/acme/pump-1/telemetry", "shared-subscription filter"),
        ("$SYS/broker/uptime", "broker topics"),
        ("fl/Acme/pump-1/telemetry", "tenant id 'Acme' is invalid: uppercase 'A'"),
        ("fl/acme/pump 1/status", "device id 'pump 1' is invalid: ' ' is not allowed"),
        ("fl/acme/pump-1/cmd/Reset", "command name 'Reset' is invalid"),
        ("fl/acme/pump-1/cmd/_x", "it starts with '_'"),
        ("fl/acme/" + "p" * 65 + "/telemetry", "it is 65 characters long"),
        ("fl/acme/pump-1/telemetry\n", "unknown kind 'telemetry\\n'"),
        ("fl/acmé/pump-1/status", "non-ASCII character 'é'"),
    ],
)
def test_bad_topics_say_what_is_wrong(topic: str, fragment: str) -> None:
    with pytest.raises(InvalidTopicError) as caught:
        parse(topic)
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(f"topic {topic!r} is invalid: ")


def test_parse_refuses_non_strings() -> None:
    with pytest.raises(InvalidTopicError, match="must be a string, not bytes"):
        parse(b"fl/acme/pump-1/status")  # type: ignore[arg-type]
    with pytest.raises(InvalidTopicError, match="not list"):
        parse(["fl"])  # type: ignore[arg-type]


@given(value=st.text(alphabet="fl/acmepu-1tyrsdh+#$_ ", max_size=40))
def test_parse_accepts_exactly_the_grammar(value: str) -> None:
    parts = value.split("/")
    expected = (
        parts[0] == "fl"
        and all(_is_id(p) for p in parts[1:3])
        and (
            (len(parts) == 4 and parts[3] in {"telemetry", "status", "events", "cmd-res"})
            or (len(parts) == 5 and parts[3] == "cmd" and _is_id(parts[4]))
        )
    )
    if expected:
        assert str(parse(value)) == value
    else:
        with pytest.raises(InvalidTopicError):
            parse(value)


# --- filters ---------------------------------------------------------------------------


def test_filters_of_the_acl_matrix() -> None:
    assert topics.device_command_filter("acme", "pump-1") == "fl/acme/pump-1/cmd/#"
    assert topics.tenant_filter("acme") == "fl/acme/#"
    assert topics.tenant_command_filter("acme") == "fl/acme/+/cmd/#"
    assert topics.service_filters() == (
        "fl/+/+/telemetry",
        "fl/+/+/status",
        "fl/+/+/events",
        "fl/+/+/cmd-res",
    )
    assert topics.shared("ingest", "fl/+/+/telemetry") == "$share/ingest/fl/+/+/telemetry"


def test_filter_builders_validate() -> None:
    with pytest.raises(InvalidIdError, match="tenant id '\\+'"):
        topics.tenant_filter("+")
    with pytest.raises(InvalidIdError, match="share group 'In gest'"):
        topics.shared("In gest", "fl/#")
    with pytest.raises(InvalidFilterError, match="'#' must be the whole last level"):
        topics.shared("ingest", "fl/#/x")
    with pytest.raises(InvalidFilterError, match="already a shared subscription"):
        topics.shared("ingest", "$share/other/fl/#")


@given(tenant=ids, device=ids, name=ids)
def test_filters_cover_the_topics_they_are_for(tenant: str, device: str, name: str) -> None:
    own = topics.device_topics(tenant, device)
    cmd = topics.command(tenant, device, name)
    services = topics.service_filters()
    for kind, topic in own.items():
        assert [f for f in services if filter_matches(f, topic)] == [
            services[list(own).index(kind)]
        ]
        assert filter_matches(topics.tenant_filter(tenant), topic)
        assert not filter_matches(topics.device_command_filter(tenant, device), topic)
    assert filter_matches(topics.device_command_filter(tenant, device), cmd)
    assert filter_matches(topics.tenant_command_filter(tenant), cmd)
    assert not any(filter_matches(f, cmd) for f in services)
    assert filter_contains(
        topics.tenant_command_filter(tenant), topics.device_command_filter(tenant, device)
    )
    assert filter_contains(topics.tenant_filter(tenant), topics.tenant_command_filter(tenant))
    assert not filter_contains(topics.tenant_command_filter(tenant), topics.tenant_filter(tenant))


@pytest.mark.parametrize(
    ("topic_filter", "fragment"),
    [
        ("", "it is empty"),
        ("a/#/b", "'#' must be the whole last level"),
        ("a#", "'#' must be the whole last level"),
        ("a/b#", "'#' must be the whole last level"),
        ("a/+b", "'+' must be a whole level"),
        ("++", "'+' must be a whole level"),
        ("a/\x00", "NUL"),
        ("a/\ud800", "not valid UTF-8"),
        ("a/" + "é" * 32767, "65536 bytes of UTF-8 (at most 65535)"),
    ],
)
def test_bad_filters(topic_filter: str, fragment: str) -> None:
    with pytest.raises(InvalidFilterError) as caught:
        topics.validate_filter(topic_filter)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "topic_filter", ["#", "+", "a/+", "a/#", "+/+/#", "/", "a//b", "$SYS/#", "fl/acme/+/cmd/#"]
)
def test_good_filters(topic_filter: str) -> None:
    assert topics.validate_filter(topic_filter) == topic_filter


def test_validate_filter_refuses_non_strings() -> None:
    with pytest.raises(InvalidFilterError, match="not NoneType"):
        topics.validate_filter(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/b/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("a/+", "a/", True),  # an empty level is a level
        ("+/+", "/x", True),
        ("+", "/x", False),
        ("a/#", "a", True),  # '#' includes the parent level
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "a/b", True),
        ("#", "$SYS/uptime", False),  # filters starting with a wildcard skip `$` topics
        ("+/uptime", "$SYS/uptime", False),
        ("$SYS/#", "$SYS/uptime", True),
        ("$SYS/+", "$SYS/uptime", True),
        ("fl/+/+/telemetry", "fl/acme/pump-1/telemetry", True),
        ("fl/+/+/telemetry", "fl/acme/pump-1/status", False),
        ("fl/acme/+/cmd/#", "fl/acme/pump-1/cmd/reset", True),
        ("fl/acme/+/cmd/#", "fl/other/pump-1/cmd/reset", False),
        ("fl/acme/#", "fl/acmex/pump-1/status", False),
        ("a/+", "a/+", False),  # a topic name with a wildcard is malformed: matches nothing
        ("a/#", "a/#", False),
        ("#", "", False),
        ("a/#/b", "a/x/b", False),  # a malformed filter matches nothing
    ],
)
def test_filter_matches_table(topic_filter: str, topic: str, expected: bool) -> None:
    assert filter_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("a/+", "a/#", False),  # DESIGN: `a/+` allowed does not allow `a/#`
        ("a/#", "a/+", True),
        ("a/#", "a/+/b", True),
        ("a/#", "a", True),
        ("a/#", "a/#", True),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/b", "a/+", False),
        ("a/+", "a", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("#", "a/b/#", True),
        ("#", "#", True),
        ("#", "$SYS/#", False),
        ("+/#", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("#", "+/x", True),
        ("a/#", "#", False),
        ("+", "#", False),
        ("+/+", "+/+/+", False),
        ("fl/acme/pump-1/cmd/#", "fl/acme/pump-1/cmd/reset", True),
        ("fl/acme/pump-1/cmd/#", "fl/acme/+/cmd/reset", False),
        ("fl/acme/#", "fl/+/pump-1/status", False),
        ("fl/+/+/telemetry", "fl/acme/+/telemetry", True),
        ("a/#/b", "a/x/b", False),  # malformed filters contain nothing
        ("a/#", "a/#/b", False),
        ("+/#", "#", True),  # both match every non-`$` topic of one level or more
        ("/+/#", "/#", True),  # the parent of `/#` would be the empty topic, which is none
        ("a/+/#", "a/#", False),  # `a/#` matches `a`, `a/+/#` does not
    ],
)
def test_filter_contains_table(outer: str, inner: str, expected: bool) -> None:
    assert filter_contains(outer, inner) is expected


# A reference matcher built differently (a translation to one regex), to check against.
def _reference_matches(topic_filter: str, topic: str) -> bool:
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic_filter.split("/")
    tail = ""
    if levels[-1] == "#":
        levels = levels[:-1]
        tail = "(?:/.*)?" if levels else ".*"
    pattern = "/".join("[^/]*" if lv == "+" else re.escape(lv) for lv in levels) + tail
    return re.fullmatch(pattern, topic, re.DOTALL) is not None


_LEVELS = ["a", "b", "", "$s"]
filters = st.builds(
    lambda levels, hash_tail: "/".join(levels + (["#"] if hash_tail else [])),
    st.lists(st.sampled_from([*_LEVELS, "+"]), min_size=0, max_size=3),
    st.booleans(),
).filter(bool)
topic_names = st.lists(st.sampled_from([*_LEVELS, "c"]), min_size=1, max_size=5).map("/".join)


@given(topic_filter=filters, topic=topic_names)
def test_filter_matches_agrees_with_a_reference(topic_filter: str, topic: str) -> None:
    if not topic:
        return
    assert filter_matches(topic_filter, topic) is _reference_matches(topic_filter, topic)


@settings(max_examples=150)
@given(outer=filters, inner=filters)
def test_filter_contains_is_exact_on_a_finite_universe(outer: str, inner: str) -> None:
    # Every topic of up to one level more than the longer filter, over the filters' own
    # literals plus fresh ones: enough to find a witness when containment fails.
    alphabet = sorted({*outer.split("/"), *inner.split("/"), "z", "$z"} - {"+", "#"})
    longest = max(outer.count("/"), inner.count("/")) + 2
    universe = [
        "/".join(levels)
        for n in range(1, longest + 1)
        for levels in itertools.product(alphabet, repeat=n)
    ]
    matched_by_inner = [t for t in universe if t and filter_matches(inner, t)]
    covered = all(filter_matches(outer, t) for t in matched_by_inner)
    assert filter_contains(outer, inner) is covered


@given(outer=filters, inner=filters, topic=topic_names)
def test_containment_implies_matching(outer: str, inner: str, topic: str) -> None:
    if topic and filter_contains(outer, inner) and filter_matches(inner, topic):
        assert filter_matches(outer, topic)


@given(topic_filter=filters)
def test_every_filter_contains_itself(topic_filter: str) -> None:
    assert filter_contains(topic_filter, topic_filter)
