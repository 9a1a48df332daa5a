#!/usr/bin/env bash
# A first look at pgswitch: starts a local PostgreSQL primary and 2 streaming standbys with
# pgswitch in front (session pooling), prints the psql line to connect, and stops everything
# cleanly on Ctrl-C.
#
# For a fresh Debian 12 / Ubuntu machine with Rust installed; run as root or as a user with sudo.
# It installs the PostgreSQL server from apt when it is missing, builds pgswitch in release mode,
# then runs `pgswitch demo` (arguments are passed on, e.g. `scripts/demo.sh --port 7432`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

section "Prerequisites"
ensure_rust
ensure_c_toolchain
ensure_postgres
ensure_psql

section "Building pgswitch (cargo build --release)"
cargo build --release

section "pgswitch demo"
# exec: the demo becomes this process, so Ctrl-C (SIGINT) reaches it and it stops the cluster.
exec "$ROOT/target/release/pgswitch" demo "$@"
