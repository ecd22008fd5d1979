"""A module of kind `listener`: an MQTT broker on the gateway's LAN for downstream devices.

It is fieldline's embedded broker, in the agent's process: devices log in with their own
certificates from the same CA and may publish only their own topics, exactly as upstream.
Their telemetry is handed to the agent (the broker's `tap`), which routes it like a
module's: upstream as `<listener>.<device>.<metric>`, and to rules as `<device>.<metric>`,
within each device's budgets (edge_agent/languard.py): one device cannot crowd out the rest.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.server import BrokerOptions, FieldlineBroker
from broker.service import tls_files
from certs import CertsError
from edge_agent.errors import EdgeError
from edge_agent.languard import LanGuard
from edge_agent.manifest import ModuleSpec
from schemas.errors import SchemaError
from schemas.messages import decode_telemetry
from schemas.topics import Kind, parse

log = logging.getLogger("fieldline.edge")

Reading = dict[str, Any]


class LanListener:
    """`await start()` listens on the module's bind:port; readings go to `on_reading`."""

    def __init__(
        self,
        spec: ModuleSpec,
        pki_dir: Path,
        tenant: str,
        on_reading: Callable[[str, Reading], None],
        guard: LanGuard,
        state_dir: Path,
    ) -> None:
        self.name = spec.name
        self.tenant = tenant
        self._on_reading = on_reading
        self.guard = guard
        self.received = 0
        self.refused = 0
        try:
            files = tls_files(pki_dir, spec.server_cert)
        except CertsError as exc:
            raise EdgeError(
                f"module {spec.name!r} (listener): {exc}; issue its certificate with "
                f"`fieldline certs server {spec.server_cert} --ip <LAN address>`"
            ) from exc
        # With a store the broker writes a PUBACK only after the PUBLISH has been handled,
        # tap included, and the tap commits to the outbox: nothing is acknowledged before it
        # is durable (without one, PUBACKs go out as PUBLISHes are read). The store also
        # keeps the devices' persistent sessions and retained statuses across restarts.
        self.options = BrokerOptions(
            **files, bind=spec.bind, port=spec.port, tap=self._tap,
            store_file=state_dir / f"{spec.name}.listener.sqlite",
        )  # fmt: skip
        self.broker: FieldlineBroker | None = None

    async def start(self) -> None:
        self.broker = FieldlineBroker(self.options)
        try:
            await self.broker.start()
        except OSError as exc:
            raise EdgeError(
                f"module {self.name!r} cannot listen on {self.options.bind}:{self.options.port}:"
                f" {exc.strerror or exc}"
            ) from exc

    async def stop(self) -> None:
        if self.broker is not None:
            await self.broker.shutdown()
            self.broker = None

    def _tap(self, topic: str, payload: bytes) -> None:
        # the broker's policy has already checked that the device publishes its own topic
        try:
            where = parse(topic)
        except SchemaError:
            return
        if where.kind is not Kind.TELEMETRY:
            return
        device = where.device
        if where.tenant != self.tenant:
            self.refused += 1
            self.guard.refuse(device, "tenant", f"{where.tenant}/{device}: another tenant")
            return
        if not self.guard.admit_bytes(device, len(payload)):
            self.refused += 1
            return
        try:
            model = decode_telemetry(payload)  # the platform's rules, before anything goes on
            body = json.loads(payload)
        except (SchemaError, ValueError) as exc:
            self.refused += 1
            self.guard.refuse(device, "invalid", f"{device}: {str(exc)[:200]}")
            return
        stamps = [s.ts for s in model.samples] if model.samples else [model.ts]
        if not self.guard.admit_readings(device, len(stamps)):
            self.refused += 1
            return
        self.received += 1
        now = int(time.time() * 1000)
        # the model has the timestamps parsed (ms or RFC 3339); the raw JSON keeps the values
        # exactly as the device sent them
        for when, sample in zip(stamps, body.get("samples") or [body], strict=True):
            ts = int(when.timestamp() * 1000) if when is not None else now
            if self.guard.too_old(device, ts):
                continue
            metrics = self.guard.metrics(device, sample["metrics"])
            if metrics:
                self._on_reading(self.name, {"ts": ts, "metrics": metrics})
