"""Retained topic names in a trie, so a SUBSCRIBE finds its retained messages by walking its filter.

amqtt 0.12.1 tests every retained message against the filter of each new subscription; with
a status retained per device that is fleet-size work for every device that connects.
"""

from __future__ import annotations

from collections.abc import Iterator


class _Node:
    __slots__ = ("children", "present")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.present = False  # a retained topic ends at this node


class RetainedTopics:
    """The set of topic names that hold a retained message, searchable by filter."""

    def __init__(self) -> None:
        self._root = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, topic: str) -> None:
        node = self._root
        for level in topic.split("/"):
            node = node.children.setdefault(level, _Node())
        if not node.present:
            node.present = True
            self._count += 1

    def discard(self, topic: str) -> None:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic.split("/"):
            found = node.children.get(level)
            if found is None:
                return
            path.append((node, level))
            node = found
        if not node.present:
            return
        node.present = False
        self._count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.children or child.present:
                break
            del parent.children[level]

    def matching(self, topic_filter: str) -> Iterator[str]:
        """Every retained topic the filter matches (MQTT 4.7: wildcards skip `$` topics)."""
        yield from self._walk(self._root, topic_filter.split("/"), 0, [])

    def _walk(self, node: _Node, levels: list[str], depth: int, path: list[str]) -> Iterator[str]:
        if depth == len(levels):
            if node.present:
                yield "/".join(path)
            return
        level = levels[depth]
        if level == "#":
            if depth and node.present:  # `a/#` matches `a`
                yield "/".join(path)
            yield from self._everything(node, path, depth == 0)
            return
        if level == "+":
            for name, child in node.children.items():
                if depth == 0 and name.startswith("$"):
                    continue
                yield from self._walk(child, levels, depth + 1, [*path, name])
            return
        exact = node.children.get(level)
        if exact is not None:
            yield from self._walk(exact, levels, depth + 1, [*path, level])

    def _everything(self, node: _Node, path: list[str], top: bool) -> Iterator[str]:
        for name, child in node.children.items():
            if top and name.startswith("$"):
                continue
            here = [*path, name]
            if child.present:
                yield "/".join(here)
            yield from self._everything(child, here, False)
