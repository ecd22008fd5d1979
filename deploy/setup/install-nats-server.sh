#!/usr/bin/env bash
# Install nats-server from Debian 13 (trixie, 2.10.27) where the system's own is older: bookworm has
# 2.9.10, which lacks years of JetStream fixes for interest streams and consumers across leader
# changes (docs/broker.md, "The nats-server version"). The binary package is fetched through a
# private apt configuration, like TimescaleDB's source: the system's own sources are never changed.
# apt checks it against trixie's index, signed by Debian's archive keyring. It is a static Go binary
# that needs only libc6 >= 2.34 and adduser, both in bookworm.
set -euo pipefail

MIN_VERSION=${NATS_SERVER_MIN_VERSION:-2.10.27}
SUITE=${NATS_SERVER_SUITE:-trixie}
WORK=${FIELDLINE_BUILD_DIR:-/var/tmp/fieldline-build}/nats-server

installed=$(dpkg-query -W -f='${Version}' nats-server 2>/dev/null || true)
if [ -n "$installed" ] && dpkg --compare-versions "$installed" ge "$MIN_VERSION"; then
    echo "nats-server: $installed installed"
    exit 0
fi

# The Debian mirror this machine already uses (as build-timescaledb.sh finds it).
mirror=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
        /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^(http|https|ftp|file):/) {print $i; exit}}' \
        /etc/apt/sources.list)
fi
if [ -z "$mirror" ]; then
    echo "nats-server: cannot find a Debian mirror in /etc/apt; set one up, then re-run" >&2
    exit 1
fi

rm -rf "$WORK" && mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/etc/sources.list.d" "$WORK/deb"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$keyring] $mirror $SUITE main" > "$WORK/apt/etc/sources.list"
apt_private=(
    -o "Dir::Etc::SourceList=$WORK/apt/etc/sources.list"
    -o "Dir::Etc::SourceParts=$WORK/apt/etc/sources.list.d"
    -o "Dir::State::Lists=$WORK/apt/lists"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
)
echo "nats-server: reading the $SUITE index (${installed:-none} installed, $MIN_VERSION wanted)"
apt-get "${apt_private[@]}" update -qq
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
