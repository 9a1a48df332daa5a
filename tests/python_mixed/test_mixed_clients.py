"""psycopg 3 threads and asyncpg connections at once through pgswitch in transaction mode, each
client doing a random mix of what real applications do, over a pool far smaller than the
clients, with server connections expiring every second and a prepared-statement cache of two:

- prepared statements (psycopg's prepare=True and pipelines, asyncpg's statement cache and
  prepare()), Describe of their columns, errors in them;
- transactions that commit or roll back, named cursors, asyncpg cursors, executemany;
- SET TimeZone, checked by SHOW, current_setting() and the ParameterStatus psycopg saw;
- COPY FROM STDIN abandoned half-way (CopyFail);
- clients that vanish mid-transaction while a 30 MB result streams to them (closed socket or
  a shutdown TCP connection);
- clients that cancel their own query before, during or after it runs (psycopg's cancel,
  asyncpg's timeout).

Every client checks every answer. A client sees a cancel only in its own cancelling operation,
a new transaction never starts inside another client's, and nothing a vanished or aborted
client wrote is ever committed. The same script passes against PostgreSQL directly (set
PGSWITCH_DSN to it), so any failure is the proxy's.

PGSWITCH_MIXED_SECONDS sets the length of the run (default 20)."""

import asyncio
import os
import random
import socket
import threading
import time
import uuid

import asyncpg
import psycopg
from psycopg import errors as pe

DSN = os.environ["PGSWITCH_DSN"]
SECONDS = float(os.environ.get("PGSWITCH_MIXED_SECONDS", "20"))
PSYCOPG_CLIENTS = 16
ASYNCPG_CLIENTS = 16
TEXTS = 12  # distinct statement texts, well above the proxy's per-server cache


class Run:
    """What all clients share: the table, the failures and how often each operation ran."""

    def __init__(self) -> None:
        self.table = f"mixed_{uuid.uuid4().hex[:8]}"
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}

    def fail(self, who: str, what: str) -> None:
        with self.lock:
            self.failures.append(f"{who}: {what}")

    def count(self, op: str) -> None:
        with self.lock:
            self.counts[op] = self.counts.get(op, 0) + 1


def _url(dsn: str) -> str:
    parts = dict(p.split("=", 1) for p in dsn.split())
    return "postgresql://{user}:{password}@{host}:{port}/{dbname}".format(**parts)


def _upsert(table: str, values: str) -> str:
    return f"INSERT INTO {table} VALUES ({values}) ON CONFLICT (client, k) DO UPDATE SET v = excluded.v"


