#!/usr/bin/env bash
# Runs every tokenproxy test suite: unit tests (src/**) and the integration
# tests over real sockets (tests/integration/), against the in-crate dev IdP
# and echo upstream; then the interop suite (tests/interop/: the binary
# against oidc-provider from npm, see docs/testing.md "Interop"). Installs what the tests need first, so it works on a
# fresh machine. Usage: tests/run.sh [extra `cargo test` arguments]
# TESTS_INSTALL_ONLY=1 tests/run.sh installs the prerequisites and runs nothing.
# TESTS_SKIP_INTEROP=1 skips the interop suite.
#
# Besides the Rust toolchain, the browser test (tests/integration/browser.rs)
# needs Debian's chromium, node and npm, and tests/browser's node_modules
# (playwright-core, pinned by its package-lock.json); the interop suite needs
# Node.js (>= 18) and npm; the alert-rule tests need promtool (Debian's
# prometheus package); the fleet-mode tests need PostgreSQL's server
# binaries (initdb, pg_ctl, psql under /usr/lib/postgresql/*/bin; Debian keeps
# them off PATH): they start a throwaway cluster themselves, as a non-root
# user. To add a tool, call
# `need_apt <command> <debian-package>` or `need_npm <command> <package>` in
# install_prerequisites below: each installs only when the command is
# missing, and `apt-get update` runs at most once.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }

# Root runs apt-get directly; anyone else through sudo (non-interactive).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

APT_UPDATED=0
need_apt() { # need_apt COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        log "$1 is missing and apt-get is not available: install $2 by hand"
        exit 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing $2 (for $1)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2"
}

need_npm() { # need_npm COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    need_apt npm npm
    log "installing $2 with npm (for $1)"
    as_root npm install --global --no-fund --no-audit "$2"
}

need_rust() {
    # rustup installs into ~/.cargo/bin, which a fresh shell may not have on PATH.
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 && return 0
    need_apt curl curl
    need_apt cc build-essential
    log "installing the Rust toolchain with rustup (minimal profile)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --no-modify-path --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
}

# Debian's postgresql package keeps initdb under /usr/lib/postgresql/N/bin.
need_postgres() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && return 0
    # initdb is not on PATH there: name a command that never is.
    need_apt tokenproxy-needs-initdb postgresql
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || {
        log "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found"
        exit 1
    }
}

install_prerequisites() {
    need_rust
    need_postgres
    # The status-page browser test: a real headless chromium, driven by
    # playwright-core from node (never a browser build of its own).
    need_apt chromium chromium
    need_apt node nodejs
    need_apt npm npm
    # deploy/prometheus/alerts.yaml: Debian's prometheus ships promtool.
    need_apt promtool prometheus
    if [ ! -d tests/browser/node_modules/playwright-core ] ||
        [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
        log "npm ci in tests/browser"
        (cd tests/browser && npm ci --no-fund --no-audit --loglevel=error)
    fi
}

install_prerequisites
if [ "${TESTS_INSTALL_ONLY:-0}" = 1 ]; then
    exit 0
fi

log "cargo test --all-targets $*"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
cargo test --all-targets --locked "$@" 2>&1 | tee "$out" || status=$?

# The chaos soak, 60 s (debug build): kill -9s, IdP faults, must-be-zero
# figures checked by the example itself (exit 1 otherwise).
if [ "$status" -eq 0 ]; then
    log "cargo run --example soak -- --seconds 60"
    cargo run --locked --example soak -- --seconds 60 2>&1 | tee -a "$out" || status=$?
fi

interop_status=skipped
if [ "${TESTS_SKIP_INTEROP:-0}" != 1 ]; then
    log "interop: npm ci in tests/interop, cargo build, node tests/interop/run.mjs"
    interop_status=0
    (cd tests/interop && npm ci --no-fund --no-audit --loglevel=error) &&
        cargo build --locked --bin tokenproxy &&
        node tests/interop/run.mjs 2>&1 | tee -a "$out" || interop_status=$?
fi

echo
echo "== summary =="
grep -E '^\s+Running |^test result: |^MUST BE 0|^PASS$|^FAIL|^INTEROP: |^interop: ' "$out" | sed -E 's/^\s+//' || true
if [ "$status" -ne 0 ]; then
    echo "FAILED (cargo test exited with $status)"
fi
if [ "$interop_status" = skipped ]; then
    echo "interop suite skipped (TESTS_SKIP_INTEROP=1)"
elif [ "$interop_status" -ne 0 ]; then
    echo "FAILED (interop suite exited with $interop_status)"
    [ "$status" -ne 0 ] || status=$interop_status
fi
[ "$status" -ne 0 ] || echo "all test suites passed"
exit "$status"
