#!/usr/bin/env bash
# Instructions per transaction: PgBouncer vs pgswitch under valgrind's callgrind, transaction pooling.
#
#   bash benches/instructions.sh                     # ~2 minutes
#   BENCH_TOP=15 bash benches/instructions.sh        # also pgswitch's 15 costliest functions per mode
#   BENCH_CLIENTS="1 10" bash benches/instructions.sh   # add the reproducible one-client row, ~3 min
#   BENCH_SKIP_BUILD=1 BENCH_MODES=simple BENCH_REPEAT=1 bash benches/instructions.sh  # ~40 s
#
# What it measures: user-space instructions the proxy process executes (callgrind's Ir, all
# threads, shared libraries included) per pgbench -S transaction. Timings on this shared 2-core
# machine move by 10-20% from run to run; instruction counts do not depend on CPU speed, cache
# state or what else runs, so a change in the relay path's work shows here when benches/pgbench.sh
# cannot see it. Instructions are not time: syscall entry/exit and kernel work, cache and TLB
# misses, branch mispredictions and lock contention are not in them, so this complements
# benches/pgbench.sh (TPS and CPU time), it does not replace it.
#
# What is not deterministic: with several clients, how many requests the proxy finds per
# event-loop wakeup depends on scheduling, and each wakeup costs ~800 (PgBouncer) to ~1,100
# (pgswitch) instructions of event loop and readiness bookkeeping. At -c 10 the count therefore
# moves by up to ~10% between repetitions; the table shows the median and range of BENCH_REPEAT
# repetitions and the epoll_wait calls per transaction that explain them. At -c 1 there is one
# request in flight, no batching, and the count repeats to within ~2% (PgBouncer's to a few
# instructions; pgswitch's periodic health-check query lands in one run or the other). Under
# valgrind the proxy runs ~50x slower than natively, so at -c 10 it batches more than it would at
# full speed: per-wakeup costs weigh less here than in real life.
#
# Method: each proxy in turn runs under `valgrind --tool=callgrind`. For each mode and client
# count: a warm-up pgbench run (fills the server pool), then BENCH_REPEAT times: callgrind_control
# zeroes the counters, pgbench runs -t T per client, callgrind_control dumps (Ir1); zero, -t 3T,
# dump (Ir3). Both runs log in the same clients (PgBouncer computes PBKDF2 for each SCRAM login,
# ~70M instructions, which would swamp a single run), so the difference is transactions only:
# instructions/tx = (Ir3 - Ir1) / (2 * clients * T). Timer-driven background work (PgBouncer's
# janitor, pgswitch's health checks) also lands in the difference in proportion to the extra run
# time; it is small next to the relay path.
#
# Environment (all optional):
#   BENCH_MODES         pgbench -M modes, default "simple extended prepared"; PgBouncer 1.18 in
#                       transaction mode cannot run -M prepared, so that row is n/a for it
#   BENCH_CLIENTS       client counts, default "10" ("1" is the reproducible one, see above)
#   BENCH_TX            T, transactions per client in the short run (the long one is 3T), default 300
#   BENCH_REPEAT        (T, 3T) pairs per mode and client count, median reported, default 3
#   BENCH_TOP=N         print pgswitch's top N functions by self cost per transaction (per mode and
#                       client count, from the difference of the 3T and T dumps of the median pair)
#   BENCH_POOL_SIZE     server pool size of both proxies, default 20
#   BENCH_SCALE         pgbench -i scale, default 10
#   BENCH_WORKERS       pgswitch worker threads (config key workers), default 1, like PgBouncer
#   BENCH_SERVER_SOCKET=1  both proxies reach PostgreSQL over its Unix-domain socket
#   BENCH_SKIP_BUILD=1  use the existing target/release/pgswitch
#   BENCH_SW_SETTINGS   more top-level pgswitch settings, one "key = value" per line (e.g.
#                       'idle_transaction_timeout_ms = 60000'), to see what a setting costs
#   BENCH_PGO=1         the profile-guided build, target/pgo/release/pgswitch (scripts/build-pgo.sh)
#   BENCH_KEEP=1        keep the temporary directory (logs, callgrind dumps) after the run
#
# Run time: ~2 minutes with the defaults on 2 cores, about half of it PgBouncer's SCRAM logins
# under valgrind (20 per repetition, ~70M instructions each); pgswitch's pairs take ~5 s each.
#
# Needs root (it runs PostgreSQL and PgBouncer as the postgres user via setpriv), PostgreSQL 15
# server binaries, pgbench, psql and python3; installs valgrind and pgbouncer from apt when
# missing. Everything listens on 127.0.0.1 on free ports; every process it starts is stopped by
# PID on exit. Authentication is scram-sha-256 everywhere, like benches/pgbench.sh. The callgrind
# dumps and vgdb's FIFOs stay in the temporary directory (--vgdb-prefix), so callgrind_control
# never talks to anyone else's valgrind.
set -euo pipefail

