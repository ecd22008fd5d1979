#!/usr/bin/env bash
# Build and install TimescaleDB (Apache-2 edition) for PostgreSQL 15 from Debian's source package.
# Bookworm has no timescaledb package, so we fetch the source of the next release (trixie) through a
# private apt configuration: the system's own sources.list is never changed.
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/private-apt.sh"

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
WORK=${FIELDLINE_BUILD_DIR:-/var/tmp/fieldline-build/timescaledb}
SUITE=${TIMESCALEDB_SUITE:-trixie}

if [ -f "$("$PG_CONFIG" --sharedir)/extension/timescaledb.control" ] && [ "${FORCE:-0}" != 1 ]; then
    echo "timescaledb: already installed for $("$PG_CONFIG" --version)"
    exit 0
fi

# a deb-src line for $SUITE next to the machine's own mirror, in an apt state of our own
rm -rf "$WORK" && mkdir -p "$WORK/src"
private_apt timescaledb "$WORK" deb-src "$SUITE"
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
