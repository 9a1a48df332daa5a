#!/usr/bin/env bash
# pgbench: direct PostgreSQL (A) vs the floor forwarder (F) vs PgBouncer (B) vs pgswitch (C),
# transaction pooling.
#
#   bash benches/pgbench.sh                      # default: 10 s per run, ~10 minutes
#   BENCH_SECONDS=3 bash benches/pgbench.sh      # ~3.5 minutes (48 pgbench runs + idle test)
#   BENCH_SECONDS=3 BENCH_ROUNDS=1 bash benches/pgbench.sh   # quick look, ~1.5 minutes
#
# Environment (all optional):
#   BENCH_SECONDS       duration of each pgbench run (-T), default 10
#   BENCH_ROUNDS        interleaved rounds A F B C A F B C ..., default 3
#   BENCH_CLIENTS       client counts, default "10 100"
#   BENCH_MODES         pgbench -M modes, default "simple extended prepared"
#   BENCH_POOL_SIZE     server pool size of both proxies, default 20
#   BENCH_SCALE         pgbench -i scale, default 10
#   BENCH_IDLE_CLIENTS  idle clients opened through each proxy, default 2000 (0 skips)
#   BENCH_WORKERS       pgswitch worker threads (config key workers), default 1, like PgBouncer
#   BENCH_SERVER_SOCKET=1  both proxies reach PostgreSQL over its Unix-domain socket (pgbench
#                       still connects to all three over TCP)
#   BENCH_FLOOR=0       skip the floor: examples/forward.rs, a 1:1 byte forwarder with no pooling
#                       or parsing (one epoll thread; TCP to PostgreSQL, so skipped with
#                       BENCH_SERVER_SOCKET=1), the most TPS a proxy reaches here without pooling
#   BENCH_SW_SETTINGS   more top-level pgswitch settings, one "key = value" per line (e.g.
#                       'idle_transaction_timeout_ms = 60000'), to see what a setting costs
#   BENCH_PGO=1         run the profile-guided build, target/pgo/release/pgswitch (built first by
#                       scripts/build-pgo.sh, ~10 min, unless BENCH_SKIP_BUILD=1)
#   BENCH_SKIP_BUILD=1  use the existing target/release/pgswitch (and examples/forward)
#   BENCH_KEEP=1        keep the temporary directory (logs) after the run
#
# Needs root (it runs PostgreSQL and PgBouncer as the postgres user via setpriv), PostgreSQL 15
# server binaries, pgbench, psql and python3 with psycopg 3; installs pgbouncer from apt and
# psycopg from PyPI when missing. Everything listens on 127.0.0.1 on free ports; every process it
# starts is stopped by PID on exit. Authentication is scram-sha-256 everywhere (PostgreSQL's host
# connections, PgBouncer's and pgswitch's client auth), so all three pay the same login cost.
set -euo pipefail

SECS=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
CLIENTS=${BENCH_CLIENTS:-"10 100"}
MODES=${BENCH_MODES:-"simple extended prepared"}
POOL=${BENCH_POOL_SIZE:-20}
SCALE=${BENCH_SCALE:-10}
IDLE=${BENCH_IDLE_CLIENTS:-2000}
FLOOR=${BENCH_FLOOR:-1}
[ "${BENCH_SERVER_SOCKET:-0}" = 1 ] && FLOOR=0

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_root

# ---- prerequisites ----------------------------------------------------------------------------
command -v pgbouncer >/dev/null || apt_install pgbouncer
if ! python3 -c 'import psycopg' 2>/dev/null; then
    log "installing psycopg"
    python3 -m pip install -q "psycopg[binary]"
fi
if [ "$FLOOR" = 1 ]; then build_pgswitch --example forward; else build_pgswitch; fi
FORWARD_BIN=$ROOT/target/release/examples/forward
[ "$FLOOR" = 0 ] || [ -x "$FORWARD_BIN" ] || { echo "no $FORWARD_BIN (cargo build --release --example forward)" >&2; exit 1; }

# ---- temp dir, ports, cleanup -----------------------------------------------------------------
make_workdir pgswitch-bench
pick_free_ports

# ---- PostgreSQL, the proxies ------------------------------------------------------------------
start_postgres
create_bench_db
# shellcheck disable=SC2119 # both run natively here: no wrapper command
start_proxies() { start_pgbouncer; start_pgswitch; }
log "starting PgBouncer ($(pgbouncer --version | head -1)) on $PGB_PORT and pgswitch on $SW_PORT, both reaching PostgreSQL at $(server_host)"
start_proxies
if [ "$FLOOR" = 1 ]; then
    "$FORWARD_BIN" "$FWD_PORT" "$PG_PORT" >"$WORK/forward.log" 2>&1 &
    FWD_PID=$!
    wait_sql "$FWD_PORT" forward "$FWD_PID"
    log "floor forwarder on $FWD_PORT"