MODES=${BENCH_MODES:-"simple extended prepared"}
CLIENTS=${BENCH_CLIENTS:-10}
TX=${BENCH_TX:-300}
TOP=${BENCH_TOP:-0}
REPEAT=${BENCH_REPEAT:-3}
POOL=${BENCH_POOL_SIZE:-20}
SCALE=${BENCH_SCALE:-10}
STARTED=$(date +%s)

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_root

# ---- prerequisites ----------------------------------------------------------------------------
command -v pgbouncer >/dev/null || apt_install pgbouncer
command -v callgrind_control >/dev/null || apt_install valgrind
build_pgswitch

# ---- temp dir, ports, cleanup -----------------------------------------------------------------
make_workdir pgswitch-instr
# callgrind dumps and vgdb's FIFOs: written by both root (pgswitch) and postgres (PgBouncer).
# Our own vgdb prefix keeps callgrind_control away from anyone else's valgrind runs.
mkdir "$WORK/cg"
chown postgres: "$WORK/cg"
chmod 1777 "$WORK/cg"
VGDB_PREFIX=$WORK/cg/vgdb-pipe
PROXY_STOP_SECONDS=30 # valgrind writes its final dump on the way out (the exit trap and stop_proxy)
pick_free_ports

# ---- PostgreSQL -------------------------------------------------------------------------------
start_postgres
create_bench_db

# ---- the proxies under callgrind --------------------------------------------------------------
# valgrind keeps the PID of the program it runs, so PGB_PID / SW_PID are the valgrind processes.
VALGRIND=(valgrind --tool=callgrind --compress-strings=no --compress-pos=no
    --vgdb=yes --vgdb-prefix="$VGDB_PREFIX")
PROXY_START_SECONDS=90 # valgrind's start and PgBouncer's SCRAM under valgrind are slow
stop_proxy() { stop_pids TERM "$PROXY_STOP_SECONDS" "$1"; } # pid

# cg_control PROXY PID ARG: callgrind_control must run as the valgrind process' user, or vgdb hangs.
cg_control() {
    local run=()
    [ "$1" = pgbouncer ] && run=("${AS_POSTGRES[@]}")
    if ! timeout 60 "${run[@]}" callgrind_control --vgdb-prefix="$VGDB_PREFIX" "$3" "$2" \
        >>"$WORK/callgrind_control.log" 2>&1; then
        log "callgrind_control $3 $2 ($1) failed or timed out; see $WORK/callgrind_control.log"
        return 1
    fi
}

# The callgrind dump parser, shared by dump() and the report.
cat >"$WORK/cg.py" <<'EOF'
"""Callgrind dumps (--compress-strings=no --compress-pos=no): totals, epoll_wait calls, self costs."""
import collections, re, statistics, sys

HASH = re.compile(r"::h[0-9a-f]{16}$")  # Rust's legacy mangling hash


def parse(path):
    """(total Ir, calls of epoll_wait, Counter of self Ir per function name) of one dump.

    A cost line after a calls= line is the inclusive cost of that call (the callee's), every
    other cost line of an fn= block is the function's own."""
    summary = totals = None
    epoll = 0
    costs = collections.Counter()
    fn, cfn, after_calls = None, None, False
    with open(path, errors="replace") as f:
        for line in f:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                if after_calls:
                    after_calls = False
                elif fn is not None:
                    parts = line.split()
                    if len(parts) >= 2:
                        costs[fn] += int(parts[1])
            elif line.startswith("fn="):
                fn, after_calls = HASH.sub("", line[3:].rstrip("\n")), False
            elif line.startswith("cfn="):
                cfn = line[4:].rstrip("\n")
            elif line.startswith("calls="):
                after_calls = True
                if cfn == "epoll_wait":
                    epoll += int(line[6:].split()[0])
            elif line.startswith("summary:"):
                summary = int(line.split()[1])
            elif line.startswith("totals:"):
                totals = int(line.split()[1])
    total = summary if summary is not None else totals
    if total is None:
        raise SystemExit(f"{path}: no summary: or totals: line")
    return total, epoll, costs


def fmt(v, digits=0):
    return "n/a" if v is None else f"{v:,.{digits}f}"


