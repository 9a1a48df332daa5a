"""psycopg 3 through pgswitch in session pooling mode.

`cargo test --test python_clients` starts a PostgreSQL cluster with pgswitch in front and runs
these tests with the libpq connection string in PGSWITCH_DSN (user app, database postgres).
Tests may share the database, so each one works on its own uniquely named table.
"""

import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus

CONNECT_TIMEOUT_S = 10
# No test here needs more than a few seconds; one stuck on an unanswered message fails after this.
TEST_TIMEOUT_S = 60


class Stuck(Exception):
    pass


@pytest.fixture(autouse=True)
def fail_if_stuck():
    """Fails a test stuck for TEST_TIMEOUT_S, with the traceback of where it waits."""

    def expire(signum, frame):
        raise Stuck(f"test still running after {TEST_TIMEOUT_S} s: stuck waiting for pgswitch?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def dsn():
    value = os.environ.get("PGSWITCH_DSN")
    if not value:
        pytest.fail(
            "PGSWITCH_DSN is not set: run these tests through "
            "`cargo test --test python_clients`, which starts PostgreSQL and pgswitch",
            pytrace=False,
        )
    return value


def connect(dsn, **kwargs):
    return psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S, **kwargs)


@pytest.fixture
def conn(dsn):
    with connect(dsn) as c:
        yield c


@pytest.fixture
def autocommit_conn(dsn):
    with connect(dsn, autocommit=True) as c:
        yield c


def unique(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def table(dsn):
    """A fresh table `(id int primary key, name text)`, dropped after the test.

    Request it before `conn`: fixtures are torn down in reverse order, and DROP TABLE would wait
    for the lock of a transaction the test's connection still has open.
    """
    ident = sql.Identifier(unique("t"))
    with connect(dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text)").format(ident))
    yield ident
    with connect(dsn, autocommit=True) as c:
        c.execute("SET lock_timeout = '10s'")
        c.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


def q(template, table):
    return sql.SQL(template).format(t=table)


def ids_in(dsn, table):
    with connect(dsn) as c:
        return [r[0] for r in c.execute(q("SELECT id FROM {t} ORDER BY id", table))]


def test_simple_query(conn):
    cur = conn.execute("SELECT 1 AS one, 'two' AS two, NULL AS nothing")
    assert cur.fetchone() == (1, "two", None)
    assert [d.name for d in cur.description] == ["one", "two", "nothing"]

    # Without parameters psycopg uses the simple query protocol: several statements at once.
    cur.execute("SELECT 1; SELECT 'second'")
    assert cur.fetchone() == (1,)
    assert cur.nextset()
    assert cur.fetchone() == ("second",)

    assert conn.execute("SELECT count(*) FROM generate_series(1, 100000)").fetchone() == (100000,)


def test_parameterized_queries_bind_on_the_server(dsn, table, conn):
    row = conn.execute(
        "SELECT %s::int + %s, %s, %s, %s::bytea, %s, %s",
        (40, 2, "héllo; DROP TABLE x --", None, b"\x00\x01\xff", Decimal("1.50"), True),
    ).fetchone()
    assert row == (42, "héllo; DROP TABLE x --", None, b"\x00\x01\xff", Decimal("1.50"), True)

    # Binary parameters and results.
    cur = conn.cursor(binary=True)
    cur.execute("SELECT %b::int[], %b::text", ([1, 2, 3], "binary"))
    assert cur.fetchone() == ([1, 2, 3], "binary")

    with conn.cursor() as cur:
        cur.executemany(
            q("INSERT INTO {t} (id, name) VALUES (%s, %s)", table),
            [(i, f"row {i}") for i in range(100)],
        )
        cur.execute(q("SELECT name FROM {t} WHERE id = %s", table), (57,))
        assert cur.fetchone() == ("row 57",)
    conn.commit()
    assert ids_in(dsn, table) == list(range(100))


def test_transactions_commit_and_rollback(dsn, table, conn):
    insert = q("INSERT INTO {t} (id) VALUES (%s)", table)

    conn.execute(insert, (1,))
    assert conn.info.transaction_status == TransactionStatus.INTRANS
    conn.commit()
    assert conn.info.transaction_status == TransactionStatus.IDLE

    conn.execute(insert, (2,))
    conn.rollback()

    with conn.transaction():
        conn.execute(insert, (3,))
    with conn.transaction():
        conn.execute(insert, (4,))
        raise psycopg.Rollback()
    with conn.transaction():
        conn.execute(insert, (5,))
        with conn.transaction():  # a savepoint
            conn.execute(insert, (6,))
            raise psycopg.Rollback()

    assert ids_in(dsn, table) == [1, 3, 5]


def test_error_in_a_transaction_then_rollback(dsn, table, conn):
    conn.execute(q("INSERT INTO {t} (id) VALUES (1)", table))
    with pytest.raises(errors.DivisionByZero) as exc:
        conn.execute("SELECT 1 / 0")
    assert exc.value.sqlstate == "22012"
    assert conn.info.transaction_status == TransactionStatus.INERROR

    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute("SELECT 2")
    conn.rollback()
    assert conn.info.transaction_status == TransactionStatus.IDLE

    assert conn.execute("SELECT 3").fetchone() == (3,)
    with pytest.raises(errors.UndefinedTable):
        conn.execute("SELECT * FROM no_such_table_here")
    conn.rollback()
    conn.execute(q("INSERT INTO {t} (id) VALUES (2)", table))
    conn.commit()
    assert ids_in(dsn, table) == [2]


def test_prepared_statements_run_many_times(table, conn):
    for i in range(200):
        assert conn.execute("SELECT %s::int * 2", (i,), prepare=True).fetchone() == (2 * i,)
    insert = q("INSERT INTO {t} (id, name) VALUES (%s, %s)", table)
    for i in range(200):
        conn.execute(insert, (i, str(i)), prepare=True)
    conn.commit()
    assert conn.execute(q("SELECT count(*), sum(id) FROM {t}", table)).fetchone() == (200, 19900)

    # The statements really were prepared on the server (session mode: always the same one).
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE NOT from_sql ORDER BY name"
        )
    ]
    assert len(names) >= 2, names