fi
CLK_TCK=$(getconf CLK_TCK)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${LOAD_START%% *}" 'BEGIN { exit !(l > 1.5) }'; then
    log "WARNING: load average is $LOAD_START before the runs: something else is using the CPUs, numbers will be noisy"
fi

# ---- pgbench runs -----------------------------------------------------------------------------
cpu_ticks() { # pid -> "utime+stime utime" of the whole process (all threads)
    local f
    read -r -a f <"/proc/$1/stat" || { echo 0 0; return; }
    echo $((f[13] + f[14])) "${f[13]}"
}

RESULTS=$WORK/results.tsv # round target mode clients status tps cpu_us_per_tx user_us_per_tx
: >"$RESULTS"
declare -A BROKEN=()
RUN=0

# run_one TARGET PORT PID MODE CLIENTS ROUND
run_one() {
    local target=$1 port=$2 pid=$3 mode=$4 clients=$5 round=$6
    local key="$target/$mode/$clients"
    if [ -n "${BROKEN[$key]:-}" ]; then
        printf '%s\t%s\t%s\t%s\tskip\t\t\t\n' "$round" "$target" "$mode" "$clients" >>"$RESULTS"
        return
    fi
    RUN=$((RUN + 1))
    local out=$WORK/run.$RUN.$target.$mode.$clients
    local samples=$out.cpu
    local log_lines=0
    [ "$target" = pgswitch ] && log_lines=$(wc -l <"$WORK/pgswitch.log")
    : >"$samples"
    set +e
    pgbench -h 127.0.0.1 -p "$port" -U app -n -S -M "$mode" -c "$clients" -j 2 -T "$SECS" -P 1 bench \
        2>&1 >"$out.out" | while IFS= read -r line; do
            printf '%s\n' "$line" >>"$out.err"
            case $line in
            progress:*) printf '%s %s\n' "$(if [ -n "$pid" ]; then cpu_ticks "$pid"; else echo 0 0; fi)" "$line" >>"$samples" ;;
            esac
        done
    local rc=${PIPESTATUS[0]}
    set -e
    local tps
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$out.out")
    if [ "$rc" != 0 ] || [ -z "$tps" ] || grep -qiE 'aborted|error' "$out.err" "$out.out" 2>/dev/null; then
        BROKEN[$key]=1
        local why
        why=$(grep -h -m1 -iE 'error|aborted|fatal' "$out.err" "$out.out" 2>/dev/null | head -1 | cut -c1-200 || true)
        log "  $target -M $mode -c $clients: FAILED (rc $rc): ${why:-see $out.*}"
        printf '%s\t%s\t%s\t%s\tfail\t\t\t\n' "$round" "$target" "$mode" "$clients" >>"$RESULTS"
        [ "$target" = pgbouncer ] || printf '%s\n' "$target -M $mode -c $clients round $round: rc $rc: $why" >>"$WORK/failures.txt"
        return
    fi
    local cpu user stall
    read -r cpu user stall < <(python3 - "$samples" "$CLK_TCK" "$pid" <<'EOF'
import statistics, sys
rows = []
for line in open(sys.argv[1]):
    parts = line.split()
    # "<ticks> <user ticks> progress: 2.0 s, 12345.6 tps, lat ..."
    try:
        rows.append((int(parts[0]), int(parts[1]), float(parts[3]), float(parts[5])))
    except (IndexError, ValueError):
        pass
cpu = user = "-"
if sys.argv[3] and len(rows) >= 2:
    ticks = rows[-1][0] - rows[0][0]
    uticks = rows[-1][1] - rows[0][1]
    txns = sum(tps * (t - rows[i][2]) for i, (_, _, t, tps) in enumerate(rows[1:]))
    if txns > 0:
        cpu = f"{ticks * 1e6 / int(sys.argv[2]) / txns:.2f}"
        user = f"{uticks * 1e6 / int(sys.argv[2]) / txns:.2f}"
# A stall: a 1 s interval (after the first) below a third of the run's median rate.
stall = ""
rates = [r[3] for r in rows[1:]]
if rates:
    med = statistics.median(rates)
    low = [(t, tps) for _, _, t, tps in rows[1:] if tps < med / 3]
    if low:
        stall = "stall:" + ",".join(f"{tps:.0f}tps@{t:.0f}s" for t, tps in low) + f"(median:{med:.0f})"
print(cpu, user, stall)
EOF
)
    [ "$cpu" = - ] && cpu=
    [ "$user" = - ] && user=
    [ -n "$stall" ] && {
        log "    $target -M $mode -c $clients round $round: $stall"
        printf '%s -M %s -c %s round %s: %s\n' "$target" "$mode" "$clients" "$round" "$stall" >>"$WORK/stalls.txt"
    }
    log "  $target -M $mode -c $clients: $tps tps${cpu:+, $cpu us proxy CPU/tx ($user user)} (load $(cut -d' ' -f1 /proc/loadavg))"
    if [ "$target" = pgswitch ]; then
        local warns
        warns=$(tail -n +$((log_lines + 1)) "$WORK/pgswitch.log" | grep -E 'WARN|ERROR' || true)
        if [ -n "$warns" ]; then
            log "    pgswitch logged $(printf '%s\n' "$warns" | wc -l) warnings during this run, e.g.: $(printf '%s\n' "$warns" | head -1 | cut -c1-200)"
            printf 'round %s -M %s -c %s: %s\n' "$round" "$mode" "$clients" "$(printf '%s\n' "$warns" | sed 's/^[^ ]* *//' | sort | uniq -c | tr -s ' ' | paste -sd';')" >>"$WORK/sw-warnings.txt"
        fi
    fi
    printf '%s\t%s\t%s\t%s\tok\t%s\t%s\t%s\n' "$round" "$target" "$mode" "$clients" "$tps" "$cpu" "$user" >>"$RESULTS"
}