def report(results, modes, clients, tx, top, cgdir):
    # results.tsv: proxy mode clients rep status ir1 ir3 epoll1 epoll3
    rows = collections.defaultdict(list)
    na, failed = set(), set()
    for line in open(results):
        proxy, mode, c, rep, status, *vals = line.rstrip("\n").split("\t")
        if status == "ok":
            ir1, ir3, ep1, ep3 = map(int, vals)
            n = 2 * int(c) * tx
            rows[(proxy, mode, c)].append((int(rep), (ir3 - ir1) / n, (ep3 - ep1) / n))
        else:
            na.add((proxy, mode, c))
            if status == "fail":
                failed.add(f"{proxy} -M {mode} -c {c}")

    def stats(key):
        r = rows.get(key)
        if not r or key in na:
            return None, None, None, None
        per_tx = [x[1] for x in r]
        return (statistics.median(per_tx), min(per_tx), max(per_tx),
                statistics.median(x[2] for x in r))

    hdr = (f"{'mode':<9} {'clients':>7} | {'pgbouncer instr/tx':>18} {'(min-max)':>15} | "
           f"{'pgswitch instr/tx':>17} {'(min-max)':>15} | {'pgswitch/pgbouncer':>18} | "
           f"{'epoll_wait/tx pgb':>17} {'sw':>5}")
    print(hdr)
    print("-" * len(hdr))
    for mode in modes:
        for c in clients:
            b, bmin, bmax, bep = stats(("pgbouncer", mode, c))
            s, smin, smax, sep = stats(("pgswitch", mode, c))
            rng = lambda lo, hi: "" if lo is None else f"({fmt(lo)}-{fmt(hi)})"
            ratio = s / b if b and s is not None else None
            print(f"{mode:<9} {c:>7} | {fmt(b):>18} {rng(bmin, bmax):>15} | {fmt(s):>17} "
                  f"{rng(smin, smax):>15} | {fmt(ratio, 2):>18} | {fmt(bep, 2):>17} {fmt(sep, 2):>5}")
    if failed:
        print("failed (n/a; the pgbench.* and callgrind_control logs are kept with BENCH_KEEP=1): "
              + ", ".join(sorted(failed)))

    if top <= 0:
        return
    for mode in modes:
        for c in clients:
            r = rows.get(("pgswitch", mode, c))
            if not r:
                continue
            med = statistics.median_low(x[1] for x in r)
            rep = next(x[0] for x in r if x[1] == med)
            base = f"{cgdir}/dump.pgswitch.{mode}.{c}.r{rep}"
            _, _, c1 = parse(base + ".t1")
            _, _, c3 = parse(base + ".t3")
            n = 2 * int(c) * tx
            diff = {fn: (c3[fn] - c1.get(fn, 0)) / n for fn in c3.keys() | c1.keys()}
            total = sum(diff.values())
            print()
            print(f"pgswitch -M {mode} -c {c}: top {top} functions by self instructions per transaction")
            print(f"(repetition {rep}, the median: self Ir of the -t {3 * tx} dump minus the -t {tx} dump,"
                  f" / (2 x {c} x {tx}); share of all)")
            for fn, v in sorted(diff.items(), key=lambda kv: -kv[1])[:top]:
                name = fn if len(fn) <= 140 else fn[:137] + "..."
                print(f"{v:>9,.0f} {100 * v / total if total else 0:>5.1f}%  {name}")
            print(f"{total:>9,.0f} 100.0%  (all functions)")


if __name__ == "__main__":
    if sys.argv[1] == "stats":  # stats DUMP -> "Ir epoll_wait_calls"
        total, epoll, _ = parse(sys.argv[2])
        print(total, epoll)
    else:  # report RESULTS MODES CLIENTS TX TOP CGDIR
        report(sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), int(sys.argv[5]),
               int(sys.argv[6]), sys.argv[7])
EOF

