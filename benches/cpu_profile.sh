#!/usr/bin/env bash
# Where each proxy's CPU per transaction goes: PgBouncer vs pgswitch under pgbench -S, transaction
# pooling, sampled with perf (kernel and user space), side by side.
#
#   bash benches/cpu_profile.sh                                  # simple, 10 clients, ~2 minutes
#   BENCH_MODES="simple extended" BENCH_ROUNDS=3 bash benches/cpu_profile.sh
#   BENCH_TOP=20 BENCH_SKIP_BUILD=1 bash benches/cpu_profile.sh  # + each proxy's 20 costliest symbols
#
# What it prints, per proxy, mode and client count (median over rounds): TPS; the proxy's CPU per
# transaction (perf stat's task-clock, all threads); its user-space and kernel parts (the share of
# perf record's samples in user and in kernel code); the part spent in the scheduler's
# context-switch path (samples in finish_task_switch and in _raw_spin_unlock_irqrestore, where a
# virtual machine's timer samples of a switch land once interrupts are enabled again); and context
# switches per transaction. benches/pgbench.sh measures TPS and CPU over more cases;
# benches/instructions.sh counts user-space instructions exactly. This one says which side of the
# system-call boundary a difference between the two proxies is on.
#
# Method: one PostgreSQL, PgBouncer and pgswitch as in benches/pgbench.sh (common.sh). For each
# round, mode and client count, each proxy in turn: pgbench -S -T (SECONDS + 3) -P 1 through it;
# after 2 s, perf stat and perf record (cpu-clock, BENCH_FREQ Hz) attach to the proxy's PID for
# SECONDS; the transactions of that window are pgbench's per-second progress rates over it. perf
# record's sampling itself costs the proxy a little CPU, the same for both.
#
# Environment (all optional):
#   BENCH_SECONDS       profiled seconds per run, default 8
#   BENCH_ROUNDS        interleaved rounds (PgBouncer, pgswitch, ...), default 2
#   BENCH_CLIENTS       client counts, default "10"
#   BENCH_MODES         pgbench -M modes, default "simple" (PgBouncer 1.18 cannot run prepared)
#   BENCH_POOL_SIZE     server pool size of both proxies, default 20
#   BENCH_SCALE         pgbench -i scale, default 10
#   BENCH_FREQ          perf record sampling frequency, default 4000
#   BENCH_TOP=N         also print each proxy's top N symbols by samples (of the last round)
#   BENCH_WORKERS, BENCH_SERVER_SOCKET, BENCH_SW_SETTINGS, BENCH_PGO, BENCH_SKIP_BUILD, BENCH_KEEP:
#                       as in benches/pgbench.sh
#
# Needs root, PostgreSQL 15 server binaries, pgbench, psql and python3; installs pgbouncer and perf
# (linux-perf) from apt when missing. Everything listens on 127.0.0.1 on free ports; every process
# it starts is stopped by PID on exit.
set -euo pipefail

SECS=${BENCH_SECONDS:-8}
ROUNDS=${BENCH_ROUNDS:-2}
CLIENTS=${BENCH_CLIENTS:-"10"}
MODES=${BENCH_MODES:-"simple"}
POOL=${BENCH_POOL_SIZE:-20}
SCALE=${BENCH_SCALE:-10}
FREQ=${BENCH_FREQ:-4000}
TOP=${BENCH_TOP:-0}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_root
command -v pgbouncer >/dev/null || apt_install pgbouncer
command -v perf >/dev/null || apt_install linux-perf
build_pgswitch
make_workdir pgswitch-cpu
pick_free_ports
start_postgres
create_bench_db
log "PgBouncer on port $PGB_PORT, pgswitch on port $SW_PORT ($PGSWITCH_BUILD)"
start_pgbouncer
start_pgswitch

