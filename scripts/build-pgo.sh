#!/usr/bin/env bash
# A profile-guided (PGO) release build of pgswitch: target/pgo/release/pgswitch.
#
#   sudo bash scripts/build-pgo.sh        # ~10 minutes on 2 cores
#
# 1. builds pgswitch with LLVM instrumentation (-Cprofile-generate, into target/pgo-gen);
# 2. trains it: a throwaway PostgreSQL 15 in a temp dir, pgswitch in transaction mode in front,
#    and pgbench through it: -S (one SELECT) and the default TPC-B-like script (three UPDATEs,
#    a SELECT and an INSERT in a transaction), each with -M simple, extended and prepared, at 10
#    and 100 clients, PGO_SECONDS (default 4) per run; then the same in session mode, 10 clients;
# 3. merges the profile with llvm-profdata (rustup's llvm-tools component, installed when
#    missing: it must match rustc's LLVM) into target/pgo/pgswitch.profdata;
# 4. builds the release binary again with -Cprofile-use into target/pgo.
#
# The compiler then lays out and inlines the relay, the pool and tokio's I/O paths for the way a
# proxy runs them: about a quarter less user-space CPU per transaction than `cargo build
# --release` in the benchmarks (README, "Numbers"). The system calls, and so most of a
# transaction's cost, do not change. Behaviour does not change either: same code, other layout.
#
# Needs root (PostgreSQL runs as the postgres user), the PostgreSQL 15 server binaries (PGBIN,
# default /usr/lib/postgresql/15/bin), pgbench and psql. Everything listens on free 127.0.0.1
# ports and is stopped by PID on exit. PGO_SECONDS sets the length of each training run.
set -euo pipefail

TRAIN_SECONDS=${PGO_SECONDS:-4}
POOL=20 SCALE=10
# shellcheck source=../benches/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../benches/common.sh"

require_root
cd "$ROOT"
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
    log "rustup component add llvm-tools (llvm-profdata matching rustc's LLVM)"
    rustup component add llvm-tools >&2
fi
[ -x "$PROFDATA" ] || { echo "no $PROFDATA" >&2; exit 1; }

RAW=$ROOT/target/pgo/raw
rm -rf "$RAW"
mkdir -p "$RAW"
log "instrumented build (target/pgo-gen)"
RUSTFLAGS="-Cprofile-generate=$RAW" cargo build --release --locked --bin pgswitch \
    --target-dir "$ROOT/target/pgo-gen" >&2
# Build scripts and proc macros of the build above were instrumented too and wrote their own
# profiles: only what the training writes from here on is kept.
rm -rf "$RAW"
mkdir -p "$RAW"
PGSWITCH_BIN=$ROOT/target/pgo-gen/release/pgswitch

make_workdir pgswitch-pgo
pick_free_ports
start_postgres
create_bench_db

train() { # pool_mode clients
    log "training: pool_mode = $1"
    POOL_MODE=$1 start_pgswitch
    local clients=$2 script mode c
    for script in -S ""; do
        for mode in simple extended prepared; do
            for c in $clients; do
                # shellcheck disable=SC2086 # $script is one option or none
                pgbench -h 127.0.0.1 -p "$SW_PORT" -U app -n $script -M "$mode" -c "$c" -j 2 \
                    -T "$TRAIN_SECONDS" bench >"$WORK/train.log" 2>&1 ||
                    { cat "$WORK/train.log" >&2; exit 1; }
                log "  pgbench ${script:-tpcb} -M $mode -c $c: $(sed -n 's/^tps = \([0-9]*\).*/\1/p' "$WORK/train.log") tps"
            done
        done
    done
    # SIGTERM: pgswitch exits through main, and the profile is written at exit.
    stop_pids TERM 30 "$SW_PID"
    SW_PID=""
}
train transaction "10 100"
train session 10

compgen -G "$RAW/*.profraw" >/dev/null || { echo "the training wrote no profile into $RAW" >&2; exit 1; }
"$PROFDATA" merge -o "$ROOT/target/pgo/pgswitch.profdata" "$RAW"/*.profraw
log "profile-guided build (target/pgo)"
cd "$ROOT"
RUSTFLAGS="-Cprofile-use=$ROOT/target/pgo/pgswitch.profdata" cargo build --release --locked \
    --bin pgswitch --target-dir "$ROOT/target/pgo" >&2
log "built $ROOT/target/pgo/release/pgswitch"
