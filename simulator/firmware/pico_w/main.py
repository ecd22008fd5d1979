"""fieldline field firmware for a Raspberry Pi Pico W (MicroPython >= 1.23, umqtt.simple >= 1.4).

Hardware: a 10 kOhm resistor from 3V3 to GP26 (ADC0) and a 10 kOhm NTC thermistor (B = 3950)
from GP26 to GND.  Flash holds this file as `main.py`, `config.json` (Wi-Fi, broker, tenant
and device; see config.example.json; it holds secrets, never commit it), the device's DER
bundle from `fieldline certs issue` (`cert.der`, `key.der`, `ca.der`), `lib/umqtt/simple.py`
(`mpremote mip install umqtt.simple`) and the boot counter this program keeps.

At boot: read the config and bundle and check that the certificate names this device; count
the boot; join Wi-Fi; set the clock with NTP (TLS checks certificate validity dates, and
payloads carry epoch-ms timestamps); open TLS with the client certificate, CERT_REQUIRED and
the broker's name; connect with client id = certificate CN, a persistent session and a
retained Last Will `{"state": "offline"}` on its status topic; publish the retained birth
`{"state": "online", "ts", "boot", "fw"}`; subscribe to its own `cmd/#`.  Then every
interval: read the thermistor and publish telemetry (QoS 1), or a fault report instead of a
temperature when the sensor is open or shorted; answer commands on `cmd-res`; ping the broker
itself (umqtt.simple never does); after any network error close the socket and reconnect with
exponential backoff.

The logic is in `Device` (and `Link`, `Thermistor`, `Clock`), which take the hardware and the
MQTT client as objects; `main()` wires the real ones.  tests/integration/test_pico_firmware.py
runs this file unchanged under CPython against real brokers, with tests/firmware_shims in
place of `machine`, `network`, `ntptime`, `umqtt.simple` and the `ssl` module's MicroPython API.

MicroPython subset only: no dataclasses, typing, enum or contextlib; timestamps are integers
(rp2 floats are single precision); tick arithmetic through ticks_add/ticks_diff (they wrap).
"""

import gc
import math
import os
import ssl
import time

try:
    import json
except ImportError:  # MicroPython builds that only have the u-prefixed name
    import ujson as json

try:
    from time import sleep_ms, ticks_add, ticks_diff, ticks_ms
except ImportError:  # CPython running the tests: tests/firmware_shims/lib/utime.py
    from utime import sleep_ms, ticks_add, ticks_diff, ticks_ms

FW_VERSION = "1.0.0"

# --- the thermistor divider -------------------------------------------------------------
R_FIXED = 10000.0  # ohm, 3V3 to GP26
R_NTC_25 = 10000.0  # ohm at 25 C
BETA = 3950.0  # K
T25_K = 298.15
KELVIN = 273.15
U16_FULL = 65535  # read_u16() full scale: the 12-bit reading scaled as raw << 4 | raw >> 8
# Fault thresholds on read_u16(): an open NTC pulls GP26 to 3V3 (65535), a shorted one to GND
# (0).  The limits are about -54 C and +197 C, far outside a 10k NTC's rated -40..125 C.
OPEN_AT = 65000
SHORT_AT = 512

MIN_INTERVAL_S = 0.5
MAX_INTERVAL_S = 86400
POLL_MS = 50  # how often the loop looks for commands
RESYNC_MS = 24 * 3600 * 1000  # NTP again after this long (at the next reconnect)
KNOWN_COMMANDS = ("reset", "set-interval")
# Replays: a command delivered retained, or whose id is among the last RECENT_IDS answered,
# is refused ("rejected"); one without ts, with ts more than MAX_CLOCK_SKEW_S ahead, or past
# ts + ttl_s (DEFAULT_TTL_S when absent) likewise ("rejected", "expired").  The ring is in RAM:
# a boot empties it, and from then on the ttl bounds what could run again.
RECENT_IDS = 32  # ~2 KB of id strings
DEFAULT_TTL_S = 60  # `fieldline cmd send`'s default
MAX_CLOCK_SKEW_S = 60
CLOCK_SET_MS = 1704067200000  # 2024-01-01: a clock reading earlier was never set
MAX_INBOX = 16  # commands waiting to run; past that only their ids, to answer "rejected"
MAX_OVERFLOW = 32

