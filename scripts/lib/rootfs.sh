#!/usr/bin/env bash
# shellcheck shell=bash
#
# Minimal Debian root file systems for the container images that need a shell and tools
# (the agent, the admin tools, PostgreSQL), made offline from Debian's packages: no base image
# is pulled from a registry. Source this file, do not run it:
#
#   source scripts/lib/deps.sh scripts/lib/rootfs.sh
#   hodei_rootfs_image base        # prints hodei/rootfs-base:<key>, an imported image
#   hodei_rootfs_image postgres    # prints hodei/rootfs-postgres:<key>
#
# How a root file system is made: `debootstrap --variant=minbase` of Debian 12 (bookworm),
# then, inside it, `apt-get upgrade` with bookworm-updates and bookworm-security and
# `apt-get install --no-install-recommends` of its packages; documentation (but copyright
# files), manual pages, translations, package lists and caches are left out. The user that
# every image runs as is uid and gid 10001 (`hodei`; `postgres` in the PostgreSQL one).
#
# Each one is cached as a tarball under $HODEI_ROOT/.hodei/images/rootfs/ (git-ignored) and as
# an image tagged with a key: the digest of the Debian release, the mirror, its package list
# and this file. A second run with the same key neither downloads nor imports anything; a
# change to any of them makes it afresh. HODEI_ROOTFS_REFRESH=1 makes them afresh anyway (to
# pick up Debian's newest security updates).
#
# Needs root (debootstrap, chroot) and network access to the Debian mirrors this machine's apt
# uses: HODEI_DEBIAN_MIRROR and HODEI_DEBIAN_SECURITY_MIRROR, by default the first `URIs:` (or
# `deb` line) of /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list without and with
# "security" in it.

HODEI_DEBIAN_SUITE="bookworm"