for round in $(seq "$ROUNDS"); do
    log "round $round of $ROUNDS (${SECS}s per run)"
    for mode in $MODES; do
        for c in $CLIENTS; do
            run_one direct "$PG_PORT" "" "$mode" "$c" "$round"
            [ "$FLOOR" = 0 ] || run_one floor "$FWD_PORT" "$FWD_PID" "$mode" "$c" "$round"
            run_one pgbouncer "$PGB_PORT" "$PGB_PID" "$mode" "$c" "$round"
            run_one pgswitch "$SW_PORT" "$SW_PID" "$mode" "$c" "$round"
        done
    done
done

# ---- idle clients -----------------------------------------------------------------------------
IDLE_RESULTS=$WORK/idle.txt
: >"$IDLE_RESULTS"
if [ "$IDLE" -gt 0 ]; then
    log "restarting both proxies for the idle-client test"
    stop_pids TERM 10 "$PGB_PID"
    stop_pids TERM 10 "$SW_PID"
    start_proxies
    for t in pgbouncer pgswitch; do
        if [ $t = pgbouncer ]; then port=$PGB_PORT pid=$PGB_PID; else port=$SW_PORT pid=$SW_PID; fi
        log "  $IDLE idle clients through $t"
        if ! python3 "$ROOT/benches/idle_memory.py" --port "$port" --pid "$pid" --clients "$IDLE" \
            --label "$t" >>"$IDLE_RESULTS" 2>"$WORK/idle.$t.err"; then
            log "  $t: idle test failed: $(tail -1 "$WORK/idle.$t.err")"
            printf 'idle %s FAILED: %s\n' "$t" "$(tail -1 "$WORK/idle.$t.err")" >>"$IDLE_RESULTS"
        fi
    done
fi

# ---- report -----------------------------------------------------------------------------------
python3 - "$RESULTS" "$IDLE_RESULTS" <<EOF
import statistics, sys
from collections import defaultdict

tps = defaultdict(list); cpu = defaultdict(list); user = defaultdict(list); failed = set()
for line in open(sys.argv[1]):
    rnd, target, mode, clients, status, t, c, u = line.rstrip("\n").split("\t")
    key = (mode, int(clients), target)
    if status == "fail":
        failed.add(key)
    elif status == "ok":
        tps[key].append(float(t))
        if c:
            cpu[key].append(float(c))
        if u:
            user[key].append(float(u))

def med(d, key):
    v = d.get(key)
    return statistics.median(v) if v and key not in failed else None

def f(v, fmt):
    width = int(fmt.lstrip(">").split(".")[0])
    return format("n/a" if v is None else format(v, fmt.lstrip(">")), f">{width}")

