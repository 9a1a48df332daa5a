"""psycopg 3 and asyncpg through pgswitch in transaction mode: 50 clients over 5 server
connections, prepared-statement-heavy, checking results and that no "prepared statement does
not exist" / "already exists" error ever shows up."""

import asyncio
import os
import threading
import uuid

import asyncpg
import psycopg

DSN = os.environ["PGSWITCH_DSN"]
CLIENTS = 50
ROUNDS = 30


def _url(dsn: str) -> str:
    parts = dict(p.split("=", 1) for p in dsn.split())
    return "postgresql://{user}:{password}@{host}:{port}/{dbname}".format(**parts)


def test_psycopg_prepared_statements_across_shared_servers():
    table = f"psy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(DSN, autocommit=True) as setup:
        setup.execute(f"CREATE TABLE {table} (client int, n int, v text)")
    errors = []

    def client(c: int) -> None:
        try:
            with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as conn:
                for n in range(ROUNDS):
                    conn.execute(
                        f"INSERT INTO {table} VALUES (%s, %s, %s)", (c, n, f"v{c}-{n}")
                    )
                    row = conn.execute(
                        f"SELECT v FROM {table} WHERE client = %s AND n = %s", (c, n)
                    ).fetchone()
                    assert row == (f"v{c}-{n}",), row
                with conn.transaction():
                    conn.execute(f"UPDATE {table} SET v = v || '!' WHERE client = %s", (c,))
                    got = conn.execute(
                        f"SELECT count(*) FROM {table} WHERE client = %s AND v LIKE '%%!'", (c,)
                    ).fetchone()
                    assert got == (ROUNDS,), got
        except Exception as e:  # collected and reported below
            errors.append(f"client {c}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, "\n".join(errors[:10])
    with psycopg.connect(DSN, autocommit=True) as check:
        assert check.execute(f"SELECT count(*) FROM {table}").fetchone() == (CLIENTS * ROUNDS,)
        check.execute(f"DROP TABLE {table}")


def test_asyncpg_prepared_statements_across_shared_servers():
    table = f"apg_{uuid.uuid4().hex[:8]}"
    url = _url(DSN)

    async def main() -> None:
        setup = await asyncpg.connect(url)
        await setup.execute(f"CREATE TABLE {table} (client int, n int, v text)")

        async def client(c: int) -> None:
            # asyncpg prepares every query as a named statement and caches it per connection.
            conn = await asyncpg.connect(url)
            try:
                insert = await conn.prepare(f"INSERT INTO {table} VALUES ($1, $2, $3)")
                select = await conn.prepare(f"SELECT v FROM {table} WHERE client = $1 AND n = $2")
                for n in range(ROUNDS):
                    await insert.fetch(c, n, f"v{c}-{n}")
                    assert await select.fetchval(c, n) == f"v{c}-{n}"
                    assert await conn.fetchval("SELECT $1::int + 1", n) == n + 1
                async with conn.transaction():
                    await conn.execute(f"UPDATE {table} SET v = v || '!' WHERE client = $1", c)
                    assert (
                        await conn.fetchval(
                            f"SELECT count(*) FROM {table} WHERE client = $1 AND v LIKE '%!'", c
                        )
                        == ROUNDS
                    )
            finally:
                await conn.close()

        results = await asyncio.gather(*(client(c) for c in range(CLIENTS)), return_exceptions=True)
        errors = [f"client {c}: {r!r}" for c, r in enumerate(results) if isinstance(r, BaseException)]
        assert not errors, "\n".join(errors[:10])
        assert await setup.fetchval(f"SELECT count(*) FROM {table}") == CLIENTS * ROUNDS
        await setup.execute(f"DROP TABLE {table}")
        await setup.close()

    asyncio.run(asyncio.wait_for(main(), 180))


def test_megabyte_parameters_and_queries_from_both_drivers():
    """Parameters of megabytes (a Bind bigger than what pgswitch reads ahead) and a named
    statement with a 1 MB query, from 10 psycopg threads and 10 asyncpg clients at once over
    the 5 servers, while each waits its turn for a server."""
    size = 3 * 1024 * 1024
    long_query = "SELECT length('" + "q" * (1024 * 1024) + "') + %s::int"
    errors = []

    def psycopg_client(c: int) -> None:
        try:
            with psycopg.connect(DSN, autocommit=True) as conn:
                data = b"y" * (size + c)
                for prepare in (False, True):  # the unnamed statement, then a named one
                    got = conn.execute(
                        "SELECT length(%s::bytea), %s::bytea = repeat('y', %s)::bytea",
                        (data, data, size + c),
                        prepare=prepare,
                    ).fetchone()
                    assert got == (size + c, True), got
                got = conn.execute(long_query, (c,), prepare=True).fetchone()
                assert got == (1024 * 1024 + c,), got
        except Exception as e:  # collected and reported below
            errors.append(f"psycopg client {c}: {type(e).__name__}: {e}")

    async def asyncpg_clients() -> None:
        async def client(c: int) -> None:
            conn = await asyncpg.connect(_url(DSN))
            try:
                data = b"a" * (size + c)
                assert await conn.fetchval("SELECT length($1::bytea)", data) == size + c
                back = await conn.fetchval("SELECT $1::bytea", data)
                assert back == data
            finally:
                await conn.close()

        results = await asyncio.gather(*(client(c) for c in range(10)), return_exceptions=True)
        errors.extend(
            f"asyncpg client {c}: {r!r}" for c, r in enumerate(results) if isinstance(r, BaseException)
        )

    threads = [threading.Thread(target=psycopg_client, args=(c,)) for c in range(10)]
    for t in threads:
        t.start()
    asyncio.run(asyncio.wait_for(asyncpg_clients(), 120))
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a psycopg client hangs"
    assert not errors, "\n".join(errors[:10])


def test_search_path_follows_each_client_of_both_drivers():
    """Half the clients set their own search_path after connecting (psycopg: SET, and
    set_config() with a parameter; asyncpg: SET); the other half set nothing. Over the shared
    servers, each client always sees its own value, through prepared statements too, and the
    others the server default: PostgreSQL 15 does not report search_path, so pgswitch reads it
    back after the transaction that set it and resets it for clients that did not."""
    default = '"$user", public'
    errors = []

    def psycopg_client(c: int) -> None:
        try:
            with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as conn:
                want = default
                if c % 2 == 0:
                    want = f"psy_{c}, public"
                    if c % 4 == 0:
                        conn.execute(f"SET search_path = psy_{c}, public")
                    else:
                        conn.execute("SELECT set_config('search_path', %s, false)", (want,))
                for n in range(ROUNDS):
                    got = conn.execute(
                        "SELECT current_setting('search_path'), %s::int", (n,)
                    ).fetchone()
                    assert got == (want, n), f"round {n}: {got}"
        except Exception as e:  # collected and reported below
            errors.append(f"psycopg client {c}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=psycopg_client, args=(c,)) for c in range(CLIENTS // 2)]
    for t in threads:
        t.start()

    async def asyncpg_clients() -> None:
        async def client(c: int) -> None:
            conn = await asyncpg.connect(_url(DSN))
            try:
                want = default
                if c % 2 == 0:
                    want = f"apg_{c}, public"
                    await conn.execute(f"SET search_path = apg_{c}, public")
                show = await conn.prepare("SELECT current_setting('search_path'), $1::int")
                for n in range(ROUNDS):
                    got = tuple(await show.fetchrow(n))
                    assert got == (want, n), f"round {n}: {got}"
            finally:
                await conn.close()

        results = await asyncio.gather(
            *(client(c) for c in range(CLIENTS // 2)), return_exceptions=True
        )
        errors.extend(
            f"asyncpg client {c}: {r!r}" for c, r in enumerate(results) if isinstance(r, BaseException)
        )

    asyncio.run(asyncio.wait_for(asyncpg_clients(), 180))
    for t in threads:
        t.join(120)
    assert not errors, "\n".join(errors[:10])
