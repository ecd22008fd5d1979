"""CPython stand-ins for what the Pico W firmware imports and CPython lacks, and a loader for it.

`lib/` is put on `sys.path` by the firmware tests only (the board's `/lib`, where `mpremote mip`
installs umqtt): `machine`, `network`, `ntptime`, `utime` and `umqtt/simple.py`. `mpssl` is
MicroPython's `ssl` API on CPython's ssl; the tests set it as the firmware module's `ssl`.

Faked: the hardware only. The ADC returns the counts of a 12-bit converter reading the
thermistor divider at a scripted temperature (`board.Board`), `machine.reset()` is recorded,
Wi-Fi "joins" when the SSID and password match the board's access point, NTP leaves the
(already correct) host clock alone, the watchdog records starvation instead of resetting.
Real: the MQTT client speaks MQTT 3.1.1 over a real TCP socket with real TLS (client
certificate from the DER bundle, CA verification, the broker's name checked) to the real
broker, byte for byte what umqtt.simple sends; the firmware file runs unchanged.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["FIRMWARE", "SHIM_LIB", "load_firmware", "unload_shims"]

SHIM_LIB = Path(__file__).resolve().parent / "lib"
FIRMWARE = Path(__file__).resolve().parents[2] / "simulator" / "firmware" / "pico_w" / "main.py"


def load_firmware() -> ModuleType:
    """A fresh module object of main.py (a reboot starts with fresh module state).

    `SHIM_LIB` must be on sys.path first (main.py imports `utime` under CPython). Not put in
    sys.modules: nothing imports it by name."""
    spec = importlib.util.spec_from_file_location("pico_w_main", FIRMWARE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unload_shims() -> None:
    """Forget the shim modules imported from SHIM_LIB, so nothing else ever sees them."""
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if origin is not None and Path(origin).resolve().is_relative_to(SHIM_LIB):
            del sys.modules[name]
