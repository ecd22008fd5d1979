"""The edge agent's manifest (TOML): identity, broker, outbox, modules, rules and routes.

`load_manifest(path)` reads and validates a manifest; every problem, from a misspelt key to a
route to nowhere, is reported in one ManifestError naming the file and the key path
(`routes[2].to`). Relative paths resolve under FIELDLINE_HOME: `agent.bundle` from
FIELDLINE_HOME itself, `outbox.path` from FIELDLINE_HOME/edge/<agent id>/.
"""

from __future__ import annotations

import difflib
import math
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from device_runtime.args import MAX_INTERVAL_S
from device_runtime.errors import CommandError
from edge_agent import modbus_spec, opcua_spec
from edge_agent.errors import ManifestError
from edge_agent.registers import WriteArgsError, parse_write
from schemas.errors import InvalidIdError
from schemas.limits import DEFAULT_LIMITS, MAX_DETAIL_LENGTH, MAX_FW_LENGTH, METRIC_NAME_PATTERN
from schemas.messages import Command, Severity
from schemas.topics import validate_id

UPSTREAM = "upstream"
RULE_PREFIX = "rules/"
SIMULATED_KINDS = ("machine", "arma", "pico")
# async modules on a real field bus (edge_agent/field.py), started and stopped by the agent
FIELD_KINDS = ("opcua", "modbus")
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
ROUTE_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
# A reading updates every hopping window containing it: bound that work and the open windows.
MAX_WINDOWS_PER_READING = 1000
_PATTERN_WORDS = {
    NAME_PATTERN: "use 1-32 of a-z 0-9 _ - starting with a lowercase letter",
    ROUTE_NAME_PATTERN: "use 1-64 of A-Z a-z 0-9 _ - starting with a letter",
    f"^{METRIC_NAME_PATTERN}$": "metric names are 1-64 of A-Z a-z 0-9 _ . - starting with a letter",
}
# The keys each module kind takes besides name and kind.
_KIND_KEYS = {
    "machine": ("interval_s",),
    "arma": ("interval_s", "sensors"),
    "pico": ("interval_s",),
    "listener": ("port", "bind", "server_cert"),
    "opcua": (
        "url",
        "security_mode",
        "server_trust",
        "application_uri",
        "nodes",
        "mode",
        "interval_s",
        "publishing_interval_s",
        "sampling_interval_s",
        "timeout_s",
    ),
    "modbus": ("host", "port", "unit_id", "interval_s", "timeout_s", "max_gap", "points"),
}


def _id(what: str) -> AfterValidator:
    def check(value: str) -> str:
        try:
            return validate_id(value, what)
        except InvalidIdError as exc:
            raise ValueError(str(exc)) from None

    return AfterValidator(check)


class _Spec(BaseModel):
    # a misspelt key must be an error, not silently ignored; TOML values keep their types
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AgentSpec(_Spec):
    """`[agent]`: the gateway's device id (its certificate CN) and tenant."""

    id: Annotated[str, _id("device id")]
    tenant: Annotated[str, _id("tenant id")]
    bundle: str | None = Field(default=None, min_length=1)
    fw: str | None = Field(default=None, min_length=1, max_length=MAX_FW_LENGTH)


