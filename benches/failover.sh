#!/usr/bin/env bash
# Failover benchmark: how long writes stop when the primary dies, what clients see, what is lost.
#
#   bash benches/failover.sh                          # 3 runs per fault, sync ANY 1, ~6 minutes
#   FAILOVER_RUNS=1 bash benches/failover.sh          # quick look
#   FAILOVER_FAULTS="sigkill" FAILOVER_SYNC=async bash benches/failover.sh
#
# Each run starts a fresh primary + 2 streaming standbys (PostgreSQL, loopback, free ports) and a
# release pgswitch in front of them with its DEFAULT failover settings (diagnosis every 1 s, 1 s
# timeout, 3 failures, hold 30 s) in transaction pooling mode. A workload runs through pgswitch:
# FAILOVER_WRITERS writers (psycopg 3, one connection each) inserting a fresh id with an
# autocommit INSERT every 10 ms, recording every acknowledged id, plus FAILOVER_IDLE idle clients
# connected before the fault that run SELECT 1 after it. After a warm-up the primary is killed:
#   immediate  pg_ctl stop -m immediate
#   sigkill    SIGKILL of the postmaster and all its processes
#   sigstop    SIGSTOP of the postmaster and all its processes (a hung primary)
# and the workload keeps going for FAILOVER_AFTER seconds. Per run it prints
#   published    kill -> pgswitch publishes the new primary (/status polled every 20 ms)
#   first write  kill -> first insert acknowledged after the kill
#   all writers  kill -> every writer has had an insert acknowledged after the kill
#   errors on an existing connection / on connect (with their SQLSTATEs), idle-client errors,
#   acknowledged ids missing on the new primary afterwards
# and the median of each fault. Targets (issue 4): writes flowing within 1 s of the kill, zero
# errors on idle connections, only in-flight transactions see an error, zero acknowledged writes
# lost in sync mode; a hung primary within timeout_ms x failures + 1 s = 4 s.
#
# Environment (all optional):
#   FAILOVER_RUNS      runs per fault, default 3
#   FAILOVER_FAULTS    default "immediate sigkill sigstop"
#   FAILOVER_SYNC      "any1" (synchronous_standby_names = 'ANY 1 (n1, n2)', default) or "async"
#   FAILOVER_WRITERS   default 8;  FAILOVER_IDLE default 4
#   FAILOVER_WARMUP    seconds of workload before the kill, default 3
#   FAILOVER_AFTER     seconds of workload after the kill, default 8
#   BENCH_SKIP_BUILD=1 use the existing target/release/pgswitch
#   BENCH_KEEP=1       keep the temporary directory (PostgreSQL and pgswitch logs)
#   PGSWITCH_PG_BIN    PostgreSQL server binaries (default: newest /usr/lib/postgresql/*/bin)
#
# Runs PostgreSQL as the postgres user when started as root. Every process it starts is stopped
# by PID at the end of its run (and on Ctrl-C).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

if ! python3 -c 'import psycopg' 2>/dev/null; then
    log "installing psycopg"
    python3 -m pip install -q "psycopg[binary]"
fi
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release --bin pgswitch"
    (cd "$ROOT" && cargo build --release --bin pgswitch >&2)
fi
export PGSWITCH_BIN=$ROOT/target/release/pgswitch
[ -x "$PGSWITCH_BIN" ] || { echo "no $PGSWITCH_BIN" >&2; exit 1; }

exec python3 - "$@" <<'PY'
import glob
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psycopg