print()
print("pgbench -S, $SECS s per run, $ROUNDS rounds interleaved (direct, floor, pgbouncer, pgswitch), median TPS;")
print("pool size $POOL on both proxies, transaction mode, scram-sha-256, -j 2, scale $SCALE;")
print("pgswitch: $PGSWITCH_BUILD;")
print("load average before the runs: $LOAD_START (2 cores: above ~1.5 means other work shared the CPUs); after: $(cut -d' ' -f1-3 /proc/loadavg) (includes the benchmark)")
print()
floor = "$FLOOR" == "1"
hdr = f"{'mode':<9} {'clients':>7} {'direct':>9} {'pgbouncer':>9} {'pgswitch':>9} {'sw/pgb':>7} {'sw/direct':>9} {'pgb_us/tx':>9} {'sw_us/tx':>9} {'pgb_user':>8} {'sw_user':>8}"
if floor:
    hdr += f" {'floor':>9} {'fl/direct':>9} {'sw/floor':>8} {'fl_us/tx':>8}"
print(hdr); print("-" * len(hdr))
for mode in "$MODES".split():
    for clients in [int(c) for c in "$CLIENTS".split()]:
        d, b, s = (med(tps, (mode, clients, t)) for t in ("direct", "pgbouncer", "pgswitch"))
        cb, cs = med(cpu, (mode, clients, "pgbouncer")), med(cpu, (mode, clients, "pgswitch"))
        ub, us = med(user, (mode, clients, "pgbouncer")), med(user, (mode, clients, "pgswitch"))
        r1 = s / b if s and b else None
        r2 = s / d if s and d else None
        row = f"{mode:<9} {clients:>7} {f(d, '9.0f')} {f(b, '>9.0f')} {f(s, '>9.0f')} {f(r1, '>7.2f')} {f(r2, '>9.2f')} {f(cb, '>9.1f')} {f(cs, '>9.1f')} {f(ub, '>8.1f')} {f(us, '>8.1f')}"
        if floor:
            fl, cf = med(tps, (mode, clients, "floor")), med(cpu, (mode, clients, "floor"))
            r3 = fl / d if fl and d else None
            r4 = s / fl if s and fl else None
            row += f" {f(fl, '>9.0f')} {f(r3, '>9.2f')} {f(r4, '>8.2f')} {f(cf, '>8.1f')}"
        print(row)
print()
print("us/tx = microseconds of proxy CPU (utime+stime, all threads) per transaction, median over rounds,")
print("measured from pgbench's 1 s progress reports after the first one (connection setup excluded);")
print("_user = its utime part alone (the proxy's own code; the rest is the kernel's socket work).")
if floor:
    print("floor = examples/forward.rs: each client gets its own PostgreSQL connection, bytes copied both ways")
    print("by one epoll thread, no parsing: the two reads and two writes any proxy needs per transaction and")
    print("nothing else. Without pooling it is the most a proxy reaches on this machine; pooling (100 clients")
    print("over $POOL servers) is where a proxy can beat it.")
if failed:
    print("failed (n/a): " + ", ".join(f"{t} -M {m} -c {c}" for m, c, t in sorted(failed)))
idle = [l.strip() for l in open(sys.argv[2]) if l.strip()]
if idle:
    print()
    print(f"{'idle clients':<12} {'proxy':<9} {'RSS before':>11} {'RSS after':>11} {'KiB/client':>10}")
    for l in idle:
        p = l.split()
        if "FAILED" in l:
            print(f"{'':<12} {p[1]:<9} {l}")
            continue
        kv = dict(x.split("=", 1) for x in p[2:])
        print(f"{kv['clients']:<12} {p[1]:<9} {kv['rss_before_kib']+' KiB':>11} {kv['rss_after_kib']+' KiB':>11} {float(kv['kib_per_client']):>10.2f}")
EOF

if [ -s "$WORK/stalls.txt" ]; then
    echo
    echo "stalls (a 1 s pgbench progress interval below a third of the run's median TPS):"
    cat "$WORK/stalls.txt"
fi
if [ -s "$WORK/failures.txt" ]; then
    echo
    echo "failures (direct, floor, pgswitch):"
    cat "$WORK/failures.txt"
fi
if [ -s "$WORK/sw-warnings.txt" ]; then
    echo
    echo "pgswitch warnings during pgbench runs (count x message):"
    cat "$WORK/sw-warnings.txt"
fi
if grep -qE 'WARN|ERROR' "$WORK/pgswitch.log" 2>/dev/null; then
    echo
    echo "pgswitch log: $(grep -cE 'WARN|ERROR' "$WORK/pgswitch.log") warnings/errors, the first 10:"
    grep -E 'WARN|ERROR' "$WORK/pgswitch.log" | head -10
fi
