"""What a `modbus` module's manifest entry may say; pure, no pymodbus import.

A point is one metric at an address of one of the device's four tables: `holding` and
`input` registers (16 bit; `type` int16/uint16/int32/uint32/float32/float64 with
`byte_order` and `word_order`, then `scale` and `offset`), `coil` and `discrete` inputs
(one bit, a boolean). Commands: `write-coil` and `write-register` (edge_agent/registers.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.registers import BIT_TABLES, MAX_ADDRESS, WIDTH, Layout, Order, RegisterType
from schemas.limits import MAX_UNIT_LENGTH, METRIC_NAME_PATTERN

DEFAULT_PORT = 502  # Modbus TCP's registered port
MAX_POINTS = 10_000
# a metric travels upstream as `<module>.<metric>`, which must itself be a metric name
MAX_QUALIFIED_METRIC = 64
_REGISTER_ONLY = ("type", "byte_order", "word_order", "scale", "offset")


class PointSpec(BaseModel):
    """`points = [{ metric, table, address, type, ... }]`: one Modbus value -> one metric."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    metric: str = Field(pattern=f"^{METRIC_NAME_PATTERN}$")
    table: Literal["holding", "input", "coil", "discrete"]
    address: int = Field(ge=0, le=MAX_ADDRESS)
    type: RegisterType = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = Field(default=1.0, allow_inf_nan=False)
    offset: float = Field(default=0.0, allow_inf_nan=False)
    unit: str | None = Field(default=None, min_length=1, max_length=MAX_UNIT_LENGTH)
    # how storage keeps it; a bit is a bool unless asked for 0/1 numbers
    kind: Literal["numeric", "bool"] | None = None

    @property
    def bit(self) -> bool:
        """True for coils and discrete inputs."""
        return self.table in BIT_TABLES

    @property
    def layout(self) -> Layout:
        """Where the point lives and how to decode it (edge_agent/registers.py)."""
        if self.bit:
            return Layout(self.table, self.address)
        return Layout(
            self.table, self.address, self.type, self.byte_order, self.word_order,
            self.scale, self.offset,
        )  # fmt: skip

    @property
    def storage_kind(self) -> Literal["numeric", "bool"]:
        """`bool` or `numeric`: the kind given, else bool for bits and numeric for registers."""
        if self.kind is not None:
            return self.kind
        return "bool" if self.bit else "numeric"


def point_problems(module: str, points: Sequence[PointSpec]) -> list[tuple[str, str]]:
    """Every problem of a module's points as (key under the module, one-line text)."""
    problems: list[tuple[str, str]] = []
    if not points:
        problems.append((
            "points",
            "is required for kind 'modbus': points = [{ metric = 'temp', table = 'holding', "
            "address = 0, type = 'float32' }]",
        ))  # fmt: skip
    first: dict[str, int] = {}
    for j, point in enumerate(points):
        at = f"points[{j}]"
        seen = first.setdefault(point.metric, j)
        if seen != j:
            problems.append((
                f"{at}.metric",
                f"{point.metric!r} is already the metric of points[{seen}]; metrics are unique",
            ))  # fmt: skip
        qualified = f"{module}.{point.metric}"
        if len(qualified) > MAX_QUALIFIED_METRIC:
            problems.append((
                f"{at}.metric",
                f"upstream it is {qualified!r}, longer than {MAX_QUALIFIED_METRIC} characters; "
                "shorten the metric or the module name",
            ))  # fmt: skip
        if point.bit:
            for key in _REGISTER_ONLY:
                if key in point.model_fields_set:
                    shown = f" {getattr(point, key)!r}" if key == "type" else ""
                    problems.append((
                        f"{at}.{key}",
                        f"a {point.table} is one bit (a boolean): {key}{shown} does not apply; "
                        "use table = 'holding' or 'input' for a typed register",
                    ))  # fmt: skip
            continue
        width = WIDTH[point.type]
        if width == 1 and "word_order" in point.model_fields_set:
            problems.append((
                f"{at}.word_order",
                f"{point.type} is one register: word_order applies to 32- and 64-bit types",
            ))  # fmt: skip
        if point.address + width - 1 > MAX_ADDRESS:
            problems.append((
                f"{at}.address",
                f"{point.type} takes {width} registers: "
                f"{point.address}..{point.address + width - 1} runs past {MAX_ADDRESS}",
            ))  # fmt: skip
        if point.scale == 0:
            problems.append((f"{at}.scale", "must not be 0 (every value would read as the offset)"))
    return problems