class BrokerSpec(_Spec):
    """`[broker]`: where the agent's uplink connects (mutual TLS)."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8883, ge=1, le=65535)
    keepalive_s: int = Field(default=30, ge=5, le=3600)


class OutboxSpec(_Spec):
    """`[outbox]`: the store-and-forward file and its bounds."""

    path: str = Field(default="outbox.sqlite", min_length=1)
    max_bytes: int = Field(default=50_000_000, ge=65_536)
    batch_samples: int = Field(default=100, ge=1, le=DEFAULT_LIMITS.max_samples)


MODULE_MIN_INTERVAL_S = 0.01


class ModuleSpec(_Spec):
    """`[[modules]]`: a simulated sensor or machine, or a listener for LAN devices."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["machine", "arma", "pico", "listener", "opcua", "modbus"]
    # faster than a device may be told to go (set-interval): a gateway samples local buses
    interval_s: float = Field(default=1.0, ge=MODULE_MIN_INTERVAL_S, le=MAX_INTERVAL_S)
    sensors: int = Field(default=2, ge=1, le=64)
    port: int = Field(default=1884, ge=1, le=65535)
    bind: str = Field(default="127.0.0.1", min_length=1)
    # the listener's TLS certificate: `fieldline certs server NAME --host/--ip <LAN address>`
    server_cert: str = Field(default="broker", min_length=1)
    # opcua (edge_agent/opcua.py): the endpoint, its security and trust, the nodes it reads
    url: str | None = Field(default=None, min_length=1)
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    # the server's certificate (a .der/.pem file) or a directory of trusted certificates
    server_trust: str | None = Field(default=None, min_length=1)
    application_uri: str | None = Field(default=None, min_length=1, max_length=256)
    nodes: list[opcua_spec.NodeSpec] = Field(default_factory=list, max_length=opcua_spec.MAX_NODES)
    mode: Literal["subscribe", "poll"] = "subscribe"
    publishing_interval_s: float = Field(default=1.0, ge=0.01, le=3600, allow_inf_nan=False)
    sampling_interval_s: float = Field(default=0.5, ge=0, le=3600, allow_inf_nan=False)
    timeout_s: float = Field(default=4.0, ge=0.1, le=600, allow_inf_nan=False)
    # modbus (edge_agent/modbus.py): the device over TCP (port: 502 unless set), its unit id,
    # the points polled every interval_s, and how many unused registers a read may span
    host: str | None = Field(default=None, min_length=1)
    unit_id: int = Field(default=1, ge=0, le=247)
    max_gap: int = Field(default=0, ge=0, le=100)
    points: list[modbus_spec.PointSpec] = Field(
        default_factory=list, max_length=modbus_spec.MAX_POINTS
    )

    @property
    def simulated(self) -> bool:
        """True for the modules driven by `simulator/` (they understand its commands)."""
        return self.kind in SIMULATED_KINDS

    @property
    def modbus_port(self) -> int:
        """The Modbus TCP port: `port` when the manifest sets it, else 502."""
        return self.port if "port" in self.model_fields_set else modbus_spec.DEFAULT_PORT

    @property
    def field(self) -> bool:
        """True for async modules on a real field bus (edge_agent/field.py)."""
        return self.kind in FIELD_KINDS


class WindowSpec(_Spec):
    """`window`: tumbling (size_s) or hopping (size_s every hop_s), over event time."""

    kind: Literal["tumbling", "hopping"]
    size_s: float = Field(gt=0, allow_inf_nan=False)
    hop_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @property
    def size_ms(self) -> int:
        """The window length in milliseconds."""
        return round(self.size_s * 1000)

    @property
    def hop_ms(self) -> int:
        """The distance between window starts in milliseconds (the size for tumbling)."""
        return self.size_ms if self.hop_s is None else round(self.hop_s * 1000)


class ConditionSpec(_Spec):
    """`condition`: `op` with `value`, or "between" with `low` and `high` (inclusive)."""

    op: Literal[">", "<", ">=", "<=", "between"]
    value: float | None = Field(default=None, allow_inf_nan=False)
    low: float | None = Field(default=None, allow_inf_nan=False)
    high: float | None = Field(default=None, allow_inf_nan=False)

    def holds(self, x: float) -> bool:
        """Whether an aggregate value `x` meets the condition."""
        if self.op == "between":
            return self.low is not None and self.high is not None and self.low <= x <= self.high
        v = self.value
        if v is None:
            return False
        return {">": x > v, "<": x < v, ">=": x >= v, "<=": x <= v}[self.op]

    def describe(self) -> str:
        """`> 70` or `between 10 and 20`, for messages."""
        if self.op == "between":
            return f"between {self.low:g} and {self.high:g}"
        return f"{self.op} {self.value:g}"


class EventSpec(_Spec):
    """`event`: what a firing sends upstream on the agent's `events` topic."""

    kind: Annotated[str, _id("event kind")]
    severity: Severity = Field(default=Severity.WARNING, strict=False)
    message: str | None = Field(default=None, min_length=1, max_length=MAX_DETAIL_LENGTH)


