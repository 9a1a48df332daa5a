#!/usr/bin/env bash
# A client streaming a big COPY TO STDOUT through the proxy, and a bystander: PgBouncer vs
# pgswitch, side by side, transaction pooling.
#
#   bash benches/bystander.sh                     # ~1.5 minutes
#   BENCH_ROUNDS=5 bash benches/bystander.sh
#
# What it measures, per proxy and round: the bystander (pgbench -S, one client) runs
# BENCH_SECONDS alone, then again while another client streams a COPY of BENCH_COPY_ROWS rows of
# 1,000 bytes through the same proxy; printed are the bystander's mean latency alone and during
# the COPY, their ratio, and the COPY's throughput (MB/s over the whole COPY). Both proxies run one
# thread (pgswitch workers = 1): a proxy whose data path never gave up the thread while a socket
# stayed ready would stall the bystander for the whole COPY; one that yields keeps its latency
# within what sharing two cores with the COPY costs anyway. Medians over BENCH_ROUNDS rounds,
# the proxies interleaved.
#
# Environment (all optional):
#   BENCH_ROUNDS        rounds, default 3
#   BENCH_SECONDS       duration of each bystander run, default 3
#   BENCH_COPY_ROWS     rows of the COPY, default 3000000 (3 GB: longer than a bystander run)
#   BENCH_PGO=1, BENCH_SKIP_BUILD=1, BENCH_KEEP=1, BENCH_SERVER_SOCKET=1: as in pgbench.sh
#
# Needs root (PostgreSQL and PgBouncer run as the postgres user), PostgreSQL 15 server binaries,
# pgbench, psql and python3; installs pgbouncer from apt when missing. Everything listens on
# 127.0.0.1 on free ports; every process it starts is stopped by PID on exit.
set -euo pipefail
ROUNDS=${BENCH_ROUNDS:-3}
SECS=${BENCH_SECONDS:-3}
ROWS=${BENCH_COPY_ROWS:-3000000}
POOL=20
SCALE=10
BENCH_WORKERS=1
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_root
command -v pgbouncer >/dev/null || apt_install pgbouncer
build_pgswitch
make_workdir pgswitch-bystander
pick_free_ports
start_postgres
create_bench_db
start_pgbouncer
start_pgswitch

# latency PORT: the bystander's mean latency in ms over one run.
latency() {
    pgbench -h 127.0.0.1 -p "$1" -U app -S -n -c 1 -j 1 -T "$SECS" bench 2>&1 |
        awk '/latency average/ {print $4}'
}

# copy PORT: streams the COPY to /dev/null; prints its MB/s.
copy() {
    local start end
    start=$(date +%s.%N)
    psql -h 127.0.0.1 -p "$1" -U app -d bench -qAt -c \
        "COPY (SELECT repeat('x', 1000) FROM generate_series(1, $ROWS)) TO STDOUT" >/dev/null
    end=$(date +%s.%N)
    python3 -c "print(f'{$ROWS * 1001 / 1e6 / ($end - $start):.0f}')"
}

: >"$WORK/results"
for round in $(seq "$ROUNDS"); do
    log "round $round of $ROUNDS"
    for proxy in pgbouncer pgswitch; do
        port=$PGB_PORT
        [ "$proxy" = pgswitch ] && port=$SW_PORT
        alone=$(latency "$port")
        copy "$port" >"$WORK/copy.out" &
        copier=$!
        sleep 0.5 # the COPY is streaming
        during=$(latency "$port")
        wait "$copier"
        mbs=$(cat "$WORK/copy.out")
        log "  $proxy: bystander ${alone} ms alone, ${during} ms during the COPY; COPY ${mbs} MB/s"
        echo "$proxy $alone $during $mbs" >>"$WORK/results"
    done
done

python3 - "$WORK/results" "$ROUNDS" "$SECS" "$ROWS" "$PGSWITCH_BUILD" <<'EOF'
import statistics, sys
path, rounds, secs, rows, build = sys.argv[1:]
runs = {}
for line in open(path):
    proxy, alone, during, mbs = line.split()
    runs.setdefault(proxy, []).append((float(alone), float(during), float(mbs)))
print()
print(f"pgbench -S -c 1 (the bystander), {secs} s alone and {secs} s while another client streams")
print(f"COPY TO STDOUT of {int(rows):,} rows of 1,000 bytes through the same proxy; medians of {rounds}")
print(f"rounds; transaction mode, one proxy thread each; pgswitch: {build}")
print()
print(f"{'proxy':10} {'alone ms':>9} {'during ms':>10} {'during/alone':>13} {'COPY MB/s':>10}")
for proxy in ("pgbouncer", "pgswitch"):
    r = runs.get(proxy, [])
    if not r:
        continue
    med = lambda i: statistics.median(x[i] for x in r)
    ratio = statistics.median(x[1] / x[0] for x in r)
    print(f"{proxy:10} {med(0):9.3f} {med(1):10.3f} {ratio:13.2f} {med(2):10.0f}")
EOF