# The first Debian archive URI of this machine's apt sources whose URI does ($1 = 1) or does
# not ($1 = 0) contain "security".
_hodei_apt_mirror() {
    local security="$1" file text=""
    for file in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list; do
        if [ -f "$file" ]; then
            text+="$(cat "$file")"$'\n'
        fi
    done
    awk -v sec="$security" '
            /^URIs:/ { uri = $2 }
            /^deb / { uri = ($2 ~ /^\[/) ? $3 : $2 }
            uri != "" {
                if ((uri ~ /security/) == (sec == 1)) { print uri; exit }
                uri = ""
            }' <<<"$text"
}
HODEI_DEBIAN_MIRROR="${HODEI_DEBIAN_MIRROR:-$(_hodei_apt_mirror 0)}"
HODEI_DEBIAN_SECURITY_MIRROR="${HODEI_DEBIAN_SECURITY_MIRROR:-$(_hodei_apt_mirror 1)}"
# The uid and gid every image runs as (the Kubernetes manifests in deploy/k8s assume it).
HODEI_IMAGE_UID=10001

# Packages on top of minbase (which has sh, coreutils and util-linux).
# base: the agent's jobs and the admin tools; tini reaps what jobs orphan, ca-certificates
# lets jobs and the CLI reach TLS servers.
_HODEI_ROOTFS_PACKAGES_base="ca-certificates tini"
# postgres: the server and its client tools (pg_isready, psql).
_HODEI_ROOTFS_PACKAGES_postgres="ca-certificates postgresql-15"
# Packages removed again after installing: PostgreSQL's JIT compiler (LLVM; the server runs
# with jit=off), and the Perl and locale data only Debian's cluster wrappers (pg_ctlcluster,
# pg_createcluster) use; the image runs the server's own binaries with the C.UTF-8 locale.
_HODEI_ROOTFS_PURGE_postgres="libllvm14 libz3-4 perl libperl5.36 perl-modules-5.36 libjson-perl locales libc-l10n"

_HODEI_ROOTFS_SELF="${BASH_SOURCE[0]}"

_hodei_rootfs_dir() {
    echo "$HODEI_ROOT/.hodei/images/rootfs"
}

# Prints the cache key of root file system $1: 16 hex digits.
_hodei_rootfs_key() {
    local name="$1" packages purge
    packages="_HODEI_ROOTFS_PACKAGES_$name"
    purge="_HODEI_ROOTFS_PURGE_$name"
    {
        echo "$HODEI_DEBIAN_SUITE $HODEI_DEBIAN_MIRROR $HODEI_DEBIAN_SECURITY_MIRROR"
        echo "packages: ${!packages}"
        echo "purge: ${!purge:-}"
        cat "$_HODEI_ROOTFS_SELF"
    } | sha256sum | cut -c1-16
}

# Runs a command inside root file system $1, as root, without asking questions.
_hodei_chroot() {
    local dir="$1"
    shift
    chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        LC_ALL=C.UTF-8 "$@"
}

# Makes the minbase tree at $1 (debootstrap); the downloaded packages are kept in $2.
_hodei_rootfs_debootstrap() {
    local dir="$1" debs="$2"
    mkdir -p "$debs" || return 1
    rm -rf "$dir"
    _hodei_quiet debootstrap --variant=minbase --cache-dir="$debs" \
        "$HODEI_DEBIAN_SUITE" "$dir" "$HODEI_DEBIAN_MIRROR"
}

# Installs the packages of root file system $2 into the minbase tree $1 and trims it.
_hodei_rootfs_install() {
    local dir="$1" name="$2" packages purge
    packages="_HODEI_ROOTFS_PACKAGES_$name"
    purge="_HODEI_ROOTFS_PURGE_$name"
    # Nothing documentation-like is unpacked from here on; copyright files are kept.
    cat >"$dir/etc/dpkg/dpkg.cfg.d/hodei-minimal" <<'EOF' || return 1
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    cat >"$dir/etc/apt/sources.list" <<EOF || return 1
deb $HODEI_DEBIAN_MIRROR $HODEI_DEBIAN_SUITE main
deb $HODEI_DEBIAN_MIRROR $HODEI_DEBIAN_SUITE-updates main
deb $HODEI_DEBIAN_SECURITY_MIRROR $HODEI_DEBIAN_SUITE-security main
EOF
    # Package scripts must not start daemons, nor make PostgreSQL's default cluster.
    printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d" && chmod 0755 "$dir/usr/sbin/policy-rc.d" || return 1
    mkdir -p "$dir/etc/postgresql-common" || return 1
    echo "create_main_cluster = false" >"$dir/etc/postgresql-common/createcluster.conf" || return 1
    cp /etc/resolv.conf "$dir/etc/resolv.conf" || return 1

    _hodei_quiet _hodei_chroot "$dir" apt-get -q update || return 1
    _hodei_quiet _hodei_chroot "$dir" apt-get -qy -o Dpkg::Options::=--force-confold upgrade || return 1
    # shellcheck disable=SC2086 # a list of package names
    _hodei_quiet _hodei_chroot "$dir" apt-get -qy install --no-install-recommends ${!packages} || return 1
    if [ -n "${!purge:-}" ]; then
        # shellcheck disable=SC2086 # a list of package names
        _hodei_quiet _hodei_chroot "$dir" dpkg --purge --force-depends ${!purge} || return 1
    fi

    if [ "$name" = postgres ]; then
        # Debian's postgres user, renumbered to the images' uid (initdb needs a name for it).
        _hodei_quiet _hodei_chroot "$dir" groupmod --gid "$HODEI_IMAGE_UID" postgres || return 1
        _hodei_quiet _hodei_chroot "$dir" usermod --uid "$HODEI_IMAGE_UID" --gid "$HODEI_IMAGE_UID" postgres || return 1
        _hodei_chroot "$dir" chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
            /var/log/postgresql /etc/postgresql || return 1
        # The JIT's bitcode is useless without LLVM.
        rm -rf "$dir/usr/lib/postgresql/15/lib/bitcode" "$dir/usr/lib/postgresql/15/lib/llvmjit"*
    else
        _hodei_quiet _hodei_chroot "$dir" groupadd --gid "$HODEI_IMAGE_UID" hodei || return 1
        _hodei_quiet _hodei_chroot "$dir" useradd --uid "$HODEI_IMAGE_UID" --gid "$HODEI_IMAGE_UID" \
            --home-dir /var/lib/hodei --shell /usr/sbin/nologin hodei || return 1
    fi

    # What an image never needs: lists and caches, documentation, logs, the build's leftovers.
    rm -f "$dir/usr/sbin/policy-rc.d" "$dir/etc/resolv.conf"
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/* "$dir"/var/cache/debconf/*-old \
        "$dir"/var/log/* "$dir"/tmp/* "$dir"/var/tmp/* "$dir"/usr/share/man/* \
        "$dir"/usr/share/info/* "$dir"/usr/share/locale/* "$dir"/usr/share/lintian/* \
        "$dir"/var/cache/ldconfig/aux-cache "$dir"/var/lib/dpkg/*-old
    find "$dir/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete
    : >"$dir/etc/resolv.conf"
}

# Makes root file system $1 (base or postgres) as a tarball in the cache, unless it is there.
_hodei_rootfs_tarball() {
    local name="$1" key cache tree debs packages="_HODEI_ROOTFS_PACKAGES_$1"
    key="$(_hodei_rootfs_key "$name")" || return 1
    cache="$(_hodei_rootfs_dir)"
    if [ -f "$cache/$name-$key.tar" ] && [ "${HODEI_ROOTFS_REFRESH:-0}" != 1 ]; then
        return 0
    fi
    if ! _hodei_is_root; then
        _hodei_err "making the $name root file system needs root (debootstrap and chroot)"
        return 1
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        _hodei_apt_install debootstrap || return 1
    fi
    mkdir -p "$cache" || return 1
    tree="$cache/$name-$key.tree"
    debs="$cache/debs"
    echo "rootfs: making $name: debootstrap $HODEI_DEBIAN_SUITE minbase + ${!packages}" >&2
    if ! _hodei_rootfs_debootstrap "$tree" "$debs" || ! _hodei_rootfs_install "$tree" "$name"; then
        _hodei_err "could not make the $name root file system in $tree"
        return 1
    fi
    tar -C "$tree" --numeric-owner --xattrs -cf "$cache/$name-$key.tar.tmp" . || return 1
    mv "$cache/$name-$key.tar.tmp" "$cache/$name-$key.tar" || return 1
    rm -rf "$tree"
    # Tarballs of earlier keys are of no further use.
    find "$cache" -maxdepth 1 -name "$name-*.tar" ! -name "$name-$key.tar" -delete
}

# Makes (or finds in the cache) root file system $1 (base or postgres), imports it into
# Docker as hodei/rootfs-$1:<key> unless that image exists, and prints the image's name.
hodei_rootfs_image() {
    local name="$1" key image packages="_HODEI_ROOTFS_PACKAGES_$1"
    case "$name" in
    base | postgres) ;;
    *)
        _hodei_err "no root file system named $name (base or postgres)"
        return 1
        ;;
    esac
    key="$(_hodei_rootfs_key "$name")" || return 1
    image="hodei/rootfs-$name:$key"
    if [ "${HODEI_ROOTFS_REFRESH:-0}" = 1 ] || ! docker image inspect "$image" >/dev/null 2>&1; then
        _hodei_rootfs_tarball "$name" || return 1
        _hodei_quiet docker import \
            --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
            --change "ENV LANG=C.UTF-8" \
            --message "Debian $HODEI_DEBIAN_SUITE minbase + ${!packages}" \
            "$(_hodei_rootfs_dir)/$name-$key.tar" "$image" || return 1
    fi
    echo "$image"
}