# dump PROXY PID DEST: dump the counters into DEST, print "Ir epoll_wait_calls" of it.
dump() {
    local f=""
    rm -f "$WORK/cg/cg.$1.$2".*
    cg_control "$1" "$2" -d || return 1
    for _ in $(seq 100); do # callgrind_control returns after the dump; tolerate a slow file system
        f=$(find "$WORK/cg" -maxdepth 1 -name "cg.$1.$2.*" -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
        [ -n "$f" ] && grep -qE '^(summary|totals):' "$f" && break
        sleep 0.1
    done
    [ -n "$f" ] || { log "no callgrind dump from $1 ($2)"; return 1; }
    mv "$f" "$3"
    python3 "$WORK/cg.py" stats "$3"
}

# pgbench_run PORT MODE CLIENTS TX LABEL: fails on a non-zero exit, an error or missing transactions.
pgbench_run() {
    local out=$WORK/pgbench.$5 done_tx
    if ! pgbench -h 127.0.0.1 -p "$1" -U app -n -S -M "$2" -c "$3" -j 2 -t "$4" bench >"$out.out" 2>"$out.err" ||
        grep -qiE 'aborted|error' "$out.out" "$out.err"; then
        log "  pgbench $5 failed: $(grep -h -m1 -iE 'error|aborted|fatal' "$out.err" "$out.out" | head -1 | cut -c1-200)"
        return 1
    fi
    done_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out.out")
    [ "$done_tx" = $(($3 * $4)) ] || { log "  pgbench $5: processed $done_tx of $(($3 * $4))"; return 1; }
}

RESULTS=$WORK/results.tsv # proxy mode clients rep status ir1 ir3 epoll1 epoll3
: >"$RESULTS"

measure() { # PROXY PORT PID
    local proxy=$1 port=$2 pid=$3 mode c rep label s1 s3 ir1 ir3 ep1 ep3
    for mode in $MODES; do
        for c in $CLIENTS; do
            if [ "$proxy" = pgbouncer ] && [ "$mode" = prepared ]; then
                printf '%s\t%s\t%s\t0\tna\n' "$proxy" "$mode" "$c" >>"$RESULTS"
                continue
            fi
            log "  $proxy -M $mode -c $c: warm-up, then $REPEAT x (-t $TX, -t $((3 * TX)))"
            if ! pgbench_run "$port" "$mode" "$c" 100 "$proxy.$mode.$c.warmup"; then
                printf '%s\t%s\t%s\t0\tfail\n' "$proxy" "$mode" "$c" >>"$RESULTS"
                continue
            fi
            for rep in $(seq "$REPEAT"); do
                label=$proxy.$mode.$c.r$rep
                if cg_control "$proxy" "$pid" -z && pgbench_run "$port" "$mode" "$c" "$TX" "$label.t1" &&
                    s1=$(dump "$proxy" "$pid" "$WORK/cg/dump.$label.t1") &&
                    cg_control "$proxy" "$pid" -z && pgbench_run "$port" "$mode" "$c" $((3 * TX)) "$label.t3" &&
                    s3=$(dump "$proxy" "$pid" "$WORK/cg/dump.$label.t3"); then
                    read -r ir1 ep1 <<<"$s1"
                    read -r ir3 ep3 <<<"$s3"
                    log "    $(awk -v i1="$ir1" -v i3="$ir3" -v e1="$ep1" -v e3="$ep3" -v n=$((2 * c * TX)) 'BEGIN {
                        printf "Ir(T) %.0f, Ir(3T) %.0f: %.0f instructions/tx, %.2f epoll_wait/tx", i1, i3, (i3 - i1) / n, (e3 - e1) / n }')"
                    printf '%s\t%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\n' "$proxy" "$mode" "$c" "$rep" \
                        "$ir1" "$ir3" "$ep1" "$ep3" >>"$RESULTS"
                else
                    printf '%s\t%s\t%s\t%s\tfail\n' "$proxy" "$mode" "$c" "$rep" >>"$RESULTS"
                fi
            done
        done
    done
}

log "PgBouncer ($(pgbouncer --version | head -1)) under callgrind on port $PGB_PORT"
start_pgbouncer "${VALGRIND[@]}" --callgrind-out-file="$WORK/cg/cg.pgbouncer.%p"
measure pgbouncer "$PGB_PORT" "$PGB_PID"
stop_proxy "$PGB_PID"
PGB_PID=""

log "pgswitch under callgrind on port $SW_PORT"
start_pgswitch "${VALGRIND[@]}" --callgrind-out-file="$WORK/cg/cg.pgswitch.%p"
measure pgswitch "$SW_PORT" "$SW_PID"
stop_proxy "$SW_PID"
SW_PID=""

# ---- report -----------------------------------------------------------------------------------
echo
echo "pgbench -S through each proxy under callgrind: user-space instructions per transaction,"
echo "(Ir of a -t $((3 * TX)) run - Ir of a -t $TX run) / (2 x clients x $TX), median (min-max) of $REPEAT"
echo "repetitions; epoll_wait/tx: event-loop wakeups per transaction (median), the main cause of the"
echo "spread at several clients. Transaction mode, pool size $POOL, scram-sha-256, -j 2, scale $SCALE,"
echo "pgswitch workers = ${BENCH_WORKERS:-1}; binary: $PGSWITCH_BUILD."
echo
python3 "$WORK/cg.py" report "$RESULTS" "$MODES" "$CLIENTS" "$TX" "$TOP" "$WORK/cg"

if grep -qE 'WARN|ERROR' "$WORK/pgswitch.log" 2>/dev/null; then
    echo
    echo "pgswitch log: $(grep -cE 'WARN|ERROR' "$WORK/pgswitch.log") warnings/errors, the first 5:"
    grep -E 'WARN|ERROR' "$WORK/pgswitch.log" | head -5
fi
echo
echo "run time: $(($(date +%s) - STARTED)) s"
