"""The amqtt pieces the embedded broker uses (docs/broker.md, "Upgrading amqtt"): if an amqtt
release changes one of them, this fails before the broker does."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import Session as AmqttSession

from broker.plugins import CertificateAuthPlugin, PolicyTopicPlugin, load_plugins
from broker.session import Session

BROKER = Path(__file__).resolve().parents[2] / "broker"
# what a plugin written for amqtt reads from the session it is handed
PLUGIN_VISIBLE = (
    "client_id", "clean_session", "keep_alive", "username", "password", "ssl_object",
    "remote_address", "remote_port", "attributes", "will_flag", "will_topic",
    "will_message", "will_qos", "will_retain",
)  # fmt: skip


def _keyword_only(function: object) -> list[str]:
    return [
        name
        for name, p in inspect.signature(function).parameters.items()  # type: ignore[arg-type]
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def test_the_plugin_interface_is_what_the_broker_calls() -> None:
    assert inspect.iscoroutinefunction(BaseAuthPlugin.authenticate)
    assert _keyword_only(BaseAuthPlugin.authenticate) == ["session"]
    assert inspect.iscoroutinefunction(BaseTopicPlugin.topic_filtering)
    assert _keyword_only(BaseTopicPlugin.topic_filtering) == ["session", "topic", "action"]
    assert inspect.iscoroutinefunction(BasePlugin.close)
    assert list(inspect.signature(BasePlugin.__init__).parameters) == ["self", "context"]
    assert dataclasses.is_dataclass(BasePlugin.Config)
    assert {a.name: a.value for a in Action} == {
        "SUBSCRIBE": "subscribe", "PUBLISH": "publish", "RECEIVE": "receive",
    }  # fmt: skip


def test_a_plugin_reads_its_config_dataclass_from_the_context() -> None:
    context = BaseContext()
    assert {"config", "logger"} <= set(vars(context))
    plugins = load_plugins(
        {
            "broker.plugins.CertificateAuthPlugin": {"ca_file": "/nonexistent/ca.pem"},
            "broker.plugins.PolicyTopicPlugin": {"cache_size": 7},
        }
    )
    auth, topic = plugins
    assert isinstance(auth, CertificateAuthPlugin)
    assert isinstance(topic, PolicyTopicPlugin)
    assert topic.config.cache_size == 7


def test_our_session_offers_what_amqtts_session_offers_to_plugins() -> None:
    theirs = AmqttSession()
    ours = Session("c", True, outbox=None)  # type: ignore[arg-type]
    for name in PLUGIN_VISIBLE:
        assert hasattr(theirs, name), f"amqtt's Session no longer has {name}"
        assert hasattr(ours, name), f"broker.session.Session lacks {name}"


def test_the_broker_touches_no_private_attribute_of_another_object() -> None:
    """`x._name` only on self or cls: never amqtt's (or anyone's) internals."""
    found = []
    for path in sorted(BROKER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert found == []


def test_the_broker_subclasses_only_amqtts_plugin_bases() -> None:
    """A subclass's `self._x` could be amqtt's internals; only the plugin bases are extended."""
    allowed = {"BaseAuthPlugin", "BaseTopicPlugin"}
    found = []
    for path in sorted(BROKER.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        from_amqtt = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("amqtt")
            for alias in node.names
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                found += [f"{path.name}: {node.name}({b})" for b in bases & from_amqtt - allowed]
    assert found == []
