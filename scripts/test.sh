#!/usr/bin/env bash
# Runs pgswitch's whole test suite: installs what is missing (PostgreSQL >= 15 server binaries,
# psql, openssl, psycopg 3 and pytest, a JDK and pgJDBC), then cargo fmt --check, clippy with
# warnings as errors, and every test (unit, property, integration against real PostgreSQL
# clusters, psycopg 3, asyncpg, pgJDBC).
#
# For a fresh Debian 12 / Ubuntu machine with Rust installed; run as root or as a user with sudo.
# Works from any directory, without a terminal (CI=true, no stdin). Exits non-zero on any failure.
#
# Environment:
#   PGSWITCH_TEST_THREADS  tests run at once inside each test binary (default 2: each integration
#                          test starts its own PostgreSQL cluster, and CI has 2 cores)
#   PGSWITCH_LOG           e.g. debug: proxy logs in the output of integration tests
#   PGSWITCH_PG_BIN        PostgreSQL server binaries to use instead of /usr/lib/postgresql/*/bin
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

started=$SECONDS
threads="${PGSWITCH_TEST_THREADS:-2}"

section "Prerequisites"
ensure_rust
ensure_rust_lint_tools
ensure_c_toolchain
ensure_postgres
ensure_psql
ensure_openssl
ensure_python_packages
ensure_jdbc
ensure_prometheus

section "cargo fmt --check"
cargo fmt --all -- --check
note "formatting OK"

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

section "cargo test (--test-threads=$threads)"
log="$(mktemp -t pgswitch-test.XXXXXX)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --no-fail-fast -- --test-threads="$threads" 2>&1 </dev/null | tee "$log" || status=$?

section "Summary"
# One line per test binary ("test result: ok. 12 passed; 0 failed; 1 ignored; ..."), added up.
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) passed += $i
            if ($(i + 1) ~ /^failed/) failed += $i
            if ($(i + 1) ~ /^ignored/) ignored += $i
        }
        binaries++
     }
     END { printf "%d test binaries\ntotal: %d passed, %d failed, %d skipped\n", binaries, passed, failed, ignored }' "$log"
# cargo's closing "failures:" list of each failing binary: one indented test name per line.
failures="$(awk '/^failures:$/ { listing = 1; next }
                 listing && /^    [^ ]/ { print "  " $1; next }
                 { listing = 0 }' "$log")"
if [ "$status" -ne 0 ]; then
    if [ -n "$failures" ]; then
        printf 'failed tests:\n%s\n' "$failures"
    fi
    note "cargo test FAILED (exit $status) after $((SECONDS - started)) s"
    exit "$status"
fi
note "all checks passed in $((SECONDS - started)) s"
