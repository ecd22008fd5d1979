#!/usr/bin/env bash
# Install the Debian packages fieldline needs, then TimescaleDB. Idempotent; needs root or sudo.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

packages=(
    postgresql-15 postgresql-server-dev-15 postgresql-client-15
    mosquitto mosquitto-clients
    nats-server
    cmake build-essential dpkg-dev libssl-dev libkrb5-dev
    openssl ca-certificates python3-venv curl
    # the web console's browser tests: headless Chromium driven by Playwright, and a font
    chromium fonts-dejavu-core
)

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup: run as root or install sudo" >&2; exit 1; }
    SUDO=sudo
fi

# nats-server from Debian 13 (trixie, 2.10.27) on bookworm, whose 2.9.10 lacks years of
# JetStream fixes for interest streams across leader changes (docs/broker.md): trixie's
# source, signed by Debian's archive keyring, pinned so that nats-server alone comes from it
# (a static Go binary; it needs only libc6 >= 2.34 and adduser, both in bookworm).
NATS_VERSION_MIN=2.10.27
if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    sources=/etc/apt/sources.list.d/fieldline-trixie.sources
    pins=/etc/apt/preferences.d/fieldline-nats-server
    if [ ! -f "$sources" ] || [ ! -f "$pins" ]; then
        printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: trixie" \
            "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
            | $SUDO tee "$sources" >/dev/null
        printf '%s\n' "Package: *" "Pin: release n=trixie" "Pin-Priority: -10" "" \
            "Package: nats-server" "Pin: release n=trixie" "Pin-Priority: 990" \
            | $SUDO tee "$pins" >/dev/null
        fresh_sources=1
    fi
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
nats_installed=$(dpkg-query -W -f='${Version}' nats-server 2>/dev/null || true)
if [ -n "$nats_installed" ] && dpkg --compare-versions "$nats_installed" lt "$NATS_VERSION_MIN"; then
    missing+=(nats-server)  # an older one: upgraded from the pinned source
fi
if [ ${#missing[@]} -gt 0 ] || [ -n "${fresh_sources:-}" ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "setup: Debian packages present"
fi

# Debian's packages start system services we do not use: fieldline starts its own broker and
# PostgreSQL cluster on free ports, so leave the system ones stopped if they were started for us.
if [ ${#missing[@]} -gt 0 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
    $SUDO systemctl disable --now nats-server >/dev/null 2>&1 || true
fi

$SUDO bash "$here/build-timescaledb.sh"