class CommandSpec(_Spec):
    """`command`: what a firing sends to the module a route names."""

    name: Annotated[str, _id("command name")]
    args: dict[str, Any] = Field(default_factory=dict)


class RuleSpec(_Spec):
    """`[[rules]]`: an aggregate of one metric over windows, a condition and its actions."""

    name: str = Field(pattern=NAME_PATTERN)
    metric: str = Field(pattern=f"^{METRIC_NAME_PATTERN}$")
    window: WindowSpec
    aggregate: Literal["avg", "min", "max", "count", "last"]
    condition: ConditionSpec
    for_windows: int = Field(default=1, ge=1, le=1000)
    lateness_s: float = Field(default=0.0, ge=0, le=86_400, allow_inf_nan=False)
    event: EventSpec | None = None
    command: CommandSpec | None = None

    @property
    def ref(self) -> str:
        """How routes name the rule: `rules/<name>`."""
        return RULE_PREFIX + self.name

    @property
    def lateness_ms(self) -> int:
        """How long after a window's end late readings still count, in milliseconds."""
        return round(self.lateness_s * 1000)


class Route(_Spec):
    """`[[routes]]`: from a module or `rules/<rule>` to `upstream`, a rule or a module."""

    name: str = Field(pattern=ROUTE_NAME_PATTERN)
    from_: str = Field(alias="from", min_length=1)  # `from` is a Python keyword
    to: str = Field(min_length=1)

    @property
    def from_rule(self) -> str | None:
        """The rule name when the route starts at `rules/<rule>`."""
        return self.from_.removeprefix(RULE_PREFIX) if _is_rule(self.from_) else None

    @property
    def to_rule(self) -> str | None:
        """The rule name when the route feeds `rules/<rule>`."""
        return self.to.removeprefix(RULE_PREFIX) if _is_rule(self.to) else None

    @property
    def to_upstream(self) -> bool:
        """True when the route goes to the cloud (telemetry, or a rule's event)."""
        return self.to == UPSTREAM

    @property
    def to_module(self) -> str | None:
        """The module name when the route sends a rule's command to a module."""
        return None if self.to_upstream or _is_rule(self.to) else self.to


def _is_rule(endpoint: str) -> bool:
    return endpoint.startswith(RULE_PREFIX)


class Manifest(_Spec):
    """A validated manifest; `source` is the file it came from."""

    agent: AgentSpec
    broker: BrokerSpec = Field(default_factory=BrokerSpec)
    outbox: OutboxSpec = Field(default_factory=OutboxSpec)
    modules: list[ModuleSpec] = Field(min_length=1)
    rules: list[RuleSpec] = Field(default_factory=list)
    routes: list[Route] = Field(min_length=1)
    _source: str = PrivateAttr(default="<manifest>")

    @property
    def source(self) -> str:
        """The file (or other origin) the manifest was read from, for messages."""
        return self._source

    def module(self, name: str) -> ModuleSpec:
        """The module called `name`; KeyError if there is none."""
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(f"no module {name!r} in {self._source}")

    def rule(self, name: str) -> RuleSpec:
        """The rule called `name` (without `rules/`); KeyError if there is none."""
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(f"no rule {name!r} in {self._source}")

    def routes_from(self, source: str) -> list[Route]:
        """The routes leaving `source`: a module name or `rules/<rule>`, in manifest order."""
        return [route for route in self.routes if route.from_ == source]

    def bundle_dir(self, home: Path) -> Path:
        """The agent's certificate bundle: `agent.bundle`, else HOME/pki/issued/<id>."""
        if self.agent.bundle is None:
            return home / "pki" / "issued" / self.agent.id
        return home / Path(self.agent.bundle).expanduser()

    def outbox_path(self, home: Path) -> Path:
        """The outbox file; a relative `outbox.path` is under HOME/edge/<agent id>/."""
        return home / "edge" / self.agent.id / Path(self.outbox.path).expanduser()


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a TOML manifest; ManifestError names the file and the bad key."""
    source = str(path)
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ManifestError(source, [("", "no such file (see edge_agent/examples/)")]) from None
    except OSError as exc:
        raise ManifestError(source, [("", f"cannot be read: {exc.strerror}")]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(source, [("", f"is not valid TOML: {exc}")]) from None
    return parse_manifest(data, source)


def parse_manifest(data: dict[str, Any], source: str) -> Manifest:
    """Validate parsed TOML; ManifestError lists every problem with its key path."""
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = [(_path(e["loc"]), _describe(e)) for e in exc.errors(include_url=False)]
        raise ManifestError(source, problems) from None
    problems = _Checker(manifest).run()
    if problems:
        raise ManifestError(source, problems)
    manifest._source = source
    return manifest


# --- pydantic's errors in manifest words ------------------------------------------------


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model that holds the keys at `loc` (to list what is allowed there)."""
    model: type[BaseModel] = Manifest
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        nested = _nested(fields[part].annotation) if part in fields else None
        if nested is None:
            return None
        model = nested
    return model


