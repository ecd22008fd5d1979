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

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
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

$SUDO bash "$here/install-nats-server.sh"
$SUDO bash "$here/build-timescaledb.sh"
