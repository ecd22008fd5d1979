#!/usr/bin/env bash
# Build and install TimescaleDB (Apache-2 edition) for PostgreSQL 15 from Debian's source package.
# Bookworm has no timescaledb package, so we fetch the source of the next release (trixie) through a
# private apt configuration: the system's own sources.list is never changed.
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
WORK=${FIELDLINE_BUILD_DIR:-/var/tmp/fieldline-build/timescaledb}
SUITE=${TIMESCALEDB_SUITE:-trixie}

if [ -f "$("$PG_CONFIG" --sharedir)/extension/timescaledb.control" ] && [ "${FORCE:-0}" != 1 ]; then
    echo "timescaledb: already installed for $("$PG_CONFIG" --version)"
    exit 0
fi

# The Debian mirror this machine already uses; we only add a deb-src line for $SUITE next to it.
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
    echo "timescaledb: cannot find a Debian mirror in /etc/apt; set one up, then re-run" >&2
    exit 1
fi

rm -rf "$WORK" && mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/etc/sources.list.d" "$WORK/src"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb-src [signed-by=$keyring] $mirror $SUITE main" > "$WORK/apt/etc/sources.list"
apt_private=(
    -o "Dir::Etc::SourceList=$WORK/apt/etc/sources.list"
    -o "Dir::Etc::SourceParts=$WORK/apt/etc/sources.list.d"
    -o "Dir::State::Lists=$WORK/apt/lists"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
)
echo "timescaledb: reading $SUITE source index"
apt-get "${apt_private[@]}" update -qq
cd "$WORK/src"
apt-get "${apt_private[@]}" source --download-only -qq timescaledb
dpkg-source --no-check -x ./*.dsc build >/dev/null
cd build

echo "timescaledb: building $(sed -n 's/^Version: //p' ../*.dsc | head -1) against $("$PG_CONFIG" --version)"
# Git off: a source package is no checkout, and TimescaleDB's `gitcheck` target runs git describe,
# rev-parse and log on every make (3 "fatal: not a git repository" lines each for build and install)
# only to stamp a commit id into the library
./bootstrap -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
    -DLINTER=OFF -DCMAKE_DISABLE_FIND_PACKAGE_Git=TRUE -DPG_CONFIG="$PG_CONFIG" >/dev/null
make -C build -j"$(nproc)" >/dev/null
make -C build install >/dev/null
echo "timescaledb: installed into $("$PG_CONFIG" --pkglibdir)"