def test_copy_in_and_out_10k_rows(table, conn):
    rows = [(i, f"name {i}\twith a tab") for i in range(10_000)]
    with conn.cursor() as cur:
        with cur.copy(q("COPY {t} (id, name) FROM STDIN", table)) as copy:
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == 10_000
    conn.commit()
    count, total = conn.execute(q("SELECT count(*), sum(id) FROM {t}", table)).fetchone()
    assert (count, total) == (10_000, sum(range(10_000)))

    with conn.cursor() as cur:
        with cur.copy(q("COPY (SELECT id, name FROM {t} ORDER BY id) TO STDOUT", table)) as copy:
            copy.set_types(["int4", "text"])
            assert list(copy.rows()) == rows

    with conn.cursor() as cur:
        with cur.copy(q("COPY {t} TO STDOUT (FORMAT BINARY)", table)) as copy:
            copy.set_types(["int4", "text"])
            assert sorted(copy.rows()) == rows


def test_listen_notify_between_two_connections(dsn):
    channel = unique("chan")
    with connect(dsn, autocommit=True) as listener, connect(dsn) as notifier:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        notifier.execute("SELECT pg_notify(%s, %s)", (channel, "hello"))
        # Not delivered before the notifier commits.
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
        notifier.commit()
        received = list(listener.notifies(timeout=5, stop_after=1))
        assert [(n.channel, n.payload) for n in received] == [(channel, "hello")]

        # Several in a row, in order.
        notifier.autocommit = True
        for i in range(5):
            notifier.execute("SELECT pg_notify(%s, %s)", (channel, str(i)))
        received = list(listener.notifies(timeout=5, stop_after=5))
        assert [n.payload for n in received] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_stops_pg_sleep(dsn, method):
    app_name = unique("cancel")
    with connect(dsn, autocommit=True, application_name=app_name) as conn, connect(
        dsn, autocommit=True
    ) as monitor:
        cancelled_at = []

        def cancel_when_running():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                (running,) = monitor.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = %s AND state = 'active' AND query LIKE %s",
                    (app_name, "%pg_sleep(30)%"),
                ).fetchone()
                if running:
                    cancelled_at.append(time.monotonic())
                    getattr(conn, method)()
                    return
                time.sleep(0.05)

        canceller = threading.Thread(target=cancel_when_running)
        started = time.monotonic()
        canceller.start()
        try:
            with pytest.raises(errors.QueryCanceled) as exc:
                conn.execute("SELECT pg_sleep(30)")
        finally:
            canceller.join()
        elapsed = time.monotonic() - started
        assert cancelled_at, "pg_sleep(30) never showed up as active in pg_stat_activity"
        assert elapsed < 5, f"the cancel took effect after {elapsed:.1f} s"
        assert "user request" in str(exc.value)
        # The connection is still usable.
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pipeline_mode(table, conn):
    insert = q("INSERT INTO {t} (id, name) VALUES (%s, %s)", table)
    with conn.pipeline() as pipeline:
        conn.execute(insert, (1, "one"))
        conn.execute(insert, (2, "two"))
        with conn.cursor() as cur:
            cur.executemany(insert, [(i, str(i)) for i in range(3, 50)])
        selects = [conn.execute("SELECT %s::int * 10", (i,)) for i in range(20)]
        count = conn.execute(q("SELECT count(*) FROM {t}", table))
        pipeline.sync()
        assert [c.fetchone()[0] for c in selects] == [i * 10 for i in range(20)]
        assert count.fetchone() == (49,)
    conn.commit()

    # An error inside a pipeline aborts the rest of it; the connection recovers.
    with pytest.raises(errors.UniqueViolation):
        with conn.pipeline():
            conn.execute(insert, (100, "new"))
            conn.execute(insert, (1, "duplicate"))
            conn.execute(insert, (101, "never"))
    conn.rollback()
    assert conn.execute(q("SELECT count(*), max(id) FROM {t}", table)).fetchone() == (49, 49)


