#!/bin/sh
# Installs what building and testing k3rs needs on a fresh Debian machine, and nothing that is
# already there. Safe to run repeatedly. Needs root (or sudo) only when something is missing.
set -eu

missing=""
need() { # need <command> <debian package>
    command -v "$1" >/dev/null 2>&1 || missing="$missing $2"
}

need cc gcc
need make make
need git git
need ip iproute2
need curl curl
# The node agent: iptables for the pod network, busybox for the test images and probes in
# tests, a registry and htpasswd for pull tests, runc for the benchmark's comparison.
need iptables iptables
need iptables-restore iptables
need nsenter util-linux
[ -x /bin/busybox ] || missing="$missing busybox-static"
need docker-registry docker-registry
need htpasswd apache2-utils
need runc runc
need zstd zstd
need python3 python3
# libcontainer's seccomp support (the default seccomp profile) links libseccomp.
need pkg-config pkg-config
pkg-config --exists libseccomp 2>/dev/null || missing="$missing libseccomp-dev"

if ! command -v cargo >/dev/null 2>&1; then
    echo "deps: cargo is not installed; install a Rust toolchain (https://rustup.rs) first" >&2
    exit 1
fi

if [ -n "$missing" ]; then
    echo "deps: installing$missing"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

if ! command -v kubectl >/dev/null 2>&1; then
    echo "deps: note: kubectl is not on PATH; tests that drive the API server with it will need it" >&2
fi