# time.time() counts from 1970 on rp2 (MICROPY_EPOCH_IS_1970) and on the unix port, but from
# 2000-01-01 on some other embedded ports; the MicroPython docs say to tell them apart by
# gmtime(0)[0].  docs/design.md wants epoch milliseconds since 1970: add this offset.
SECONDS_1970_TO_2000 = 946684800
EPOCH_OFFSET_S = SECONDS_1970_TO_2000 if time.gmtime(0)[0] == 2000 else 0

CONFIG_DEFAULTS = {
    "wifi_ssid": None,
    "wifi_password": None,
    "wifi_country": "",  # e.g. "DE": the regulatory domain, if your region needs it
    "broker_host": None,  # must be a name (or IP) in the broker's certificate
    "broker_port": 8883,
    "tenant": None,
    "device": None,  # must equal the certificate's CN
    "cert": "cert.der",
    "key": "key.der",
    "ca": "ca.der",
    "keepalive_s": 60,
    "interval_s": 10,
    "ntp_host": "pool.ntp.org",
    "adc_pin": 26,
    "adc_samples": 8,  # read_u16() calls averaged per reading
    "boot_file": "boot_count.txt",
    "backoff_min_s": 1,
    "backoff_max_s": 60,
    "io_timeout_s": 15,  # TCP connect, TLS handshake and CONNACK (umqtt.simple >= 1.5)
    "wifi_timeout_s": 20,
    "watchdog_ms": 0,  # 0: off; at most 8388 on rp2, and once started it cannot be stopped
}
REQUIRED = ("wifi_ssid", "wifi_password", "broker_host", "tenant", "device")
ID_RULE = "(1-64 of a-z 0-9 _ - starting with a letter or digit)"


def log_print(message):
    print("[fieldline]", message)


# --- conversions (pure, unit tested) ------------------------------------------------------
def counts_to_celsius(u):
    """Degrees Celsius from a read_u16() count of the divider (Beta equation)."""
    r = R_FIXED * u / (U16_FULL - u)
    inv_t = 1.0 / T25_K + math.log(r / R_NTC_25) / BETA
    return 1.0 / inv_t - KELVIN


def thermistor_fault(u):
    """'open', 'short' or None for a read_u16() count."""
    if u >= OPEN_AT:
        return "open"
    if u <= SHORT_AT:
        return "short"
    return None


def valid_id(value):
    """A tenant or device id of the topic grammar: [a-z0-9][a-z0-9_-]{0,63}."""
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return False
    return all(
        "a" <= c <= "z" or "0" <= c <= "9" or (i > 0 and c in "_-") for i, c in enumerate(value)
    )


def is_uuid(value):
    if not isinstance(value, str) or len(value) != 36:
        return False
    for i, c in enumerate(value):
        if i in (8, 13, 18, 23):
            if c != "-":
                return False
        elif c not in "0123456789abcdefABCDEF":
            return False
    return True


def days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (integer arithmetic)."""
    if month <= 2:
        year -= 1
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def rfc3339_ms(text):
    """Epoch ms of 'YYYY-MM-DDTHH:MM:SS[.fff](Z|+HH:MM|-HH:MM)', or None."""
    if len(text) < 20 or text[4] != "-" or text[7] != "-" or text[10] not in "Tt ":
        return None
    if text[13] != ":" or text[16] != ":":
        return None
    try:
        year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
        hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
        rest = text[19:]
        ms = 0
        if rest[:1] == ".":
            digits = 1
            while digits < len(rest) and "0" <= rest[digits] <= "9":
                digits += 1
            if digits == 1:
                return None
            ms = int((rest[1:digits] + "00")[:3])
            rest = rest[digits:]
        if rest in ("Z", "z"):
            offset = 0
        elif len(rest) == 6 and rest[0] in "+-" and rest[3] == ":":
            offset = int(rest[1:3]) * 60 + int(rest[4:6])
            if rest[0] == "-":
                offset = -offset
        else:
            return None
    except ValueError:
        return None
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        return None
    seconds = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    return (seconds - offset * 60) * 1000 + ms


def command_id_of(msg):
    """The UUID `id` of a command payload, or None."""
    try:
        command_id = json.loads(bytes(msg).decode()).get("id")
    except (ValueError, AttributeError):  # bad UTF-8 or JSON, or not an object
        return None
    return command_id if is_uuid(command_id) else None


def timestamp_ms(value):
    """Epoch ms of a payload `ts` (epoch ms number or RFC 3339 string), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):  # NaN and infinities fail the comparison
        # (single precision on rp2: epoch ms as a float is off by minutes; send integers)
        return int(value) if -1e15 < value < 1e15 else None
    if isinstance(value, str):
        return rfc3339_ms(value)
    return None


