#!/usr/bin/env bash
# Install nats-server from Debian 13 (trixie, 2.10.27) where the system's own is older: bookworm has
# 2.9.10, which lacks years of JetStream fixes for interest streams and consumers across leader
# changes (docs/broker.md, "The nats-server version"). The binary package is fetched through a
# private apt configuration, like TimescaleDB's source: the system's own sources are never changed.
# apt checks it against trixie's index, signed by Debian's archive keyring. It is a static Go binary
# that needs only libc6 >= 2.34 and adduser, both in bookworm.
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/private-apt.sh"

MIN_VERSION=${NATS_SERVER_MIN_VERSION:-2.10.27}
SUITE=${NATS_SERVER_SUITE:-trixie}
WORK=${FIELDLINE_BUILD_DIR:-/var/tmp/fieldline-build}/nats-server

installed=$(dpkg-query -W -f='${Version}' nats-server 2>/dev/null || true)
if [ -n "$installed" ] && dpkg --compare-versions "$installed" ge "$MIN_VERSION"; then
    echo "nats-server: $installed installed"
    exit 0
fi

echo "nats-server: ${installed:-none} installed, $MIN_VERSION wanted"
rm -rf "$WORK" && mkdir -p "$WORK/deb"
private_apt nats-server "$WORK" deb "$SUITE"
cd "$WORK/deb"
apt-get "${apt_private[@]}" download -qq nats-server
deb=$(ls ./nats-server_*.deb)
version=$(dpkg-deb -f "$deb" Version)
if dpkg --compare-versions "$version" lt "$MIN_VERSION"; then
    echo "nats-server: $SUITE has $version, older than $MIN_VERSION" >&2
    exit 1
fi
# installed from the file with the system's own sources for its dependencies
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$WORK/deb/${deb#./}" >/dev/null
# the package starts a system service fieldline does not use (it starts its own nodes)
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now nats-server >/dev/null 2>&1 || true
fi
echo "nats-server: $version installed"
