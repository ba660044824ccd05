#!/usr/bin/env bash
# Install the cross-node brokers the cluster tests run against: Debian's redis-server and
# nats-server packages, when they are not on PATH already, and redis-cli (redis-tools; Debian's
# redis-server depends on it, other distributions' packages may not), which makes a Redis Cluster.
#
# Usage: scripts/install-brokers.sh [redis|nats]...   # default: both; prints NAME=<path> per server
#                                                       # (and REDIS_CLI=<path> with redis)
#
# Idempotent: a server found on PATH (or in /usr/sbin, /usr/bin) is used as it is. Installing
# needs apt-get and root (or sudo without a password); without them this fails with a message
# naming the package to install by hand. The packages' own services are not started or relied on:
# each test starts its own server on a free loopback port in a temporary directory.
set -euo pipefail

log() { printf 'scripts/install-brokers.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(redis nats)

# find NAME BINARY: the binary's path, or nothing.
find_binary() {
    local binary=$1
    command -v "$binary" 2>/dev/null && return 0
    for dir in /usr/sbin /usr/bin /usr/local/bin; do
        [ -x "$dir/$binary" ] && { echo "$dir/$binary"; return 0; }
    done
    return 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

updated=0
install_package() {
    local package=$1
    command -v apt-get >/dev/null || die "$package is missing and there is no apt-get here: install $package by hand"
    if [ "$updated" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
            || die "apt-get update failed (root or passwordless sudo needed): install $package by hand"
        updated=1
    fi
    log "installing $package"
    # --no-install-recommends: the server binary only. Where an init system runs, the package may
    # start its own service on the default port; the tests never use it.
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$package" >/dev/null \
        || die "apt-get install $package failed: install it by hand (apt-cache policy $package)"
}

for name in "${wanted[@]}"; do
    case "$name" in
        redis) package=redis-server binary=redis-server ;;
        nats) package=nats-server binary=nats-server ;;
        *) die "unknown broker '$name' (redis or nats)" ;;
    esac
    if ! path=$(find_binary "$binary"); then
        install_package "$package"
        path=$(find_binary "$binary") || die "$package installed but $binary is not on PATH"
    fi
    upper=$(printf '%s' "$name" | tr '[:lower:]' '[:upper:]')
    printf '%s=%s\n' "$upper" "$path"
    if [ "$name" = redis ]; then
        if ! cli=$(find_binary redis-cli); then
            install_package redis-tools
            cli=$(find_binary redis-cli) || die "redis-tools installed but redis-cli is not on PATH"
        fi
        printf 'REDIS_CLI=%s\n' "$cli"
    fi
done
