"""A subscription index: matching a topic costs its depth, not the number of subscriptions.

amqtt 0.12.1 tests every message against every filter; with 10,000 devices each on its own
`cmd/#` that is 10,000 string matches per telemetry message. Filters without wildcards go
in a dict; the rest in a trie walked level by level.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)  # the subscriber key (a client id, a session)


class _Node(Generic[K]):
    __slots__ = ("children", "hash_subs", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.subs: dict[K, int] = {}  # filters ending at this level
        self.hash_subs: dict[K, int] = {}  # filters ending with "/#" below this level


class SubscriptionIndex(Generic[K]):
    """Filters -> {subscriber: qos}; `match(topic)` yields each subscriber once, max QoS."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[K, int]] = {}
        self._root: _Node[K] = _Node()
        self._filters: dict[K, dict[str, int]] = {}

    def __len__(self) -> int:
        return sum(len(f) for f in self._filters.values())

    def add(self, topic_filter: str, key: K, qos: int) -> None:
        """Subscribe key to filter (a repeated subscription replaces the QoS)."""
        self._filters.setdefault(key, {})[topic_filter] = qos
        if "+" not in topic_filter and "#" not in topic_filter:
            self._exact.setdefault(topic_filter, {})[key] = qos
            return
        node = self._root
        levels = topic_filter.split("/")
        for i, level in enumerate(levels):
            if level == "#" and i == len(levels) - 1:
                node.hash_subs[key] = qos
                return
            node = node.children.setdefault(level, _Node())
        node.subs[key] = qos

    def remove(self, topic_filter: str, key: K) -> bool:
        """Unsubscribe; True if key was subscribed to filter."""
        owned = self._filters.get(key)
        if not owned or topic_filter not in owned:
            return False
        del owned[topic_filter]
        if not owned:
            del self._filters[key]
        if "+" not in topic_filter and "#" not in topic_filter:
            subs = self._exact[topic_filter]
            subs.pop(key, None)
            if not subs:
                del self._exact[topic_filter]
            return True
        path: list[tuple[_Node[K], str]] = []
        node = self._root
        levels = topic_filter.split("/")
        for i, level in enumerate(levels):
            if level == "#" and i == len(levels) - 1:
                node.hash_subs.pop(key, None)
                break
            path.append((node, level))
            node = node.children[level]
        else:
            node.subs.pop(key, None)
        # prune empty branches so a fleet that comes and goes does not leak nodes
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.children or child.subs or child.hash_subs:
                break
            del parent.children[level]
        return True

    def remove_all(self, key: K) -> int:
        """Drop every subscription of key; returns how many there were."""
        filters = list(self._filters.get(key, {}))
        for topic_filter in filters:
            self.remove(topic_filter, key)
        return len(filters)

    def count_of(self, key: K) -> int:
        """How many filters key is subscribed to."""
        return len(self._filters.get(key, ()))

    def has(self, topic_filter: str, key: K) -> bool:
        """Whether key is subscribed to exactly this filter."""
        return topic_filter in self._filters.get(key, ())

    def filters_of(self, key: K) -> dict[str, int]:
        """The filters key is subscribed to, with their QoS."""
        return dict(self._filters.get(key, {}))

    def subscribers(self) -> Iterator[K]:
        return iter(self._filters)

    def match(self, topic: str) -> dict[K, int]:
        """Every subscriber whose filters match topic, with the highest matching QoS."""
        found: dict[K, int] = {}
        exact = self._exact.get(topic)
        if exact:
            found.update(exact)
        levels = topic.split("/")
        # MQTT 4.7.2: a filter starting with a wildcard does not match a $-topic
        dollar = topic.startswith("$")
        self._walk(self._root, levels, 0, found, dollar)
        return found

    def _walk(
        self, node: _Node[K], levels: list[str], depth: int, found: dict[K, int], dollar: bool
    ) -> None:
        wild_ok = not (dollar and depth == 0)
        if wild_ok and node.hash_subs:
            # "a/#" matches "a" itself and everything below it
            _merge(found, node.hash_subs)
        if depth == len(levels):
            if node.subs:
                _merge(found, node.subs)
            return
        child = node.children.get(levels[depth])
        if child is not None:
            self._walk(child, levels, depth + 1, found, dollar)
        if wild_ok:
            plus = node.children.get("+")
            if plus is not None:
                self._walk(plus, levels, depth + 1, found, dollar)


def _merge(found: dict[K, int], subs: dict[K, int]) -> None:
    for key, qos in subs.items():
        if found.get(key, -1) < qos:
            found[key] = qos
