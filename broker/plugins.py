"""The broker's checks, written to amqtt's plugin interface: identity from this connection's
client certificate, and the ACL policy.

`load_plugins` builds exactly the plugins the broker's options name (ours, and any extra ones),
so none of amqtt's defaults (anonymous login, its topic ACL without identity substitution) is
ever active.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import Action as AmqttAction
from amqtt.contexts import BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from cryptography import x509

from broker import wire
from broker.errors import BrokerError
from broker.identity import (
    AUTH_REFUSAL,
    DENIAL,
    PRINCIPAL,
    SERIAL,
    principal_from_certificate,
    principal_of,
)
from broker.policy import Action, Policy
from broker.revocation import RevocationList
from certs import CertsError, Role

log = logging.getLogger("broker.auth")

_ACTIONS = {
    AmqttAction.PUBLISH: Action.PUBLISH,
    AmqttAction.SUBSCRIBE: Action.SUBSCRIBE,
    AmqttAction.RECEIVE: Action.RECEIVE,
}


def load_plugins(config: Mapping[str, Mapping[str, Any]]) -> list[BasePlugin[Any]]:
    """Each plugin (dotted class path -> its Config fields), built as amqtt's interface says:
    a context whose `config` is an instance of the plugin's `Config` dataclass."""
    plugins: list[BasePlugin[Any]] = []
    for path, fields in config.items():
        module_name, _, class_name = path.rpartition(".")
        try:
            found: object = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise BrokerError(f"broker plugin {path!r} cannot be imported: {exc}") from exc
        if not (isinstance(found, type) and issubclass(found, (BaseAuthPlugin, BaseTopicPlugin))):
            raise BrokerError(
                f"broker plugin {path!r} is neither an auth nor a topic plugin "
                "(amqtt.plugins.base.BaseAuthPlugin or BaseTopicPlugin)"
            )
        plugin_class: type[BaseAuthPlugin | BaseTopicPlugin] = found
        context = BaseContext()
        context.logger = logging.getLogger(f"broker.plugin.{class_name}")
        try:
            plugin_config = plugin_class.Config(**fields)  # each plugin's own dataclass
        except TypeError as exc:
            raise BrokerError(f"broker plugin {path!r}: bad configuration: {exc}") from exc
        if not dataclasses.is_dataclass(plugin_config):
            raise BrokerError(f"broker plugin {path!r}: its Config must be a dataclass")
        # amqtt's interface: a plugin reads its Config instance from context.config
        context.config = plugin_config
        plugins.append(plugin_class(context))
    return plugins


@dataclass(frozen=True)
class Refusal:
    """Why a CONNECT was refused: a rule for metrics, the CONNACK code, a sentence for the log."""

    rule: str
    return_code: int
    detail: str


class CertificateAuthPlugin(BaseAuthPlugin):
    """The principal is the verified certificate of *this* connection; client id must be its CN.

    amqtt 0.12.1 authenticates a `clean_session=False` reconnect against the TLS object of the
    session's previous connection; the broker hands us a fresh session per CONNECT instead,
    and we read nothing but that session's own `ssl_object`.
    """

    @dataclass
    class Config:
        ca_file: str
        crl_file: str | None = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.policy = Policy()
        self.revocations = (
            RevocationList(Path(self.config.crl_file), Path(self.config.ca_file))
            if self.config.crl_file
            else None
        )

    async def authenticate(self, *, session: Any) -> bool:
        refusal = self._check(session)
        if refusal is not None:
            session.attributes[AUTH_REFUSAL] = refusal
            return False
        return True

    def _check(self, session: Any) -> Refusal | None:
        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return Refusal("no-certificate", wire.NOT_AUTHORIZED, "no client certificate")
        cert = x509.load_der_x509_certificate(der)
        try:
            principal = principal_from_certificate(cert)
        except CertsError as exc:
            return Refusal("bad-identity", wire.NOT_AUTHORIZED, str(exc))
        if principal.role is Role.SERVER:
            return Refusal("bad-identity", wire.NOT_AUTHORIZED, "a server certificate")
        if self.revocations is not None:
            self.revocations.refresh()
            if self.revocations.is_revoked(cert.serial_number):
                return Refusal(
                    "revoked", wire.NOT_AUTHORIZED, f"serial {cert.serial_number:x} is revoked"
                )
        if session.client_id != principal.id:
            return Refusal(
                "client-id-mismatch",
                wire.IDENTIFIER_REJECTED,
                f"client id {session.client_id!r} is not the certificate's CN {principal.id!r}",
            )
        if session.will_flag:
            decision = self.policy.decide(
                principal, Action.WILL, session.will_topic or "", retain=bool(session.will_retain)
            )
            if not decision:
                return Refusal("will", wire.NOT_AUTHORIZED, decision.reason)
        session.attributes[PRINCIPAL] = principal
        session.attributes[SERIAL] = cert.serial_number
        session.username = principal.id
        return None


class PolicyTopicPlugin(BaseTopicPlugin):
    """Publish, subscribe and receive decided by broker.policy for the session's principal.

    Besides amqtt's keywords it takes `retain`, so retained publishes are checked too.
    """

    @dataclass
    class Config:
        cache_size: int = 65_536

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.policy = Policy(self.config.cache_size)

    async def topic_filtering(
        self,
        *,
        session: Any = None,
        topic: str | None = None,
        action: Any = None,
        retain: bool = False,
    ) -> bool:
        principal = principal_of(session)
        ours = _ACTIONS.get(action, action if isinstance(action, Action) else None)
        if principal is None or topic is None or ours is None:
            return False
        decision = self.policy.decide(principal, ours, topic, retain=retain)
        if not decision.allowed:
            session.attributes[DENIAL] = decision
        return decision.allowed
