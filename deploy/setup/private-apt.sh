# Sourced by build-timescaledb.sh and install-nats-server.sh: an apt configuration of their own
# for one Debian suite (trixie) on the mirror this machine already uses. The system's own
# sources are never changed; apt checks what it fetches against the suite's index, signed by
# Debian's archive keyring.

# The Debian mirror this machine uses, or exit with a message naming `who`.
debian_mirror() {
    local who=$1 mirror=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
            /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
        mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^(http|https|ftp|file):/) {print $i; exit}}' \
            /etc/apt/sources.list)
    fi
    if [ -z "$mirror" ]; then
        echo "$who: cannot find a Debian mirror in /etc/apt; set one up, then re-run" >&2
        exit 1
    fi
    echo "$mirror"
}

# private_apt WHO WORK KIND SUITE: a fresh apt state in WORK/apt for `KIND` (deb or deb-src)
# lines of SUITE, its index read; the options are left in the array `apt_private`.
private_apt() {
    local who=$1 work=$2 kind=$3 suite=$4 mirror
    mirror=$(debian_mirror "$who")
    mkdir -p "$work/apt/lists/partial" "$work/apt/etc/sources.list.d"
    echo "$kind [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
        > "$work/apt/etc/sources.list"
    apt_private=(
        -o "Dir::Etc::SourceList=$work/apt/etc/sources.list"
        -o "Dir::Etc::SourceParts=$work/apt/etc/sources.list.d"
        -o "Dir::State::Lists=$work/apt/lists"
        -o "Debug::NoLocking=1"
        -o "APT::Sandbox::User=root"
    )
    echo "$who: reading the $suite index"
    apt-get "${apt_private[@]}" update -qq
}
