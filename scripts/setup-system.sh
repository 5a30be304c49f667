#!/usr/bin/env bash
# setup-system.sh [VENV] — prepare this machine to load bpfpipe's BPF programs.
#
# Idempotent and quiet when there is nothing to do. As root it:
#   - installs (only what is missing) python3-bpfcc, kernel headers, iproute2,
#     bpftool if the distribution has it, and for the tests prometheus (with
#     promtool), nats-server and tmux, without starting their daemons; runs `apt-get update` only when
#     something must be installed;
#   - prefers linux-headers-$(uname -r); when the distribution has no headers
#     for the running kernel, links its generic headers to
#     /lib/modules/$(uname -r)/{build,source} and prints one warning line;
#   - mounts tracefs and bpffs when they are not mounted;
#   - links the system's bcc module into VENV (a virtualenv directory).
# Not root: links bcc into VENV if it can, says in one line what it skipped,
# and exits 0 so `make test` still runs the tests that need no kernel.
set -euo pipefail

venv="${1:-}"
release="$(uname -r)"
modules="/lib/modules/${release}"
bcc_dir="/usr/lib/python3/dist-packages/bcc"

say() { printf 'setup-system: %s\n' "$*" >&2; }

link_bcc_into_venv() {
    [[ -n "$venv" && -d "$bcc_dir" ]] || return 0
    local site
    for site in "$venv"/lib/python3.*/site-packages; do
        [[ -d "$site" && -w "$site" ]] || continue
        if [[ "$(readlink "$site/bcc" 2>/dev/null)" != "$bcc_dir" ]]; then
            ln -sfn "$bcc_dir" "$site/bcc"
        fi
    done
}

if [[ "$(id -u)" -ne 0 ]]; then
    link_bcc_into_venv
    say "not root: skipped package install, kernel header links and tracefs/bpffs mounts (run 'sudo make setup'); BPF tests will not run"
    exit 0
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
available() { apt-cache show --no-all-versions "$1" >/dev/null 2>&1; }
has_headers() { [[ -d "$modules/build/include" ]]; }

if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    arch="$(dpkg --print-architecture)"
    exact_headers="linux-headers-${release}"

    missing=()
    # prometheus (server + promtool) and nats-server are for the tests, which start
    # them on loopback themselves; tmux drives `bpfpipe top` in a test terminal;
    # capsh (libcap2-bin) runs the agent with only the capabilities deploy/ grants.
    for pkg in python3-bpfcc iproute2 prometheus nats-server tmux libcap2-bin; do
        installed "$pkg" || missing+=("$pkg")
    done
    need_headers=0
    if ! has_headers && ! installed "$exact_headers"; then
        need_headers=1
    fi
    # bpftool is optional (Debian packages it; elsewhere it lives in other packages).
    want_bpftool=0
    if ! command -v bpftool >/dev/null 2>&1 && ! installed bpftool && available bpftool; then
        want_bpftool=1
    fi

    if ((${#missing[@]} > 0 || need_headers || want_bpftool)); then
        apt-get update -qq
        if ((need_headers)); then
            if available "$exact_headers"; then
                missing+=("$exact_headers")
            elif ! installed "linux-headers-${arch}"; then
                missing+=("linux-headers-${arch}")
            fi
        fi
        if ! command -v bpftool >/dev/null 2>&1 && ! installed bpftool && available bpftool; then
            missing+=(bpftool)
        fi
        if ((${#missing[@]} > 0)); then
            say "installing ${missing[*]}"
            # Packages with daemons (prometheus, nats-server) must not start them: the
            # tests start their own on loopback, and a stray one would hold port 9090.
            no_daemons=0
            if [[ ! -e /usr/sbin/policy-rc.d ]]; then
                printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
                chmod +x /usr/sbin/policy-rc.d
                no_daemons=1
            fi
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
            if ((no_daemons)); then
                rm -f /usr/sbin/policy-rc.d
            fi
        fi
    fi
elif [[ ! -d "$bcc_dir" ]] || ! command -v ip >/dev/null 2>&1; then
    say "no apt-get: install bcc's Python bindings, iproute2 and kernel headers with your package manager"
fi

# No headers for this exact kernel: fall back to the distribution's generic ones.
if ! has_headers; then
    generic="$(find /usr/src -maxdepth 1 -type d -name "linux-headers-*-$(dpkg --print-architecture 2>/dev/null || echo amd64)" | sort -V | tail -n 1)"
    if [[ -z "$generic" ]]; then
        say "no kernel headers found for ${release} under /usr/src; bcc cannot compile BPF programs"
        exit 1
    fi
    common="${generic%-*}-common"
    mkdir -p "$modules"
    ln -sfn "$generic" "$modules/build"
    if [[ -d "$common" ]]; then
        ln -sfn "$common" "$modules/source"
    fi
    say "warning: no headers packaged for kernel ${release}; linked $(basename "$generic") instead (bpfpipe uses tracepoint arguments only, so this is safe)"
fi

if ! mountpoint -q /sys/kernel/tracing; then
    mount -t tracefs nodev /sys/kernel/tracing
fi
if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf
fi

link_bcc_into_venv
