#!/usr/bin/env python3
"""Open N idle client connections through a proxy and report its resident memory per client.

Usage: idle_memory.py --port PORT --pid PROXY_PID [--clients 2000] [--host 127.0.0.1]
                      [--user app] [--password secret] [--dbname bench] [--label NAME]

The proxy's VmRSS (/proc/PID/status) is read after one warm-up connection (which runs SELECT 1,
so the proxy's pool to PostgreSQL exists) and again after N connections have logged in and sat
idle for a moment. Prints one machine-readable line:

    idle LABEL clients=N rss_before_kib=.. rss_after_kib=.. kib_per_client=.. connect_s=.. checked=K

and exits non-zero if a connection fails (the first error is printed on stderr).
Needs psycopg 3 (`python3 -m pip install "psycopg[binary]"`) and an open-files limit above N.
"""

import argparse
import random
import statistics
import sys
import time

import psycopg


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--user", default="app")
    ap.add_argument("--password", default="secret")
    ap.add_argument("--dbname", default="bench")
    ap.add_argument("--label", default="proxy")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds idle before measuring")
    a = ap.parse_args()

    conninfo = dict(
        host=a.host,
        port=a.port,
        user=a.user,
        password=a.password,
        dbname=a.dbname,
        connect_timeout=30,
        autocommit=True,
    )
    with psycopg.connect(**conninfo) as warm:
        warm.execute("SELECT 1").fetchone()
    time.sleep(a.settle)
    before = vm_rss_kib(a.pid)

    conns = []
    lat = []
    t0 = time.monotonic()
    try:
        for i in range(a.clients):
            t = time.monotonic()
            conns.append(psycopg.connect(**conninfo))
            lat.append(time.monotonic() - t)
    except Exception as e:  # noqa: BLE001 - report whatever the driver says
        print(f"{a.label}: connection {len(conns) + 1} of {a.clients} failed: {e}", file=sys.stderr)
        for c in conns:
            c.close()
        return 1
    connect_s = time.monotonic() - t0
    time.sleep(a.settle)
    after = vm_rss_kib(a.pid)

    # The idle connections must still work: run a query on a sample of them.
    checked = 0
    for c in random.sample(conns, min(20, len(conns))):
        assert c.execute("SELECT 1").fetchone() == (1,)
        checked += 1
    for c in conns:
        c.close()

    per = (after - before) / a.clients
    print(
        f"idle {a.label} clients={a.clients} rss_before_kib={before} rss_after_kib={after} "
        f"kib_per_client={per:.2f} connect_s={connect_s:.1f} "
        f"login_p50_ms={statistics.median(lat) * 1000:.1f} login_max_ms={max(lat) * 1000:.1f} "
        f"checked={checked}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