# The time (s), and the voluntary and involuntary context switches of all the process's threads
# so far.
switches() { # pid
    cat /proc/"$1"/task/*/status 2>/dev/null | awk -v now="$(date +%s.%N)" '
        /^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { n += $2 }
        END { print now, v, n }'
}

# One profiled run: writes $WORK/NAME.{pgbench,stat,data}.
profile() { # name port pid mode clients
    local name=$1 port=$2 pid=$3 mode=$4 clients=$5 bench stat
    pgbench -h 127.0.0.1 -p "$port" -U app -S -M "$mode" -c "$clients" -j 2 -T $((SECS + 3)) -P 1 \
        bench >"$WORK/$name.pgbench" 2>&1 &
    bench=$!
    sleep 2
    switches "$pid" >"$WORK/$name.switches"
    perf stat -x, -e task-clock,context-switches -p "$pid" -o "$WORK/$name.stat" -- sleep "$SECS" &
    stat=$!
    perf record -q -e cpu-clock -F "$FREQ" -p "$pid" -o "$WORK/$name.data" -- sleep "$SECS" \
        >/dev/null 2>&1
    wait "$stat"
    switches "$pid" >>"$WORK/$name.switches"
    wait "$bench" || { log "pgbench failed:"; tail -5 "$WORK/$name.pgbench" >&2; exit 1; }
    perf report -i "$WORK/$name.data" --sort sym --stdio 2>/dev/null >"$WORK/$name.report"
}

for round in $(seq "$ROUNDS"); do
    for mode in $MODES; do
        for c in $CLIENTS; do
            for proxy in pgbouncer pgswitch; do
                if [ $proxy = pgbouncer ]; then port=$PGB_PORT pid=$PGB_PID; else port=$SW_PORT pid=$SW_PID; fi
                log "round $round: $proxy -M $mode -c $c"
                profile "$proxy.$mode.$c.$round" "$port" "$pid" "$mode" "$c"
            done
        done
    done
done

WORK=$WORK SECS=$SECS ROUNDS=$ROUNDS MODES=$MODES CLIENTS=$CLIENTS TOP=$TOP BUILD=$PGSWITCH_BUILD \
    python3 - <<'EOF'
import os, re, statistics

work, secs, rounds = os.environ["WORK"], int(os.environ["SECS"]), int(os.environ["ROUNDS"])
SWITCH = {"finish_task_switch.isra.0", "finish_task_switch", "_raw_spin_unlock_irqrestore"}

def run(name):
    # Transactions in the profiled window (seconds 2 .. 2 + secs of pgbench's progress).
    rates = [float(m.group(2)) for m in re.finditer(
        r"progress: ([\d.]+) s, ([\d.]+) tps", open(f"{work}/{name}.pgbench").read())]
    window = rates[2:2 + secs] or rates
    rate = statistics.mean(window)
    tx = rate * secs
    stat = {}
    for line in open(f"{work}/{name}.stat"):
        f = line.split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit():
            stat[f[2]] = float(f[0])
    cpu_us = stat["task-clock"] * 1000 / tx  # task-clock is in ms
    user = kernel = switch = 0.0
    for line in open(f"{work}/{name}.report"):
        m = re.match(r"\s+([\d.]+)%\s+\[(.)\]\s+(\S+)", line)
        if not m:
            continue
        share = float(m.group(1)) / 100
        if m.group(2) == "k":
            kernel += share
            if m.group(3) in SWITCH:
                switch += share
        else:
            user += share
    total = user + kernel or 1
    # /proc's counts span their own window, a little longer than perf's.
    (t0, v0, n0), (t1, v1, n1) = [map(float, l.split()) for l in open(f"{work}/{name}.switches")]
    proc_tx = rate * (t1 - t0)
    return dict(tps=rate, cpu=cpu_us, user=cpu_us * user / total,
                kernel=cpu_us * kernel / total, switch=cpu_us * switch / total,
                cs=stat["context-switches"] / tx, vol=(v1 - v0) / proc_tx,
                invol=(n1 - n0) / proc_tx)

print()
print(f"pgbench -S, {secs} s profiled per run, {rounds} round(s) interleaved, median per proxy;")
print(f"pgswitch: {os.environ['BUILD']}. us/tx = microseconds of the proxy's CPU per transaction")
print("(perf stat task-clock), split into user space and kernel by perf record's samples; switch =")
print("the kernel's context-switch path; cs/tx = context switches per transaction (perf stat), vol")
print("and invol = its voluntary (waiting for events) and involuntary (preempted) ones (/proc).")
print()
cols = ["tps", "cpu", "user", "kernel", "switch", "cs", "vol", "invol"]
head = f"{'mode':<9}{'clients':>7}  {'proxy':<10}" + "".join(
    f"{h:>10}" for h in ["TPS", "us/tx", "user", "kernel", "switch", "cs/tx", "vol", "invol"])
print(head)
print("-" * len(head))
for mode in os.environ["MODES"].split():
    for c in os.environ["CLIENTS"].split():
        med = {}
        for proxy in ["pgbouncer", "pgswitch"]:
            runs = [run(f"{proxy}.{mode}.{c}.{r}") for r in range(1, rounds + 1)]
            med[proxy] = {k: statistics.median(x[k] for x in runs) for k in cols}
            v = med[proxy]
            print(f"{mode:<9}{c:>7}  {proxy:<10}{v['tps']:>10.0f}{v['cpu']:>10.2f}{v['user']:>10.2f}"
                  f"{v['kernel']:>10.2f}{v['switch']:>10.2f}{v['cs']:>10.3f}{v['vol']:>10.3f}"
                  f"{v['invol']:>10.3f}")
        a, b = med["pgbouncer"], med["pgswitch"]
        print(f"{'':<16} {'sw/pgb':<10}{b['tps'] / a['tps']:>10.2f}" + "".join(
            f"{b[k] / a[k]:>10.2f}" if a[k] else f"{'n/a':>10}" for k in cols[1:]))

top = int(os.environ["TOP"])
if top:
    for mode in os.environ["MODES"].split():
        for c in os.environ["CLIENTS"].split():
            for proxy in ["pgbouncer", "pgswitch"]:
                print(f"\n{proxy} -M {mode} -c {c}: top {top} symbols (round {rounds}, share of samples)")
                lines = [l.rstrip() for l in open(f"{work}/{proxy}.{mode}.{c}.{rounds}.report")
                         if re.match(r"\s+[\d.]+%", l)]
                print("\n".join(lines[:top]))
EOF