def psycopg_client(run: Run, c: int, deadline: float) -> None:
    me = f"psycopg{c}"
    rng = random.Random(c)
    t = run.table
    upsert = _upsert(t, "%s, %s, %s")
    kv: dict[int, int] = {}
    tz = None
    conn = psycopg.connect(DSN, autocommit=True, prepare_threshold=rng.choice([0, 1, 2]))
    with conn:
        while time.time() < deadline:
            op = rng.randrange(13)
            try:
                if op == 0:
                    i, x = rng.randrange(TEXTS), rng.randrange(1000)
                    r = conn.execute(f"SELECT {i}::int + %s::int", (x,), prepare=True).fetchone()
                    if r != (i + x,):
                        run.fail(me, f"prepared SELECT {i} + {x} gave {r}")
                    run.count("psycopg prepared")
                elif op == 1:
                    xs = [(rng.randrange(TEXTS), rng.randrange(1000)) for _ in range(rng.randrange(1, 6))]
                    with conn.pipeline():
                        curs = [
                            conn.execute(f"SELECT {i}::int * 2 + %s::int", (x,), prepare=True)
                            for i, x in xs
                        ]
                    for (i, x), cur in zip(xs, curs):
                        r = cur.fetchone()
                        if r != (i * 2 + x,):
                            run.fail(me, f"pipelined {i} * 2 + {x} gave {r}")
                    run.count("psycopg pipeline")
                elif op == 2:
                    k, v = rng.randrange(20), rng.randrange(10**6)
                    rollback = rng.random() < 0.3
                    with conn.transaction():
                        conn.execute(upsert, (me, k, v), prepare=True)
                        r = conn.execute(
                            f"SELECT v FROM {t} WHERE client = %s AND k = %s", (me, k), prepare=True
                        ).fetchone()
                        if r != (v,):
                            run.fail(me, f"own write {v} read back in its transaction as {r}")
                        if rollback:
                            raise psycopg.Rollback()
                    if not rollback:
                        kv[k] = v
                    r = conn.execute(
                        f"SELECT v FROM {t} WHERE client = %s AND k = %s", (me, k), prepare=True
                    ).fetchone()
                    if r != ((kv[k],) if k in kv else None):
                        run.fail(me, f"k={k}: expected {kv.get(k)} after the transaction, got {r}")
                    run.count("psycopg transaction")
                elif op == 3:
                    try:
                        conn.execute("SELECT 1 / %s::int", (0,), prepare=True)
                        run.fail(me, "no division-by-zero error")
                    except pe.DivisionByZero:
                        pass
                    r = conn.execute("SELECT 7 + %s::int", (1,), prepare=True).fetchone()
                    if r != (8,):
                        run.fail(me, f"statement after an error gave {r}")
                    run.count("psycopg error")
                elif op == 4:
                    tz = rng.choice(["UTC", "Europe/Paris", "Asia/Tokyo", "America/New_York"])
                    conn.execute(f"SET TimeZone = '{tz}'")
                    run.count("psycopg SET")
                elif op == 5:
                    if tz is not None:
                        r = conn.execute("SHOW TimeZone").fetchone()
                        if r != (tz,):
                            run.fail(me, f"SHOW TimeZone: expected {tz}, got {r}")
                        if conn.info.parameter_status("TimeZone") != tz:
                            run.fail(me, f"ParameterStatus TimeZone is not {tz}")
                        r = conn.execute(
                            "SELECT current_setting('TimeZone') || %s", ("",), prepare=True
                        ).fetchone()
                        if r != (tz,):
                            run.fail(me, f"current_setting(TimeZone): expected {tz}, got {r}")
                    run.count("psycopg SHOW")
                elif op == 6:
                    n = rng.randrange(1, 60)
                    got = []
                    with conn.transaction():
                        with conn.cursor(name=f"cur{c}") as cur:
                            cur.execute("SELECT g FROM generate_series(1, %s) g", (n,))
                            while rows := cur.fetchmany(7):
                                got.extend(r[0] for r in rows)
                    if got != list(range(1, n + 1)):
                        run.fail(me, f"named cursor over {n} rows gave {len(got)}")
                    run.count("psycopg cursor")
                elif op == 7:
                    rows = [(me, 100 + j, rng.randrange(1000)) for j in range(rng.randrange(1, 8))]
                    with conn.cursor() as cur:
                        cur.executemany(upsert, rows)
                    kv.update((k, v) for _, k, v in rows)
                    r = conn.execute(f"SELECT count(*) FROM {t} WHERE client = %s", (me,)).fetchone()
                    if r != (len(kv),):
                        run.fail(me, f"executemany: expected {len(kv)} rows, got {r}")
                    run.count("psycopg executemany")
                elif op == 8:
                    cur = conn.cursor()
                    i = rng.randrange(TEXTS)
                    cur.execute(f"SELECT {i}::int AS a, %s::text AS b", ("x",), prepare=True)
                    names = [d.name for d in cur.description or []]
                    if names != ["a", "b"] or cur.fetchone() != (i, "x"):
                        run.fail(me, f"described columns {names}")
                    run.count("psycopg describe")
                elif op == 9:
                    # Simple protocol: now() is the statement's time only in a fresh transaction.
                    r = psycopg.ClientCursor(conn).execute(
                        "SELECT now() = statement_timestamp(), pg_current_xact_id_if_assigned() IS NULL,"
                        " current_setting('TimeZone') <> 'Asia/Kolkata'"
                    ).fetchone()
                    if r != (True, True, True):
                        run.fail(me, f"a transaction or SET LOCAL of another client is still open: {r}")
                    run.count("psycopg fresh transaction")
                elif op == 10:
                    try:
                        with conn.transaction():
                            with conn.cursor().copy(f"COPY {t} FROM STDIN") as cp:
                                cp.write_row(("aborted", rng.randrange(10**9), 1))
                                raise KeyError("abandon the COPY")
                    except (KeyError, pe.QueryCanceled):
                        pass
                    r = conn.execute("SELECT 5 + %s::int", (5,), prepare=True).fetchone()
                    if r != (10,):
                        run.fail(me, f"statement after CopyFail gave {r}")
                    run.count("psycopg CopyFail")
                elif op == 11:
                    ghost = psycopg.connect(DSN, autocommit=False)
                    ghost.execute(f"INSERT INTO {t} VALUES ('vanished', %s, 1)", (rng.randrange(10**9),))
                    ghost.execute("SET LOCAL TimeZone = 'Asia/Kolkata'")
                    ghost.pgconn.send_query(
                        b"SELECT g, repeat('x', 100) FROM generate_series(1, 300000) g"
                    )
                    ghost.pgconn.flush()
                    time.sleep(rng.random() * 0.02)
                    if rng.random() < 0.5:
                        # A TCP connection cut under the client (a duplicate of its socket, so
                        # that libpq still closes its own descriptor).
                        sk = socket.socket(fileno=os.dup(ghost.pgconn.socket))
                        sk.shutdown(socket.SHUT_RDWR)
                        sk.close()
                    ghost.pgconn.finish()
                    run.count("psycopg vanished mid-transaction")
                elif op == 12:
                    timer = threading.Timer(rng.random() * 0.03, conn.cancel_safe)
                    timer.start()
                    try:
                        r = conn.execute(
                            "SELECT pg_sleep(%s::float8 / 1000), 1", (rng.randrange(30),)
                        ).fetchone()
                        if r is None or r[1] != 1:
                            run.fail(me, f"pg_sleep gave {r}")
                        run.count("psycopg cancel came late")
                    except pe.QueryCanceled:
                        run.count("psycopg cancel")
                    timer.join()
            except Exception as e:  # noqa: BLE001 - every surprise is a failure to report
                run.fail(me, f"operation {op}: {e!r}")
                if conn.closed:
                    return


