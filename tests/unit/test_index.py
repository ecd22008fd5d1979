"""The subscription index agrees with MQTT matching (schemas.topics.filter_matches) everywhere."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.index import SubscriptionIndex
from broker.retained import RetainedTopics
from schemas.topics import filter_matches

LEVELS = st.sampled_from(["a", "b", "c", "", "$SYS", "fl"])
# an empty topic name is refused before matching (MQTT-4.7.3-1)
TOPICS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join).filter(bool)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(["a", "b", "", "+", "$SYS", "fl"]), max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=300, deadline=None)
@given(
    subs=st.lists(st.tuples(filters() | TOPICS, st.integers(0, 2)), max_size=12),
    topics=st.lists(TOPICS, min_size=1, max_size=6),
)
def test_index_matches_like_mqtt(subs: list[tuple[str, int]], topics: list[str]) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for key, (topic_filter, qos) in enumerate(subs):
        index.add(topic_filter, key, qos)
    for topic in topics:
        expected = {k for k, (f, _) in enumerate(subs) if filter_matches(f, topic)}
        assert set(index.match(topic)) == expected, topic


@settings(max_examples=200, deadline=None)
@given(subs=st.lists(st.tuples(filters() | TOPICS, st.integers(0, 3)), max_size=10))
def test_removing_everything_leaves_an_empty_index(subs: list[tuple[str, int]]) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for key, (topic_filter, _) in enumerate(subs):
        index.add(topic_filter, key % 3, 1)
    for key in range(3):
        index.remove_all(key)
    assert len(index) == 0
    assert not index._root.children  # pruned, nothing leaks
    assert not index._exact


def test_highest_qos_wins_and_each_subscriber_appears_once() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("fl/acme/+/telemetry", "svc", 0)
    index.add("fl/#", "svc", 1)
    index.add("fl/acme/dev-1/telemetry", "ops", 2)
    assert index.match("fl/acme/dev-1/telemetry") == {"svc": 1, "ops": 2}
    assert index.remove("fl/#", "svc")
    assert not index.remove("fl/#", "svc")
    assert index.match("fl/acme/dev-1/telemetry") == {"svc": 0, "ops": 2}


def test_wildcards_do_not_match_dollar_topics() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("#", "all", 0)
    index.add("+/x", "plus", 0)
    index.add("$SYS/#", "sys", 0)
    assert index.match("$SYS/x") == {"sys": 0}
    assert index.match("a/x") == {"all": 0, "plus": 0}


@settings(max_examples=300, deadline=None)
@given(
    retained=st.lists(TOPICS, max_size=12, unique=True),
    gone=st.lists(TOPICS, max_size=4),
    topic_filter=filters() | TOPICS,
)
def test_retained_topics_found_by_filter_like_mqtt(
    retained: list[str], gone: list[str], topic_filter: str
) -> None:
    store = RetainedTopics()
    for topic in retained:
        store.add(topic)
    for topic in gone:
        store.discard(topic)
    left = [t for t in retained if t not in gone]
    assert len(store) == len(left)
    found = list(store.matching(topic_filter))
    assert sorted(found) == sorted(t for t in left if filter_matches(topic_filter, t))
    assert len(found) == len(set(found))


def test_retained_topics_prune_empty_branches() -> None:
    store = RetainedTopics()
    store.add("fl/acme/dev-1/status")
    store.add("fl/acme")
    store.discard("fl/acme/dev-1/status")
    assert list(store.matching("#")) == ["fl/acme"]
    store.discard("fl/acme")
    assert not store._root.children