def _nested(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested(arg)
        if found is not None:
            return found
    return None


def _describe(error: Any) -> str:
    kind: str = error["type"]
    loc: tuple[int | str, ...] = tuple(error["loc"])
    got = error.get("input")
    ctx: dict[str, Any] = error.get("ctx") or {}
    if kind == "extra_forbidden":
        holder = _model_at(loc[:-1])
        allowed = [f.alias or n for n, f in holder.model_fields.items()] if holder else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key; {hint}allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return "is required"
    if kind == "list_type":
        return f"must be an array of tables ([[{loc[-1]}]] for each entry), not {got!r}"
    if kind in ("model_type", "dict_type"):
        return f"must be a table ({{ key = value, ... }}), not {got!r}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}, not {got!r}"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern"))
        return f"{got!r} is not allowed: {_PATTERN_WORDS.get(pattern, 'it must match ' + pattern)}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}
    bounds["less_than_equal"] = "<="
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind]} {limit:g}, not {got!r}"
    msg = str(error["msg"])
    return f"{msg[:1].lower()}{msg[1:]} (got {got!r})"


# --- cross-references --------------------------------------------------------------------


def _hint(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Checker:
    """What the models cannot see alone: names, references and window arithmetic."""

    def __init__(self, manifest: Manifest) -> None:
        self.m = manifest
        self.problems: list[tuple[str, str]] = []
        self.modules = self._unique("modules", [x.name for x in manifest.modules])
        self.rules = self._unique("rules", [x.name for x in manifest.rules])
        self._unique("routes", [x.name for x in manifest.routes])

    def add(self, path: str, text: str) -> None:
        self.problems.append((path, text))

    def run(self) -> list[tuple[str, str]]:
        for i, module in enumerate(self.m.modules):
            self._module(i, module)
        for i, rule in enumerate(self.m.rules):
            self._rule(i, rule)
        pairs: dict[tuple[str, str], int] = {}
        for i, route in enumerate(self.m.routes):
            first = pairs.setdefault((route.from_, route.to), i)
            if first != i:
                self.add(f"routes[{i}]", f"repeats routes[{first}] (same from and to); remove one")
            self._route(i, route)
        return self.problems

    def _unique(self, section: str, names: list[str]) -> dict[str, int]:
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in seen:
                self.add(
                    f"{section}[{i}].name",
                    f"{name!r} is already the name of {section}[{seen[name]}]; names are unique",
                )
            else:
                seen[name] = i
        return seen

    def _module(self, i: int, module: ModuleSpec) -> None:
        allowed = _KIND_KEYS[module.kind]
        for key in sorted(module.model_fields_set - {"name", "kind"} - set(allowed)):
            self.add(
                f"modules[{i}].{key}",
                f"does not apply to kind {module.kind!r} (its keys: {', '.join(allowed)})",
            )
        if module.name == UPSTREAM:
            self.add(f"modules[{i}].name", "'upstream' is reserved for the cloud; rename it")
        if not any(module.name in (r.from_, r.to) for r in self.m.routes):
            self.add(
                f"modules[{i}]",
                f"module {module.name!r} is in no route; add one from {module.name!r} to "
                "'upstream' or to 'rules/<rule>'",
            )
        if module.kind == "opcua":
            self._opcua(f"modules[{i}]", module)
        if module.kind == "modbus":
            if module.host is None:
                self.add(f"modules[{i}].host", "is required for kind 'modbus': the device address")
            for key, text in modbus_spec.point_problems(module.name, module.points):
                self.add(f"modules[{i}].{key}", text)

    def _opcua(self, at: str, module: ModuleSpec) -> None:
        """An OPC UA module: its endpoint, security and trust, nodes and their metric names."""
        if module.url is None:
            self.add(f"{at}.url", "is required for kind 'opcua': url = 'opc.tcp://<host>:<port>'")
        elif (problem := opcua_spec.url_problem(module.url)) is not None:
            self.add(f"{at}.url", problem)
        if module.security_mode != "None" and module.server_trust is None:
            self.add(
                f"{at}.server_trust",
                f"security_mode {module.security_mode!r} needs the server's certificate: "
                "server_trust = '<file.der|.pem>' or a directory of trusted certificates",
            )
        if module.security_mode == "None" and module.server_trust is not None:
            self.add(
                f"{at}.server_trust", "applies only with security_mode 'Sign' or 'SignAndEncrypt'"
            )
        if not module.nodes:
            self.add(
                f"{at}.nodes", "is required: nodes = [{ node = 'ns=2;s=Temp', metric = 'temp' }]"
            )
        first: dict[str, int] = {}
        for j, node in enumerate(module.nodes):
            if (problem := opcua_spec.node_problem(node)) is not None:
                self.add(f"{at}.nodes[{j}]", problem)
            seen = first.setdefault(node.metric, j)
            if seen != j:
                self.add(
                    f"{at}.nodes[{j}].metric",
                    f"{node.metric!r} is already the metric of nodes[{seen}]; "
                    "metric names are unique",
                )
        polling = ("interval_s",)
        subscribing = ("publishing_interval_s", "sampling_interval_s")
        for key in subscribing if module.mode == "poll" else polling:
            if key in module.model_fields_set:
                self.add(f"{at}.{key}", f"does not apply to mode {module.mode!r}")

    def _rule(self, i: int, rule: RuleSpec) -> None:
        at, window = f"rules[{i}]", rule.window
        if window.size_ms < 1:
            self.add(f"{at}.window.size_s", f"{window.size_s} is below one millisecond (0.001)")
        if window.kind == "tumbling" and window.hop_s is not None:
            self.add(f"{at}.window.hop_s", "applies only to kind = 'hopping'; remove it")
        if window.kind == "hopping" and window.hop_s is None:
            self.add(f"{at}.window.hop_s", "a hopping window needs hop_s (seconds between starts)")
        elif window.kind == "hopping" and window.hop_ms < 1:
            self.add(f"{at}.window.hop_s", f"{window.hop_s} is below one millisecond (0.001)")
        elif window.kind == "hopping" and window.hop_ms > window.size_ms:
            self.add(
                f"{at}.window.hop_s",
                f"{window.hop_s:g} s is more than size_s ({window.size_s:g} s), so readings "
                "between windows would be lost; use hop_s <= size_s",
            )
        elif window.size_ms >= 1 and math.ceil(window.size_ms / window.hop_ms) > (
            MAX_WINDOWS_PER_READING
        ):
            self.add(
                f"{at}.window.hop_s",
                f"every reading would fall in more than {MAX_WINDOWS_PER_READING} windows; "
                "use a larger hop_s",
            )
        cond = rule.condition
        if cond.op == "between":
            if cond.value is not None:
                self.add(f"{at}.condition.value", "'between' takes low and high, not value")
            if cond.low is None or cond.high is None:
                self.add(f"{at}.condition", "'between' needs low and high (both inclusive)")
            elif cond.low > cond.high:
                self.add(f"{at}.condition.low", f"{cond.low:g} is above high ({cond.high:g})")
        else:
            if cond.value is None:
                self.add(f"{at}.condition.value", f"op {cond.op!r} needs a value")
            for key in ("low", "high"):
                if getattr(cond, key) is not None:
                    self.add(f"{at}.condition.{key}", "only op = 'between' takes low and high")
        if rule.event is None and rule.command is None:
            self.add(at, "has neither event nor command, so its firings would do nothing")
        if rule.command is not None:
            try:
                Command.new(rule.command.name, rule.command.args)
            except ValidationError as exc:
                err = exc.errors(include_url=False)[0]
                self.add(f"{at}.command.{_path(tuple(err['loc']))}", _describe(err))
        inputs = [r for r in self.m.routes if r.to == rule.ref and not _is_rule(r.from_)]
        if not inputs:
            self.add(at, f"gets no readings; add a route from a module to {rule.ref!r}")
        if not self.m.routes_from(rule.ref):
            self.add(
                at,
                f"its firings go nowhere; add a route from {rule.ref!r} to 'upstream' (its "
                "event) or to a module (its command)",
            )

    def _route(self, i: int, route: Route) -> None:
        at = f"routes[{i}]"
        refs = [RULE_PREFIX + name for name in self.rules]
        rule = self._known_rule(f"{at}.from", route.from_rule)
        if route.from_ == UPSTREAM:
            self.add(f"{at}.from", "'upstream' is no source: cloud commands reach modules directly")
        elif route.from_rule is None and route.from_ not in self.modules:
            hint = _hint(route.from_, [*self.modules, *refs])
            self.add(
                f"{at}.from",
                f"{route.from_!r} is neither a module nor a rule{hint}; "
                f"use a module name ({', '.join(self.modules)}) or 'rules/<rule>'",
            )
        if route.to_upstream:
            if rule is not None and rule.event is None:
                self.add(
                    f"{at}.to",
                    f"rule {rule.name!r} has no event to send upstream; add event = "
                    f"{{ kind = ... }} to rules[{self.rules[rule.name]}]",
                )
        elif route.to_rule is not None:
            self._known_rule(f"{at}.to", route.to_rule)
            if route.from_rule is not None:
                self.add(f"{at}.to", "a rule cannot feed another rule; route a module to it")
        elif route.to not in self.modules:
            self.add(
                f"{at}.to",
                f"route to nowhere: {route.to!r}{_hint(route.to, [*self.modules, *refs])} "
                "is not 'upstream', 'rules/<rule>' or a module "
                f"({', '.join(self.modules) or 'none defined'})",
            )
        elif route.from_rule is None:
            self.add(
                f"{at}.to",
                f"a module's telemetry cannot go to module {route.to!r}; route it to "
                "'upstream' or 'rules/<rule>' (only a rule sends a module its command)",
            )
        elif rule is not None:
            self._command_for(rule, self.m.modules[self.modules[route.to]], at)

    def _known_rule(self, path: str, name: str | None) -> RuleSpec | None:
        if name is None:
            return None
        if name not in self.rules:
            refs = [RULE_PREFIX + rule for rule in self.rules]
            self.add(
                path,
                f"unknown rule {name!r}{_hint(RULE_PREFIX + name, refs)}; "
                f"rules: {', '.join(refs) or 'none defined'}",
            )
            return None
        return self.m.rules[self.rules[name]]

    def _command_for(self, rule: RuleSpec, module: ModuleSpec, at: str) -> None:
        """A route from a rule to a module: the rule needs a command the module understands."""
        if rule.command is None:
            self.add(
                f"{at}.to",
                f"rule {rule.name!r} has no command to send to module {module.name!r}; add "
                f"command = {{ name = ... }} to rules[{self.rules[rule.name]}]",
            )
        elif module.simulated:
            # the simulator's command table (light: no models); imported only for sim kinds
            from simulator.commands import parse_args

            try:
                parse_args(rule.command.name, rule.command.args)
            except CommandError as exc:
                self.add(f"rules[{self.rules[rule.name]}].command", f"for {module.name!r}: {exc}")
        elif module.kind == "opcua":
            try:
                opcua_spec.parse_command(rule.command.name, rule.command.args)
            except ValueError as exc:
                self.add(f"rules[{self.rules[rule.name]}].command", f"for {module.name!r}: {exc}")
        elif module.kind == "modbus":
            points = {p.metric: p.layout for p in module.points}
            try:
                parse_write(rule.command.name, dict(rule.command.args), points)
            except WriteArgsError as exc:
                self.add(f"rules[{self.rules[rule.name]}].command", f"for {module.name!r}: {exc}")