def test_wrong_password_is_rejected(dsn):
    with pytest.raises(psycopg.OperationalError) as exc:
        connect(make_conninfo(dsn, password="not-the-password"))
    assert 'password authentication failed for user "app"' in str(exc.value)

    # An unknown user gets the same answer: no user enumeration.
    with pytest.raises(psycopg.OperationalError) as exc:
        connect(make_conninfo(dsn, user="no_such_user", password="whatever"))
    assert 'password authentication failed for user "no_such_user"' in str(exc.value)


def test_fifty_connections_at_once(dsn):
    clients = 50
    start = threading.Barrier(clients)

    def one_client(i):
        start.wait(timeout=30)
        with connect(dsn) as c:
            return c.execute("SELECT %s::int, pg_sleep(0.05)", (i,)).fetchone()[0]

    with ThreadPoolExecutor(max_workers=clients) as executor:
        results = list(executor.map(one_client, range(clients), timeout=120))
    assert sorted(results) == list(range(clients))


def test_startup_parameters_reach_the_server(dsn):
    with connect(
        dsn, application_name="pgswitch-pytest", options="-c work_mem=7MB"
    ) as conn:
        assert conn.info.parameter_status("application_name") == "pgswitch-pytest"
        assert conn.info.parameter_status("client_encoding") == "UTF8"
        assert int(conn.info.server_version) >= 150000
        assert conn.execute("SHOW application_name").fetchone() == ("pgswitch-pytest",)
        assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)


def test_session_state_does_not_leak_to_the_next_client(dsn):
    for _ in range(3):
        with connect(dsn, autocommit=True) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
            conn.execute("SET statement_timeout = '123s'")
            conn.execute("PREPARE leaked AS SELECT 1")
            conn.execute("CREATE TEMP TABLE leaked_temp (id int)")


def test_notices_are_passed_through(conn):
    notices = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
    conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
    assert notices == ["hello from plpgsql"]


def test_large_values_round_trip(conn):
    blob = os.urandom(8 * 1024 * 1024)
    (back,) = conn.execute("SELECT %b::bytea", (blob,), binary=True).fetchone()
    assert back == blob
    text = "x" * (4 * 1024 * 1024)
    assert conn.execute("SELECT length(%s)", (text,)).fetchone() == (len(text),)


def test_server_side_cursor_fetches_in_batches(conn):
    with conn.cursor(name=unique("cur")) as cur:
        cur.itersize = 1000
        cur.execute("SELECT generate_series(1, 10000)")
        assert sum(r[0] for r in cur) == sum(range(1, 10001))