def _der_item(buf, pos):
    """(tag, start of the value, end of the value) of the DER item at pos."""
    tag = buf[pos]
    length = buf[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(buf[pos : pos + count], "big")
        pos += count
    return tag, pos, pos + length


_NAME_OIDS = {b"\x55\x04\x03": "CN", b"\x55\x04\x0a": "O", b"\x55\x04\x0b": "OU"}


def cert_subject(der):
    """{'CN': ..., 'O': ..., 'OU': ...} of a DER X.509 certificate's subject."""
    _tag, pos, _end = _der_item(der, 0)  # Certificate
    _tag, pos, _end = _der_item(der, pos)  # TBSCertificate
    tag, _start, end = _der_item(der, pos)
    if tag == 0xA0:  # [0] version
        pos = end
    for _skip in range(4):  # serial, signature algorithm, issuer, validity
        _tag, _start, pos = _der_item(der, pos)
    tag, pos, end = _der_item(der, pos)
    if tag != 0x30:
        raise ValueError("not a DER certificate")
    found = {}
    while pos < end:  # SET { SEQUENCE { OID, value } }
        _tag, rdn, pos = _der_item(der, pos)
        _tag, inner, _stop = _der_item(der, rdn)
        _tag, oid_start, oid_end = _der_item(der, inner)
        _tag, value_start, value_end = _der_item(der, oid_end)
        name = _NAME_OIDS.get(bytes(der[oid_start:oid_end]))
        if name:
            found[name] = bytes(der[value_start:value_end]).decode()
    return found


# --- configuration and flash ------------------------------------------------------------
def load_config(path):
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(path + ": the config must be a JSON object")
    unknown = ", ".join(k for k in raw if k not in CONFIG_DEFAULTS)
    if unknown:
        known = ", ".join(sorted(CONFIG_DEFAULTS))
        raise ValueError(f"{path}: unknown setting(s) {unknown} (known: {known})")
    cfg = {}
    for key, default in CONFIG_DEFAULTS.items():
        cfg[key] = raw.get(key, default)
    missing = ", ".join(k for k in REQUIRED if cfg[k] in (None, ""))
    if missing:
        raise ValueError(f"{path}: {missing} must be set")
    for key in ("tenant", "device"):
        value = cfg[key]
        if not valid_id(value):
            raise ValueError(path + ": " + key + " " + repr(value) + " is not an id " + ID_RULE)
    interval = cfg["interval_s"]
    if not _number(interval) or not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:
        raise ValueError(f"{path}: interval_s must be {MIN_INTERVAL_S} to {MAX_INTERVAL_S}")
    if not _number(cfg["keepalive_s"]) or not 1 <= cfg["keepalive_s"] <= 65535:
        raise ValueError(path + ": keepalive_s must be 1 to 65535 (seconds)")
    cfg["keepalive_s"] = int(cfg["keepalive_s"])
    low, high = cfg["backoff_min_s"], cfg["backoff_max_s"]
    if not _number(low) or not _number(high) or not 0 < low <= high:
        raise ValueError(path + ": need 0 < backoff_min_s <= backoff_max_s")
    if not _number(cfg["watchdog_ms"]) or not 0 <= cfg["watchdog_ms"] <= 8388:
        raise ValueError(path + ": watchdog_ms must be 0 (off) to 8388")
    for key in ("broker_port", "adc_pin", "adc_samples", "io_timeout_s", "wifi_timeout_s"):
        if not _number(cfg[key]) or cfg[key] <= 0:
            raise ValueError(path + ": " + key + " must be a positive number")
    return cfg


def _number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float))


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def check_identity(cert_der, cfg):
    """The certificate must name this device: the broker takes the identity from it."""
    subject = cert_subject(cert_der)
    path, device, tenant = cfg["cert"], cfg["device"], cfg["tenant"]
    want = {"CN": device, "O": tenant, "OU": "device"}
    for field, value in want.items():
        found = subject.get(field)
        if found != value:
            # No adjacent f-strings: MicroPython 1.23 cannot concatenate them.
            fix = f"copy the bundle of `fieldline certs issue {device} --tenant {tenant}`"
            raise ValueError(f"{path}: certificate {field} is {found!r}, not {value!r}: " + fix)