RUNS = int(os.environ.get("FAILOVER_RUNS", "3"))
FAULTS = os.environ.get("FAILOVER_FAULTS", "immediate sigkill sigstop").split()
SYNC = os.environ.get("FAILOVER_SYNC", "any1")
WRITERS = int(os.environ.get("FAILOVER_WRITERS", "8"))
IDLE = int(os.environ.get("FAILOVER_IDLE", "4"))
WARMUP = float(os.environ.get("FAILOVER_WARMUP", "3"))
AFTER = float(os.environ.get("FAILOVER_AFTER", "8"))
KEEP = os.environ.get("BENCH_KEEP", "0") == "1"
PGSWITCH = os.environ["PGSWITCH_BIN"]
IS_ROOT = os.geteuid() == 0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pg_bin():
    if os.environ.get("PGSWITCH_PG_BIN"):
        return os.environ["PGSWITCH_PG_BIN"]
    dirs = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(d + "/postgres")]
    if not dirs:
        sys.exit("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (set PGSWITCH_PG_BIN)")
    return sorted(dirs, key=lambda d: int(d.split("/")[-2]))[-1]


BIN = pg_bin()


def server_cmd(args):
    return (["runuser", "-u", "postgres", "--"] if IS_ROOT else []) + args


def run(args, timeout=120, check=True, env=None):
    p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=BASE if os.path.isdir(BASE) else "/")
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()} {p.stdout.strip()}")
    return p


def chown(path):
    if IS_ROOT:
        run(["chown", "-R", "postgres:postgres", path])


_used_ports = set()


def free_port():
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in _used_ports:
            _used_ports.add(port)
            return port


BASE = f"/tmp/pgswitch-failover-bench-{os.getpid()}"
os.makedirs(BASE)
os.chmod(BASE, 0o755)
chown(BASE)

COMMON_CONF = """
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
wal_log_hints = on
wal_keep_size = '256MB'
fsync = off
synchronous_commit = on
shared_buffers = '32MB'
max_connections = 200
hot_standby_feedback = on
wal_receiver_status_interval = '1s'
log_line_prefix = '%m [%p] '
"""