async def asyncpg_client(run: Run, c: int, deadline: float) -> None:
    me = f"asyncpg{c}"
    rng = random.Random(1000 + c)
    t = run.table
    upsert = _upsert(t, "$1, $2, $3")
    kv: dict[int, int] = {}
    conn = await asyncpg.connect(_url(DSN), statement_cache_size=rng.choice([0, 5, 100]))
    stmts: dict[int, asyncpg.prepared_stmt.PreparedStatement] = {}
    try:
        while time.time() < deadline:
            op = rng.randrange(9)
            try:
                if op == 0:
                    i, x = rng.randrange(TEXTS), rng.randrange(1000)
                    r = await conn.fetchval(f"SELECT {i}::int + $1::int", x)
                    if r != i + x:
                        run.fail(me, f"SELECT {i} + {x} gave {r}")
                    run.count("asyncpg cached statement")
                elif op == 1:
                    i = rng.randrange(TEXTS)
                    if i not in stmts or rng.random() < 0.1:
                        stmts[i] = await conn.prepare(f"SELECT {i}::int - $1::int")
                    x = rng.randrange(1000)
                    r = await stmts[i].fetchval(x)
                    if r != i - x:
                        run.fail(me, f"prepared {i} - {x} gave {r}")
                    run.count("asyncpg prepare()")
                elif op == 2:
                    k, v = rng.randrange(20), rng.randrange(10**6)
                    rollback = rng.random() < 0.3
                    try:
                        async with conn.transaction():
                            await conn.execute(upsert, me, k, v)
                            r = await conn.fetchval(f"SELECT v FROM {t} WHERE client = $1 AND k = $2", me, k)
                            if r != v:
                                run.fail(me, f"own write {v} read back in its transaction as {r}")
                            if rollback:
                                raise KeyError("roll back")
                    except KeyError:
                        pass
                    if not rollback:
                        kv[k] = v
                    r = await conn.fetchval(f"SELECT v FROM {t} WHERE client = $1 AND k = $2", me, k)
                    if r != kv.get(k):
                        run.fail(me, f"k={k}: expected {kv.get(k)} after the transaction, got {r}")
                    run.count("asyncpg transaction")
                elif op == 3:
                    rows = [(me, 100 + j, rng.randrange(1000)) for j in range(rng.randrange(1, 8))]
                    await conn.executemany(upsert, rows)
                    kv.update((k, v) for _, k, v in rows)
                    r = await conn.fetchval(f"SELECT count(*) FROM {t} WHERE client = $1", me)
                    if r != len(kv):
                        run.fail(me, f"executemany: expected {len(kv)} rows, got {r}")
                    run.count("asyncpg executemany")
                elif op == 4:
                    n = rng.randrange(1, 60)
                    got = []
                    async with conn.transaction():
                        async for r in conn.cursor("SELECT g FROM generate_series(1, $1::int) g", n, prefetch=7):
                            got.append(r[0])
                    if got != list(range(1, n + 1)):
                        run.fail(me, f"cursor over {n} rows gave {len(got)}")
                    run.count("asyncpg cursor")
                elif op == 5:
                    try:
                        await conn.fetchval("SELECT 1 / $1::int", 0)
                        run.fail(me, "no division-by-zero error")
                    except asyncpg.DivisionByZeroError:
                        pass
                    r = await conn.fetchval("SELECT 7 + $1::int", 1)
                    if r != 8:
                        run.fail(me, f"statement after an error gave {r}")
                    run.count("asyncpg error")
                elif op == 6:
                    r = await conn.fetchval("SELECT $1::int[] || $2::int", [1, 2], 3)
                    if r != [1, 2, 3]:
                        run.fail(me, f"array gave {r}")
                    row = await conn.fetchrow("SELECT ROW(1, 'a')::record AS r, '{\"a\":1}'::jsonb AS j")
                    if row is None or row["j"] != '{"a": 1}':
                        run.fail(me, f"record and jsonb gave {row}")
                    run.count("asyncpg types")
                elif op == 7:
                    async with conn.transaction():
                        s = await conn.prepare("SELECT $1::int * 3")
                        r = (await s.fetchval(5), await conn.fetchval("SELECT $1::int * 3", 6))
                    if r != (15, 18):
                        run.fail(me, f"statement prepared in a transaction gave {r}")
                    run.count("asyncpg prepare() in a transaction")
                elif op == 8:
                    # asyncpg cancels a query on timeout, and may then close the connection
                    # itself (also against PostgreSQL directly): a connection of its own.
                    other = await asyncpg.connect(_url(DSN), statement_cache_size=0)
                    try:
                        r = await other.fetchval(
                            "SELECT pg_sleep($1::float8 / 1000)::text || 'z'",
                            rng.randrange(30),
                            timeout=0.001 + rng.random() * 0.03,
                        )
                        if r != "z":
                            run.fail(me, f"pg_sleep gave {r!r}")
                        run.count("asyncpg cancel came late")
                    except asyncio.TimeoutError:
                        run.count("asyncpg cancel")
                    finally:
                        other.terminate()
            except Exception as e:  # noqa: BLE001 - every surprise is a failure to report
                run.fail(me, f"operation {op}: {e!r}")
                if conn.is_closed():
                    return
    finally:
        await conn.close()