def next_boot(path, log):
    """Count this boot in a small file on flash (written to a temp file, then renamed)."""
    count = 0
    try:
        with open(path) as f:
            count = int(f.read().strip())
    except (OSError, ValueError) as exc:
        log(f"boot counter {path} unreadable ({exc!r}): counting from 1")
    count += 1
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(count))
    os.rename(tmp, path)
    return count


def tls_context(cert_der, key_der, ca_der):
    """Client certificate, the fieldline CA, and verification on (MicroPython's default is
    CERT_NONE).  The broker's name is checked against its certificate because umqtt.simple
    passes server_hostname=<broker_host> to wrap_socket."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(cert_der, key_der)
    context.load_verify_locations(cadata=ca_der)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def open_session(client, timeout_s):
    """CONNECT with a persistent session (QoS 1 commands sent while offline wait at the
    broker and are answered, or expired, on reconnect)."""
    try:
        return client.connect(clean_session=False, timeout=timeout_s)  # umqtt.simple >= 1.5
    except TypeError:  # umqtt.simple 1.4: no timeout argument
        return client.connect(clean_session=False)


def close_socket(client, log):
    """Drop a failed connection without DISCONNECT, which would cancel the Will."""
    sock = getattr(client, "sock", None) if client is not None else None
    if sock is not None:
        try:
            sock.close()
        except OSError as exc:
            log(f"closing the socket: {exc!r}")


# --- hardware wrappers ------------------------------------------------------------------
class Clock:
    """Wall clock (epoch ms since 1970, from the NTP-set RTC) and the wrapping tick counter."""

    def epoch_ms(self):
        try:
            ns = time.time_ns()
        except AttributeError:  # ports without time_ns: whole seconds
            return (int(time.time()) + EPOCH_OFFSET_S) * 1000
        return ns // 1000000 + EPOCH_OFFSET_S * 1000

    def year(self):
        return time.gmtime()[0]

    def ticks(self):
        return ticks_ms()

    def sleep_ms(self, ms):
        sleep_ms(ms)


class Thermistor:
    """The NTC divider on an ADC: (counts, degrees C or None, fault or None)."""

    def __init__(self, adc, samples=8):
        self.adc = adc
        self.samples = max(1, int(samples))

    def read(self):
        total = 0
        for _ in range(self.samples):
            total += self.adc.read_u16()
        u = (total + self.samples // 2) // self.samples
        fault = thermistor_fault(u)
        if fault is not None:
            return u, None, fault
        return u, round(counts_to_celsius(u), 2), None


class Link:
    """Wi-Fi, then the wall clock: both must be up before TLS."""

    def __init__(self, wlan, ntptime, cfg, clock, log, feed):
        self.wlan = wlan
        self.ntptime = ntptime
        self.cfg = cfg
        self.clock = clock
        self.log = log
        self.feed = feed
        self.synced_at = None  # epoch ms of the last NTP sync

    def up(self):
        if not self.wlan.isconnected():
            self.join()
        now = self.clock.epoch_ms()
        if self.synced_at is None or not 0 <= now - self.synced_at < RESYNC_MS:
            self.sync()

    def join(self):
        self.wlan.active(True)
        self.wlan.connect(self.cfg["wifi_ssid"], self.cfg["wifi_password"])
        start = self.clock.ticks()
        while not self.wlan.isconnected():
            if ticks_diff(self.clock.ticks(), start) > self.cfg["wifi_timeout_s"] * 1000:
                status = self.wlan.status()
                self.wlan.disconnect()
                ssid = self.cfg["wifi_ssid"]
                raise OSError(f"Wi-Fi {ssid!r} not joined (status {status})")
            self.feed()
            self.clock.sleep_ms(200)
        self.log(f"Wi-Fi up: {self.wlan.ifconfig()[0]}")

    def sync(self):
        try:
            self.ntptime.settime()
        except Exception as exc:
            if self.synced_at is None:
                raise  # never set: certificates cannot be checked, timestamps would be wrong
            self.log(f"NTP failed ({exc!r}): keeping the running clock")
            return
        if self.clock.year() < 2024:
            raise OSError("NTP gave a date before 2024")
        self.synced_at = self.clock.epoch_ms()
        self.log(f"clock set by NTP: {self.synced_at} ms since 1970")


# --- the device -------------------------------------------------------------------------
class Device:
    """Topics, payloads, commands and the connection loop of one device."""

    def __init__(self, cfg, clock, sensor, boot, log=log_print, watchdog=None):
        self.cfg = cfg
        self.clock = clock
        self.sensor = sensor
        self.boot = boot
        self.log = log
        self.watchdog = watchdog
        base = "fl/" + cfg["tenant"] + "/" + cfg["device"] + "/"
        self.topic_telemetry = (base + "telemetry").encode()
        self.topic_status = (base + "status").encode()
        self.topic_events = (base + "events").encode()
        self.topic_result = (base + "cmd-res").encode()
        self.command_prefix = (base + "cmd/").encode()
        self.command_filter = (base + "cmd/#").encode()
        self.interval_ms = int(cfg["interval_s"] * 1000)
        self.keepalive_ms = cfg["keepalive_s"] * 1000
        self.seq = 0
        self.fault = None
        self.inbox = []  # [topic, msg, retained]
        self.overflow = []
        self.arrived = None  # the inbox entry of the PUBLISH being received
        self.recent_ids = [None] * RECENT_IDS  # a ring of the ids answered lately
        self.recent_status = [None] * RECENT_IDS  # and how each was answered
        self.recent_next = 0
        self.reset_requested = False
        self.rescheduled = False
        self.online = False
        self.last_out = 0
        self.last_sample = None

    # payloads
    def status(self, state):
        return {"state": state, "ts": self.clock.epoch_ms(), "boot": self.boot, "fw": FW_VERSION}

    def will(self):
        # No ts: the broker sends it at some unknown later time; the receiver stamps it.
        return {"state": "offline", "boot": self.boot, "fw": FW_VERSION}

    def sample(self):
        """(telemetry, event or None): one reading; an event when the fault state changes."""
        u, celsius, fault = self.sensor.read()
        now = self.clock.epoch_ms()
        self.seq += 1
        metrics = {"adc_raw": u}
        if fault is None:
            metrics["temperature"] = {"v": celsius, "u": "degC"}
        else:
            metrics["thermistor_fault"] = fault
        telemetry = {"ts": now, "seq": self.seq, "boot": self.boot, "metrics": metrics}
        event = None
        if fault is not None and fault != self.fault:
            wiring = "open circuit" if fault == "open" else "short circuit"
            event = {
                "ts": now,
                "kind": "sensor-fault",
                "severity": "error",
                "message": f"thermistor {wiring} (ADC {u} of {U16_FULL}): check the wiring",
                "data": {"sensor": "thermistor", "fault": fault, "adc_raw": u},
            }
        elif fault is None and self.fault is not None:
            event = {
                "ts": now,
                "kind": "sensor-ok",
                "severity": "info",
                "message": f"thermistor reads again ({celsius} degC; was {self.fault})",
                "data": {"sensor": "thermistor", "adc_raw": u},
            }
        return telemetry, event

    # commands
    def on_message(self, topic, msg):
        """umqtt.simple's callback.  It runs inside check_msg() and inside publish() while
        that waits for its PUBACK, so it only queues: publishing from here would swallow
        the outer publish's PUBACK.  umqtt.simple acknowledges the message when this
        returns, so a command that does not fit is remembered by id and answered
        `rejected` rather than lost without a word."""
        self.arrived = None
        if len(self.inbox) < MAX_INBOX:
            self.arrived = [bytes(topic), bytes(msg), False]
            self.inbox.append(self.arrived)
            return
        command_id = command_id_of(msg)
        if command_id is not None and len(self.overflow) < MAX_OVERFLOW:
            self.overflow.append(command_id)
        else:
            self.log(f"command inbox full: dropped a message on {topic!r}")

    def delivered(self, op):
        """After umqtt.simple's wait_msg() returned the packet type `op`: the callback gets
        (topic, msg) only, so the retain bit of the PUBLISH it just handled is read here."""
        if op is not None and op & 0xF1 == 0x31 and self.arrived is not None:
            self.arrived[2] = True
        self.arrived = None

    def refuse_pending(self, client, detail):
        """Answer every command still waiting (the overflow too) with `rejected`."""
        waiting = [command_id_of(entry[1]) for entry in self.inbox] + self.overflow
        self.inbox, self.overflow = [], []
        self.log(f"refusing {len(waiting)} command(s): {detail}")
        for command_id in waiting:
            if command_id is not None:
                result = {"id": command_id, "status": "rejected", "detail": detail}
                result["ts"] = self.clock.epoch_ms()
                self.publish(client, self.topic_result, result)

    def seen(self, command_id):
        """How the command of this id was answered, if it is among the last RECENT_IDS."""
        for i in range(RECENT_IDS):
            if self.recent_ids[i] == command_id:
                return self.recent_status[i]
        return None

    def remember(self, command_id, status):
        i = self.recent_next
        self.recent_ids[i], self.recent_status[i] = command_id, status
        self.recent_next = (i + 1) % RECENT_IDS

    def command(self, topic, msg, retained=False):
        """(result or None, event or None) for one message on cmd/{name}; `retained`: the
        retain flag it was delivered with."""
        prefix = self.command_prefix
        name = topic[len(prefix) :].decode() if topic.startswith(prefix) else ""
        try:
            body = json.loads(bytes(msg).decode())
        except ValueError:  # bad UTF-8 (UnicodeError is a ValueError) or bad JSON
            body = None
        command_id = body.get("id") if isinstance(body, dict) else None
        if not is_uuid(command_id):
            where = topic.decode()
            detail = f"command on {where} is not a JSON object with a UUID id"
            self.log(detail)
            event = {
                "ts": self.clock.epoch_ms(),
                "kind": "bad-command",
                "severity": "warning",
                "message": detail + ": not answered",
                "data": {"topic": where},
            }
            return None, event
        first = self.seen(command_id)
        if retained:
            # a retained command would come back (and run) on every resubscribe
            status = "rejected"
            detail = "refused: delivered retained; publish commands without retain and clear "
            detail += "this one with an empty retained message on " + topic.decode()
        elif first is not None:
            status = "rejected"
            detail = f"refused: command {command_id} was received before (answered {first}); "
            detail += "an id runs once: send a new id to run it again"
        else:
            status, detail = self.execute(name, body)
            self.remember(command_id, status)
        result = {"id": command_id, "status": status, "detail": detail}
        now = self.clock.epoch_ms()
        if now >= CLOCK_SET_MS:  # an unset clock's ts would be refused upstream
            result["ts"] = now
        self.log(f"command {name} {command_id}: {status} ({detail})")
        return result, None

    def execute(self, name, body):
        """(status, detail); acts on the device state."""
        named = body.get("name", name)
        if named != name:
            return "error", f"name {named!r} does not match the topic's {name!r}"
        ts, ttl = body.get("ts"), body.get("ttl_s")
        issued = timestamp_ms(ts) if ts is not None else None
        if ts is not None and issued is None:
            return "error", "ts must be epoch milliseconds or an RFC 3339 date-time"
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1):
            return "error", "ttl_s must be a positive integer (seconds)"
        now = self.clock.epoch_ms()
        if now >= CLOCK_SET_MS:  # without a set clock ts cannot be judged: retain and ids only
            if issued is None:
                detail = "refused: no ts; a command says when it was issued (epoch ms) "
                return "rejected", detail + "so that it can expire"
            ahead_s = (issued - now) // 1000
            if ahead_s > MAX_CLOCK_SKEW_S:
                detail = f"refused: ts is {ahead_s} s ahead of this device's clock (at most "
                return "rejected", detail + f"{MAX_CLOCK_SKEW_S} s): a clock is wrong"
            if ttl is None:
                ttl = DEFAULT_TTL_S
            late_ms = now - (issued + ttl * 1000)
            if late_ms > 0:
                return "expired", f"ttl_s {ttl} ran out {late_ms // 1000} s before it arrived"
        args = body.get("args", {})
        if not isinstance(args, dict):
            return "error", "args must be a JSON object"
        if name == "set-interval":
            return self.set_interval(args)
        if name == "reset":
            if args:
                return "error", "reset takes no arguments"
            self.reset_requested = True
            return "ok", "resetting"
        known = ", ".join(KNOWN_COMMANDS)
        return "rejected", f"unknown command {name!r}; this device knows {known}"

    def set_interval(self, args):
        extra = ", ".join(k for k in args if k != "interval_s")
        if extra:
            return "error", f"unknown argument(s) {extra}; set-interval takes interval_s"
        value = args.get("interval_s")
        bounds = f"{MIN_INTERVAL_S} to {MAX_INTERVAL_S} seconds"
        if not _number(value):
            return "error", f"args.interval_s must be a number, {bounds}"
        if not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:  # also refuses NaN
            return "error", f"interval_s {value} is out of range: {bounds}"
        old = self.interval_ms
        self.interval_ms = int(value * 1000 + 0.5)
        self.rescheduled = True
        return "ok", f"telemetry every {value} s (was {old / 1000} s) until the next boot"

    # I/O
    def feed(self):
        if self.watchdog is not None:
            self.watchdog.feed()

    def pause(self, ms):
        while ms > 0:
            step = min(ms, 1000)
            self.feed()
            self.clock.sleep_ms(step)
            ms -= step

    def publish(self, client, topic, payload, retain=False):
        # umqtt.simple packs the packet id into 16 bits without wrapping: id 65536 goes out
        # as 0, which brokers refuse.  Start over before that.
        if getattr(client, "pid", 0) >= 65000:
            client.pid = 0
        client.publish(topic, json.dumps(payload).encode(), retain, 1)
        self.last_out = self.clock.ticks()

    def publish_sample(self, client):
        """Read, publish the telemetry and any fault event; only then is the new fault state
        remembered, so an event lost with the connection is sent again."""
        telemetry, event = self.sample()
        self.publish(client, self.topic_telemetry, telemetry)
        if event is not None:
            self.publish(client, self.topic_events, event)
        self.fault = telemetry["metrics"].get("thermistor_fault")

    def serve(self, client):
        """One MQTT session; returns True when a reset was requested, raises on errors."""
        client.set_callback(self.on_message)
        client.set_last_will(self.topic_status, json.dumps(self.will()).encode(), True, 1)
        gc.collect()  # the TLS handshake wants large contiguous blocks
        open_session(client, self.cfg["io_timeout_s"])
        self.last_out = self.clock.ticks()
        self.publish(client, self.topic_status, self.status("online"), retain=True)
        client.subscribe(self.command_filter, 1)
        self.online = True
        self.log(f"online: {self.topic_status.decode()}, boot {self.boot}")
        due = self.clock.ticks()  # a reading right away after every (re)connect
        while True:
            for _ in range(MAX_INBOX):
                if client.check_msg() is None:
                    break
            while self.inbox:
                topic, msg, retained = self.inbox.pop(0)
                result, event = self.command(topic, msg, retained)
                if result is not None:
                    self.publish(client, self.topic_result, result)
                if event is not None:
                    self.publish(client, self.topic_events, event)
                if self.reset_requested:
                    self.refuse_pending(client, "not run: the device is resetting")
                    self.goodbye(client)
                    return True
            if self.overflow and not self.inbox:
                busy = f"busy: more than {MAX_INBOX} commands at once; send it again"
                self.refuse_pending(client, busy)
            if self.rescheduled:
                self.rescheduled = False
                since = self.last_sample if self.last_sample is not None else self.clock.ticks()
                due = ticks_add(since, self.interval_ms)
            now = self.clock.ticks()
            if ticks_diff(now, due) >= 0:
                self.publish_sample(client)
                self.last_sample = now
                due = ticks_add(due, self.interval_ms)
                if ticks_diff(now, due) >= 0:  # fell behind: skip, never burst
                    due = ticks_add(now, self.interval_ms)
            elif ticks_diff(now, self.last_out) >= self.keepalive_ms // 2:
                client.ping()  # umqtt.simple never pings by itself
                self.last_out = now
            self.feed()
            self.clock.sleep_ms(max(1, min(POLL_MS, ticks_diff(due, self.clock.ticks()))))

    def goodbye(self, client):
        """Before a commanded reset: the retained offline status, then a clean DISCONNECT."""
        try:
            self.publish(client, self.topic_status, self.status("offline"), retain=True)
            client.disconnect()
        except Exception as exc:
            self.log(f"goodbye failed: {exc!r}")

    def run(self, link, make_client):
        """Stay connected until a reset is requested; reconnect with backoff after errors."""
        low = int(self.cfg["backoff_min_s"] * 1000)
        high = int(self.cfg["backoff_max_s"] * 1000)
        failures = 0
        while True:
            client = None
            self.online = False
            try:
                link.up()
                client = make_client()
                if self.serve(client):
                    return
            except Exception as exc:  # OSError, MQTTException, or umqtt's asserts on EOF
                self.log(f"offline: {exc!r}")
            close_socket(client, self.log)
            client = None
            if self.online:
                failures = 0
            # Exponential backoff with "equal jitter": half the delay fixed, half random, so
            # devices that lost the broker together do not all come back in the same second;
            # until the cap each wait is at least as long as the one before.
            delay = min(high, low << min(failures, 16))
            failures += 1
            jitter = os.urandom(1)[0] * (delay // 2) // 255
            self.log(f"reconnecting in {delay // 2 + jitter} ms")
            self.pause(delay // 2 + jitter)


def main(config_path="config.json", log=None):
    """Wire the real hardware and run until a `reset` command; then reset the board."""
    log = log or log_print
    cfg = load_config(config_path)
    cert, key, ca = read_file(cfg["cert"]), read_file(cfg["key"]), read_file(cfg["ca"])
    check_identity(cert, cfg)
    boot = next_boot(cfg["boot_file"], log)
    tenant, device_id = cfg["tenant"], cfg["device"]
    log(f"fieldline firmware {FW_VERSION}: {tenant}/{device_id}, boot {boot}")

    import machine
    import network
    import ntptime
    from umqtt.simple import MQTTClient

    watchdog = machine.WDT(timeout=cfg["watchdog_ms"]) if cfg["watchdog_ms"] else None
    if cfg["wifi_country"]:
        network.country(cfg["wifi_country"])
    ntptime.host = cfg["ntp_host"]
    ntptime.timeout = 2
    clock = Clock()
    sensor = Thermistor(machine.ADC(machine.Pin(cfg["adc_pin"])), cfg["adc_samples"])
    device = Device(cfg, clock, sensor, boot, log, watchdog)
    link = Link(network.WLAN(network.STA_IF), ntptime, cfg, clock, log, device.feed)
    context = tls_context(cert, key, ca)

    class Client(MQTTClient):
        # umqtt.simple gives its callback (topic, msg) only; the retain bit of the PUBLISH
        # is in the packet type wait_msg() returns once the callback has run
        def wait_msg(self):
            op = MQTTClient.wait_msg(self)
            device.delivered(op)
            return op

    def make_client():
        return Client(
            client_id=cfg["device"],
            server=cfg["broker_host"],
            port=cfg["broker_port"],
            keepalive=cfg["keepalive_s"],
            ssl=context,
        )

    device.run(link, make_client)
    log("resetting")
    machine.reset()


if __name__ == "__main__":
    main()