HBA = """local all all trust
host replication all 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


def make_template():
    tpl = f"{BASE}/template"
    pw = f"{BASE}/pwfile"
    with open(pw, "w") as f:
        f.write("postgres\n")
    chown(pw)
    run(server_cmd([f"{BIN}/initdb", "-D", tpl, "-U", "postgres", "--auth-local=trust",
                    "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
                    f"--pwfile={pw}"]), timeout=300)
    with open(f"{tpl}/pg_hba.conf", "w") as f:
        f.write(HBA)
    with open(f"{tpl}/postgresql.conf", "a") as f:
        f.write(COMMON_CONF)
    chown(tpl)
    return tpl


class Node:
    def __init__(self, run_dir, name):
        self.name = name
        self.dir = f"{run_dir}/{name}"
        self.sock = f"{run_dir}/sock-{name}"
        self.log = f"{run_dir}/{name}.log"
        self.port = free_port()
        os.makedirs(self.sock)
        chown(self.sock)

    def own_conf(self):
        with open(f"{self.dir}/postgresql.conf", "a") as f:
            f.write(f"\nport = {self.port}\nunix_socket_directories = '{self.sock}'\ncluster_name = '{self.name}'\n")
        chown(self.dir)

    def start(self):
        run(server_cmd([f"{BIN}/pg_ctl", "-D", self.dir, "-l", self.log, "-w", "-t", "60", "start"]), timeout=90)

    def pm_pid(self):
        try:
            with open(f"{self.dir}/postmaster.pid") as f:
                pid = int(f.readline())
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return None
            return pid
        except (OSError, ValueError):
            return None

    def children(self, pm):
        kids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    if int(fields[1]) == pm and fields[0] != "Z":
                        kids.append(int(d))
                except OSError:
                    pass
        return kids

    def signal_all(self, sig):
        pm = self.pm_pid()
        if pm is None:
            return
        if sig in (signal.SIGSTOP, signal.SIGKILL):
            os.kill(pm, signal.SIGSTOP)  # no forking while its children are listed
            kids = self.children(pm)
            os.kill(pm, sig)
            for k in kids:
                try:
                    os.kill(k, sig)
                except OSError:
                    pass
        else:
            for k in self.children(pm):
                try:
                    os.kill(k, sig)
                except OSError:
                    pass
            os.kill(pm, sig)

    def stop(self):
        if self.pm_pid() is not None:
            self.signal_all(signal.SIGCONT)
            run(server_cmd([f"{BIN}/pg_ctl", "-D", self.dir, "stop", "-m", "immediate", "-w", "-t", "30"]),
                check=False, timeout=60)
        if self.pm_pid() is not None:
            self.signal_all(signal.SIGKILL)

    def connect(self, **kw):
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", password="postgres",
                               dbname="postgres", autocommit=True, connect_timeout=5, **kw)


def wait(what, limit, probe, step=0.05):
    deadline = time.monotonic() + limit
    last = None
    while True:
        try:
            v = probe()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - anything is "not yet"
            last = e
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {limit} s (last: {last})")
        time.sleep(step)


def admin_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Cluster:
    def __init__(self, template, run_dir):
        self.run_dir = run_dir
        self.nodes = []
        self.proxy = None
        self.proxy_log = f"{run_dir}/pgswitch.log"
        n0 = Node(run_dir, "n0")
        self.nodes.append(n0)
        run(["cp", "-a", template, n0.dir])
        n0.own_conf()
        n0.start()
        with n0.connect() as c:
            c.execute("CREATE ROLE app LOGIN PASSWORD 'secret'")
            c.execute("CREATE TABLE t(id bigint PRIMARY KEY)")
            c.execute("GRANT ALL ON t TO app")
        for name in ("n1", "n2"):
            n = Node(run_dir, name)
            self.nodes.append(n)
            run(server_cmd([f"{BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(n0.port), "-U", "postgres",
                            "-D", n.dir, "-R", "-X", "stream", "-c", "fast", "--no-sync", "-w"]),
                timeout=180, env=dict(os.environ, PGPASSWORD="postgres"))
            n.own_conf()
            n.start()
        with n0.connect() as c:
            if SYNC == "any1":
                c.execute("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (n1, n2)'")
                c.execute("SELECT pg_reload_conf()")
                want = "sync_state IN ('sync', 'quorum')"
            else:
                want = "true"
            wait("standbys stream", 60,
                 lambda: c.execute(f"SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND {want}").fetchone()[0] == 2,
                 step=0.1)

    def start_proxy(self):
        self.listen = free_port()
        self.admin = free_port()
        cfg = f"{self.run_dir}/pgswitch.toml"
        text = (f'listen = "127.0.0.1:{self.listen}"\nadmin_listen = "127.0.0.1:{self.admin}"\n'
                f'pool_mode = "transaction"\ndefault_pool_size = 20\n\n'
                f'[[users]]\nname = "app"\npassword = "secret"\n\n'
                f'[control]\nuser = "postgres"\npassword = "postgres"\ndatabase = "postgres"\n\n'
                f'[coordination]\nstate_file = "{self.run_dir}/pgswitch.state"\n')
        for n in self.nodes:
            text += f'\n[[nodes]]\nname = "{n.name}"\nhost = "127.0.0.1"\nport = {n.port}\ndata_dir = "{n.dir}"\n'
        with open(cfg, "w") as f:
            f.write(text)
        self.proxy = subprocess.Popen([PGSWITCH, "run", "--config", cfg], stdin=subprocess.DEVNULL,
                                      stdout=open(self.proxy_log, "w"), stderr=subprocess.STDOUT,
                                      env=dict(os.environ, PGSWITCH_LOG=os.environ.get("PGSWITCH_LOG", "info")))
        wait("pgswitch ready", 30, lambda: admin_get(self.admin, "/ready")[0] == 200)
        # Two more diagnosis cycles so pgswitch has a healthy diagnosis of the primary on record.
        time.sleep(2.2)

    def primary(self):
        code, body = admin_get(self.admin, "/status")
        return json.loads(body).get("primary") if code == 200 else None

    def close(self):
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(20)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(5)
        for n in reversed(self.nodes):
            n.stop()


class Workload:
    def __init__(self, port):
        self.dsn = f"host=127.0.0.1 port={port} user=app password=secret dbname=postgres"
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.acks = []      # (writer, id, sent, acked)
        self.errors = []    # (writer, id, place, sqlstate, message, sent, at)
        self.connects = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.writer, args=(w,), daemon=True) for w in range(WRITERS)]
        for t in self.threads:
            t.start()

    def writer(self, w):
        conn = None
        while not self.stop.is_set():
            tick = time.monotonic()
            if conn is None or conn.closed or conn.broken:
                sent = time.monotonic()
                try:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
                    with self.lock:
                        self.connects += 1
                except psycopg.Error as e:
                    with self.lock:
                        self.errors.append((w, None, "connect", e.sqlstate, str(e).strip(), sent, time.monotonic()))
                    conn = None
                    time.sleep(0.1)
                    continue
            with self.lock:
                i = next(self.ids)
            sent = time.monotonic()
            try:
                conn.execute("INSERT INTO t(id) VALUES (%s)", (i,))
                with self.lock:
                    self.acks.append((w, i, sent, time.monotonic()))
            except psycopg.Error as e:
                with self.lock:
                    self.errors.append((w, i, "existing", e.sqlstate, str(e).strip(), sent, time.monotonic()))
            time.sleep(max(0.0, tick + 0.01 - time.monotonic()))
        if conn is not None:
            conn.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def one_run(template, fault, n):
    run_dir = f"{BASE}/run-{fault}-{n}"
    os.makedirs(run_dir)
    chown(run_dir)
    cluster = Cluster(template, run_dir)
    idle, work = [], None
    try:
        cluster.start_proxy()
        dsn = f"host=127.0.0.1 port={cluster.listen} user=app password=secret dbname=postgres"
        for _ in range(IDLE):
            c = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
            c.execute("SELECT 1")
            idle.append(c)
        work = Workload(cluster.listen)
        time.sleep(WARMUP)
        n0 = cluster.nodes[0]
        t_kill = time.monotonic()
        if fault == "immediate":
            run(server_cmd([f"{BIN}/pg_ctl", "-D", n0.dir, "stop", "-m", "immediate", "-w", "-t", "30"]), timeout=60)
        elif fault == "sigkill":
            pm = n0.pm_pid()
            kids = n0.children(pm) if pm else []
            n0.signal_all(signal.SIGKILL)
            # Done when every process is gone (the kernel has closed their sockets).
            wait("n0's processes gone", 10,
                 lambda: not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                                 for p in [pm] + kids if p), step=0.005)
        elif fault == "sigstop":
            n0.signal_all(signal.SIGSTOP)
        t_done = time.monotonic()
        published = None
        while time.monotonic() < t_kill + 60:
            p = cluster.primary()
            if p and p != "n0":
                published = time.monotonic() - t_kill
                break
            time.sleep(0.02)
        time.sleep(max(0.0, t_kill + AFTER - time.monotonic()))
        work.finish()
        idle_errors = []
        for i, c in enumerate(idle):
            try:
                c.execute("SELECT 1").fetchone()
            except psycopg.Error as e:
                idle_errors.append(f"idle {i}: {e.sqlstate} {str(e).strip()}")
        new_name = cluster.primary()
        new = next((x for x in cluster.nodes if x.name == new_name), None)
        present = set()
        if new is not None:
            with new.connect() as c:
                present = {r[0] for r in c.execute("SELECT id FROM t")}
        missing = [a[1] for a in work.acks if a[1] not in present]
        # Writes flowing again: inserts sent after the kill was complete, acknowledged (an insert
        # committed just before the kill may be acknowledged a little after it).
        after = [a for a in work.acks if a[2] > t_done]
        first = min((a[3] for a in after), default=None)
        per_writer = {}
        for a in after:
            per_writer[a[0]] = min(per_writer.get(a[0], a[3]), a[3])
        all_writers = max(per_writer.values()) if len(per_writer) == WRITERS else None
        existing = [e for e in work.errors if e[2] == "existing"]
        connect = [e for e in work.errors if e[2] == "connect"]
        codes = {}
        for e in work.errors:
            key = f"{e[2]}:{e[3]}"
            codes[key] = codes.get(key, 0) + 1
        late = sum(1 for e in existing if e[5] > t_done)
        return {
            "fault": fault, "run": n, "new": new_name,
            "published": published,
            "first": None if first is None else first - t_kill,
            "all": None if all_writers is None else all_writers - t_kill,
            "acks": len(work.acks),
            "existing": len(existing), "late": late, "connect": len(connect),
            "reconnects": max(0, work.connects - WRITERS),
            "idle": len(idle_errors), "missing": len(missing), "codes": codes,
            "idle_detail": idle_errors[:3],
        }
    finally:
        if work is not None:
            work.finish()
        for c in idle:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        cluster.close()
        if not KEEP:
            shutil.rmtree(run_dir, ignore_errors=True)


def fmt(v):
    return "-" if v is None else f"{v:.3f}s"


def main():
    log(f"PostgreSQL binaries {BIN}; pgswitch {PGSWITCH}; work dir {BASE}")
    log(f"{RUNS} run(s) per fault {FAULTS}, replication {SYNC}, {WRITERS} writers every 10 ms, {IDLE} idle clients")
    template = make_template()
    results = []
    interrupted = False
    try:
        for n in range(1, RUNS + 1):
            for fault in FAULTS:
                log(f"run {n} {fault}")
                try:
                    r = one_run(template, fault, n)
                except Exception as e:  # noqa: BLE001 - report and go on
                    log(f"run {n} {fault} failed: {e}")
                    continue
                results.append(r)
                log(f"  published {fmt(r['published'])} first write {fmt(r['first'])} all writers {fmt(r['all'])} "
                    f"errors existing {r['existing']} connect {r['connect']} idle {r['idle']} missing {r['missing']} {r['codes']}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if not KEEP:
            shutil.rmtree(BASE, ignore_errors=True)
        else:
            log(f"kept {BASE}")

    print()
    print(f"pgswitch failover benchmark: primary + 2 standbys ({SYNC}), default failover settings, transaction mode,")
    print(f"{WRITERS} writers (autocommit INSERT every 10 ms), {IDLE} idle clients; times from the kill.")
    print("first write / all writers: first insert sent after the kill completed that was acknowledged (any writer / every writer).")
    print("err existing (sent after kill): errors on an open connection, and how many of those inserts were sent after the")
    print("kill had completed (pg_ctl returned / every process gone): those were not in flight at the fault.")
    print()
    hdr = f"{'fault':<10} {'run':>3} {'new':>4} {'published':>10} {'first write':>12} {'all writers':>12} {'acked':>6} {'err existing (sent after kill)':>31} {'err connect':>12} {'idle err':>9} {'missing':>8}  sqlstates"
    print(hdr)
    for r in results:
        print(f"{r['fault']:<10} {r['run']:>3} {str(r['new']):>4} {fmt(r['published']):>10} {fmt(r['first']):>12} {fmt(r['all']):>12} {r['acks']:>6} "
              f"{(str(r['existing']) + ' (' + str(r['late']) + ')'):>31} {r['connect']:>12} {r['idle']:>9} {r['missing']:>8}  {r['codes']}")
    print()
    print("median per fault:")
    for fault in FAULTS:
        rs = [r for r in results if r["fault"] == fault]
        if not rs:
            continue

        def med(key):
            vals = [r[key] for r in rs if r[key] is not None]
            return statistics.median(vals) if vals else None
        print(f"  {fault:<10} runs {len(rs)}: published {fmt(med('published'))}, first write {fmt(med('first'))}, "
              f"all writers {fmt(med('all'))}; errors on an existing connection {med('existing')} (sent after the kill {med('late')}), on connect {med('connect')}, "
              f"idle-client errors {med('idle')}, acknowledged ids missing {med('missing')} (max {max(r['missing'] for r in rs)})")
    if interrupted:
        sys.exit(130)


main()
PY