def test_psycopg_and_asyncpg_mixed_with_cancels_vanishing_clients_and_server_churn():
    run = Run()
    with psycopg.connect(DSN, autocommit=True) as setup:
        setup.execute(f"CREATE TABLE {run.table} (client text, k int, v int, PRIMARY KEY (client, k))")
    deadline = time.time() + SECONDS

    async def asyncpg_clients() -> None:
        await asyncio.gather(*(asyncpg_client(run, c, deadline) for c in range(ASYNCPG_CLIENTS)))

    threads = [
        threading.Thread(target=psycopg_client, args=(run, c, deadline)) for c in range(PSYCOPG_CLIENTS)
    ]
    for th in threads:
        th.start()
    asyncio.run(asyncpg_clients())
    for th in threads:
        th.join()

    with psycopg.connect(DSN, autocommit=True) as check:
        left = check.execute(
            f"SELECT count(*) FROM {run.table} WHERE client IN ('vanished', 'aborted')"
        ).fetchone()
        if left != (0,):
            run.fail("end", f"{left[0]} rows of vanished or aborted clients were committed")
        check.execute(f"DROP TABLE {run.table}")

    print(f"{sum(run.counts.values())} operations:")
    for op, n in sorted(run.counts.items()):
        print(f"  {n:6d}  {op}")
    # Every kind of operation ran (a cancel may or may not come too late), so clients that
    # stopped early cannot pass unnoticed.
    missing = {
        "psycopg prepared", "psycopg pipeline", "psycopg transaction", "psycopg error",
        "psycopg SET", "psycopg SHOW", "psycopg cursor", "psycopg executemany",
        "psycopg describe", "psycopg fresh transaction", "psycopg CopyFail",
        "psycopg vanished mid-transaction", "psycopg cancel", "asyncpg cached statement",
        "asyncpg prepare()", "asyncpg transaction", "asyncpg executemany", "asyncpg cursor",
        "asyncpg error", "asyncpg types", "asyncpg prepare() in a transaction", "asyncpg cancel",
    } - run.counts.keys()
    assert not missing, f"never ran: {sorted(missing)}"
    assert not run.failures, f"{len(run.failures)} failures, the first: " + "; ".join(run.failures[:10])
