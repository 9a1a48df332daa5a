//! The proxy core in session pooling mode, against a real PostgreSQL cluster, with real clients:
//! tokio-postgres and the psql binary. Every wait is bounded.

mod common;
#[path = "common/panic_watch.rs"]
mod panic_watch;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{on_primary, simple_value, wait_on_primary, within, TestEnv, PASSWORD, USER};
use futures_util::{SinkExt, StreamExt};
use pgswitch::config::{Config, PoolMode, TlsConfig};
use pgswitch::harness::ClusterSpec;
use pgswitch::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

/// Bound for one ordinary request through the proxy.
const STEP: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------------------------

/// A primary-only cluster with a session-mode pgswitch in front, configured by `tweak`.
async fn env(tweak: impl FnOnce(&mut Config)) -> TestEnv {
    panic_watch::install();
    TestEnv::start(
        ClusterSpec {
            standbys: 0,
            ..ClusterSpec::default()
        },
        |c| {
            c.pool_mode = PoolMode::Session;
            tweak(c);
        },
    )
    .await
}

/// Another pgswitch in front of the same cluster, configured by `tweak`.
async fn extra_proxy(env: &TestEnv, name: &str, tweak: impl FnOnce(&mut Config)) -> Running {
    let state_file = env.cluster.dir.join(format!("pgswitch-{name}.state"));
    let config = common::config_for(&env.cluster, |c| {
        c.pool_mode = PoolMode::Session;
        c.coordination.state_file = state_file;
        tweak(c);
    });
    pgswitch::server::start(config)
        .await
        .unwrap_or_else(|e| panic!("pgswitch {name} starts: {e:#}"))
}

fn dsn_for(proxy: &Running, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=postgres connect_timeout=10",
        proxy.listen_addr.port()
    )
}

async fn connect_dsn(dsn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = within("connect", STEP, tokio_postgres::connect(dsn, NoTls)).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The SQLSTATE of a tokio-postgres error, or a description when there is none.
fn sqlstate(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(code) => code.code().to_string(),
        None => format!("<no SQLSTATE: {e}>"),
    }
}

fn expect_sqlstate<T: std::fmt::Debug>(
    result: Result<T, tokio_postgres::Error>,
    want: &SqlState,
    what: &str,
) {
    match result {
        Ok(v) => panic!(
            "{what}: expected SQLSTATE {}, got success {v:?}",
            want.code()
        ),
        Err(e) => assert_eq!(sqlstate(&e), want.code(), "{what}: unexpected error {e:?}"),
    }
}

/// What a psql run printed.
#[derive(Debug)]
struct PsqlRun {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `/usr/bin/psql -X -At -v ON_ERROR_STOP=1 -d CONNINFO -c SQL` (bounded to 60 s), with a
/// clean environment plus `env`, feeding `stdin`.
async fn psql(conninfo: String, sql: &str, env: &[(&str, &str)], stdin: Option<String>) -> PsqlRun {
    let sql = sql.to_string();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("timeout");
        cmd.args([
            "-k",
            "5",
            "60",
            "/usr/bin/psql",
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
        ])
        .arg(&conninfo)
        .arg("-c")
        .arg(&sql)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LANG", "C.UTF-8")
        .env("PGCONNECT_TIMEOUT", "10")
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().expect("psql runs");
        if let Some(input) = stdin {
            use std::io::Write as _;
            let mut pipe = child.stdin.take().expect("psql stdin");
            pipe.write_all(input.as_bytes())
                .expect("writing psql stdin");
        }
        let out = child.wait_with_output().expect("psql output");
        PsqlRun {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
    })
    .await
    .expect("psql task")
}

fn proxy_conninfo(port: u16, user: &str, extra: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} dbname=postgres {extra}")
}

/// A fresh temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("pgswitch-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads until the peer closes (bounded); returns what arrived.
async fn read_to_close(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    within("close", Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    all
}

/// A self-signed certificate for CN=localhost made with the openssl CLI: (cert, key).
async fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let (c, k) = (cert.clone(), key.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args([
                "60", "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
            ])
            .arg(&k)
            .arg("-out")
            .arg(&c)
            .args(["-days", "1", "-subj", "/CN=localhost"])
            .output()
            .expect("openssl runs")
    })
    .await
    .expect("openssl task");
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// Several expectations checked together, so one failure does not hide the others.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn eq(&mut self, what: &str, got: impl AsRef<str>, want: &str) {
        if got.as_ref() != want {
            self.0
                .push(format!("{what}: got {:?}, want {want:?}", got.as_ref()));
        }
    }

    fn ne(&mut self, what: &str, got: impl AsRef<str>, unwanted: &str) {
        if got.as_ref() == unwanted {
            self.0
                .push(format!("{what}: got {unwanted:?}, which must not be"));
        }
    }

    fn assert_all(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// tokio-postgres
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_and_transactions_commit_roll_back_and_survive_errors() {
    let env = env(|_| {}).await;
    let mut client = env.connect().await;

    // Simple and extended query protocol.
    assert_eq!(simple_value(&client, "SELECT 1 AS one").await, "1");
    let row = within(
        "extended query",
        STEP,
        client.query_one("SELECT $1::int4 + 1, $2::text", &[&41i32, &"two"]),
    )
    .await
    .expect("extended query");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "two");

    // Several statements in one simple query; autocommit is visible on the primary at once.
    within(
        "create",
        STEP,
        client.batch_execute(
            "CREATE TABLE tx_t (id int PRIMARY KEY, v text); INSERT INTO tx_t VALUES (0, 'auto')",
        ),
    )
    .await
    .expect("create + insert");
    assert_eq!(on_primary(&env, "SELECT count(*) FROM tx_t").await, "1");

    // The session keeps one server backend for its whole life.
    let pid = simple_value(&client, "SELECT pg_backend_pid()").await;

    // COMMIT: invisible on the primary while open, visible after.
    client
        .batch_execute("BEGIN; INSERT INTO tx_t VALUES (1, 'committed')")
        .await
        .expect("begin + insert");
    assert_eq!(
        on_primary(&env, "SELECT count(*) FROM tx_t WHERE id = 1").await,
        "0"
    );
    client.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        on_primary(&env, "SELECT count(*) FROM tx_t WHERE id = 1").await,
        "1"
    );

    // ROLLBACK: never visible.
    client
        .batch_execute("BEGIN; INSERT INTO tx_t VALUES (2, 'rolled back')")
        .await
        .expect("begin + insert");
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(
        on_primary(&env, "SELECT count(*) FROM tx_t WHERE id = 2").await,
        "0"
    );

    // The same through tokio-postgres' Transaction (extended protocol).
    let tx = client.transaction().await.expect("transaction");
    tx.execute("INSERT INTO tx_t VALUES ($1, $2)", &[&3i32, &"tx commit"])
        .await
        .expect("insert 3");
    tx.commit().await.expect("commit 3");
    let tx = client.transaction().await.expect("transaction");
    tx.execute("INSERT INTO tx_t VALUES ($1, $2)", &[&4i32, &"tx rollback"])
        .await
        .expect("insert 4");
    tx.rollback().await.expect("rollback 4");
    assert_eq!(
        on_primary(
            &env,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM tx_t"
        )
        .await,
        "0,1,3"
    );

    // An error inside a transaction aborts it; ROLLBACK recovers the connection.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .execute("INSERT INTO tx_t VALUES (5, 'lost')", &[])
        .await
        .expect("insert 5");
    expect_sqlstate(
        client
            .execute("INSERT INTO tx_t VALUES (1, 'duplicate')", &[])
            .await,
        &SqlState::UNIQUE_VIOLATION,
        "duplicate key",
    );
    expect_sqlstate(
        client.simple_query("SELECT 1").await,
        &SqlState::IN_FAILED_SQL_TRANSACTION,
        "query in an aborted transaction",
    );
    client
        .batch_execute("ROLLBACK")
        .await
        .expect("rollback after error");
    let count: i64 = client
        .query_one("SELECT count(*) FROM tx_t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 3, "the aborted transaction's insert must be gone");

    // Errors outside a transaction leave the session usable.
    expect_sqlstate(
        client.simple_query("SELECT 1/0").await,
        &SqlState::DIVISION_BY_ZERO,
        "1/0",
    );
    expect_sqlstate(
        client.simple_query("SELEC 1").await,
        &SqlState::SYNTAX_ERROR,
        "syntax error",
    );
    expect_sqlstate(
        client.query("SELECT * FROM no_such_table", &[]).await,
        &SqlState::UNDEFINED_TABLE,
        "no table",
    );
    assert_eq!(simple_value(&client, "SELECT 2").await, "2");

    // Savepoints.
    client
        .batch_execute("BEGIN; INSERT INTO tx_t VALUES (6, 'kept'); SAVEPOINT s")
        .await
        .expect("savepoint");
    expect_sqlstate(
        client
            .simple_query("INSERT INTO tx_t VALUES (6, 'dup')")
            .await,
        &SqlState::UNIQUE_VIOLATION,
        "duplicate in savepoint",
    );
    client
        .batch_execute("ROLLBACK TO SAVEPOINT s; INSERT INTO tx_t VALUES (7, 'after'); COMMIT")
        .await
        .expect("rollback to savepoint + commit");
    assert_eq!(
        on_primary(
            &env,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM tx_t"
        )
        .await,
        "0,1,3,6,7"
    );

    // An error in the middle of a multi-statement simple query stops it there.
    expect_sqlstate(
        client
            .batch_execute(
                "INSERT INTO tx_t VALUES (8, 'x'); SELECT 1/0; INSERT INTO tx_t VALUES (9, 'y')",
            )
            .await,
        &SqlState::DIVISION_BY_ZERO,
        "multi-statement with error",
    );
    assert_eq!(
        on_primary(&env, "SELECT count(*) FROM tx_t WHERE id IN (8, 9)").await,
        "0"
    );

    assert_eq!(
        simple_value(&client, "SELECT pg_backend_pid()").await,
        pid,
        "session mode keeps one backend"
    );
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_run_many_times_and_pipelined_queries_all_get_their_answers() {
    let env = env(|_| {}).await;
    let client = env.connect().await;

    // One prepared statement, executed many times with parameters.
    let stmt = within(
        "prepare",
        STEP,
        client.prepare("SELECT $1::int4 * 2, $2::text || '!'"),
    )
    .await
    .expect("prepare");
    for i in 0..300i32 {
        let text = format!("v{i}");
        let row = within("execute", STEP, client.query_one(&stmt, &[&i, &text]))
            .await
            .expect("execute");
        assert_eq!(row.get::<_, i32>(0), i * 2);
        assert_eq!(row.get::<_, String>(1), format!("v{i}!"));
    }

    // Several named statements alive at once.
    client
        .batch_execute("CREATE TABLE prep_t (id int PRIMARY KEY, v text)")
        .await
        .expect("create");
    let insert = client
        .prepare_typed(
            "INSERT INTO prep_t VALUES ($1, $2)",
            &[
                tokio_postgres::types::Type::INT4,
                tokio_postgres::types::Type::TEXT,
            ],
        )
        .await
        .expect("prepare insert");
    let select = client
        .prepare("SELECT v FROM prep_t WHERE id = $1")
        .await
        .expect("prepare select");
    for i in 0..100i32 {
        let v = format!("row {i}");
        assert_eq!(client.execute(&insert, &[&i, &v]).await.expect("insert"), 1);
        let got: String = client
            .query_one(&select, &[&i])
            .await
            .expect("select")
            .get(0);
        assert_eq!(got, v);
    }
    assert_eq!(on_primary(&env, "SELECT count(*) FROM prep_t").await, "100");

    // Pipelining: 200 queries in flight at once, each gets its own answer, in order.
    let started = Instant::now();
    let pipelined = (0..200i32).map(|i| {
        let (client, stmt) = (&client, &stmt);
        async move {
            let text = format!("p{i}");
            client
                .query_one(stmt, &[&i, &text])
                .await
                .map(|row| (row.get::<_, i32>(0), row.get::<_, String>(1)))
        }
    });
    let results = within(
        "200 pipelined queries",
        STEP,
        futures_util::future::join_all(pipelined),
    )
    .await;
    for (i, r) in results.into_iter().enumerate() {
        let (n, s) = r.unwrap_or_else(|e| panic!("pipelined query {i}: {e:?}"));
        assert_eq!((n, s), (i as i32 * 2, format!("p{i}!")));
    }
    println!("200 pipelined queries took {:?}", started.elapsed());

    // An error in the middle of a pipeline fails only its own query.
    let (one, three, a_text, c_text) = (1i32, 3i32, "a", "c");
    let params_a: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&one, &a_text];
    let params_c: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&three, &c_text];
    let (a, b, c) = within("pipeline with an error", STEP, async {
        tokio::join!(
            client.query_one(&stmt, &params_a),
            client.query_one("SELECT 1/0", &[]),
            client.query_one(&stmt, &params_c),
        )
    })
    .await;
    assert_eq!(a.expect("first").get::<_, i32>(0), 2);
    expect_sqlstate(b, &SqlState::DIVISION_BY_ZERO, "middle of the pipeline");
    assert_eq!(c.expect("third").get::<_, i32>(0), 6);

    // Pipelined Parse messages too: 30 statements prepared at once, then executed at once.
    let prepares = (0..30).map(|i| {
        let client = &client;
        async move {
            client
                .prepare(&format!("SELECT {i}::int4 + $1::int4"))
                .await
        }
    });
    let stmts: Vec<_> = within(
        "pipelined prepares",
        STEP,
        futures_util::future::join_all(prepares),
    )
    .await
    .into_iter()
    .map(|r| r.expect("pipelined prepare"))
    .collect();
    let executes = stmts.iter().map(|s| {
        let client = &client;
        async move {
            client
                .query_one(s, &[&1000i32])
                .await
                .map(|r| r.get::<_, i32>(0))
        }
    });
    let values = within(
        "pipelined executes",
        STEP,
        futures_util::future::join_all(executes),
    )
    .await;
    for (i, v) in values.into_iter().enumerate() {
        assert_eq!(v.expect("pipelined execute"), 1000 + i as i32);
    }

    // Pipelined inserts inside a transaction, then commit.
    client.batch_execute("BEGIN").await.expect("begin");
    let inserts = (1000..1100i32).map(|i| {
        let (client, insert) = (&client, &insert);
        async move {
            let v = format!("pipelined {i}");
            client.execute(insert, &[&i, &v]).await
        }
    });
    for r in within(
        "pipelined inserts",
        STEP,
        futures_util::future::join_all(inserts),
    )
    .await
    {
        assert_eq!(r.expect("pipelined insert"), 1);
    }
    client.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(on_primary(&env, "SELECT count(*) FROM prep_t").await, "200");
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_and_copy_to_stdout_move_every_row() {
    let env = env(|_| {}).await;
    let client = env.connect().await;
    client
        .batch_execute("CREATE TABLE copy_t (id int, name text)")
        .await
        .expect("create");

    // COPY FROM STDIN: 10 000 rows in chunks of 1 000.
    let sink = within(
        "copy_in",
        STEP,
        client.copy_in::<_, Bytes>("COPY copy_t (id, name) FROM STDIN"),
    )
    .await
    .expect("copy_in");
    let mut sink = Box::pin(sink);
    for chunk in 0..10 {
        let mut data = String::new();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            data.push_str(&format!("{i}\tname {i}\n"));
        }
        within("copy data", STEP, sink.send(Bytes::from(data)))
            .await
            .expect("send copy data");
    }
    let rows = within("copy finish", STEP, sink.as_mut().finish())
        .await
        .expect("finish copy");
    assert_eq!(rows, 10_000, "COPY FROM STDIN row count");
    assert_eq!(
        on_primary(
            &env,
            "SELECT count(*), count(DISTINCT id), sum(id) FROM copy_t"
        )
        .await,
        "10000|10000|49995000"
    );

    // COPY TO STDOUT.
    let stream = within("copy_out", STEP, client.copy_out("COPY copy_t TO STDOUT"))
        .await
        .expect("copy_out");
    let mut stream = Box::pin(stream);
    let mut out = Vec::new();
    while let Some(chunk) = within("copy out data", STEP, stream.next()).await {
        out.extend_from_slice(&chunk.expect("copy out chunk"));
    }
    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10_000, "COPY TO STDOUT row count");
    let sum: i64 = lines
        .iter()
        .map(|l| l.split('\t').next().unwrap().parse::<i64>().expect("id"))
        .sum();
    assert_eq!(sum, 49_995_000);
    assert!(lines.contains(&"9999\tname 9999"));

    // A bigger COPY TO STDOUT from a query (about 10 MB).
    let stream = client
        .copy_out("COPY (SELECT g, repeat('y', 100) FROM generate_series(1, 100000) g) TO STDOUT")
        .await
        .expect("copy_out query");
    let mut stream = Box::pin(stream);
    let (mut bytes, mut newlines) = (0usize, 0usize);
    while let Some(chunk) = within("copy out data", STEP, stream.next()).await {
        let chunk = chunk.expect("chunk");
        bytes += chunk.len();
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(newlines, 100_000);
    println!("COPY TO STDOUT of 100000 rows: {bytes} bytes");

    // Bad data in COPY FROM STDIN: the COPY fails, nothing is inserted, the session goes on.
    let sink = client
        .copy_in::<_, Bytes>("COPY copy_t (id, name) FROM STDIN")
        .await
        .expect("copy_in");
    let mut sink = Box::pin(sink);
    let sent = sink
        .send(Bytes::from_static(b"1\tok\nnot-a-number\tbad\n"))
        .await;
    let finished = match sent {
        Ok(()) => sink.as_mut().finish().await,
        Err(e) => Err(e),
    };
    expect_sqlstate(
        finished,
        &SqlState::INVALID_TEXT_REPRESENTATION,
        "COPY with bad data",
    );
    assert_eq!(
        simple_value(&client, "SELECT count(*) FROM copy_t").await,
        "10000"
    );
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_delivers_notifications_through_the_proxy() {
    let env = env(|_| {}).await;
    let (listener, mut connection) = within(
        "connect",
        STEP,
        tokio_postgres::connect(&env.app_dsn(), NoTls),
    )
    .await
    .expect("listener connects");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    });
    listener
        .batch_execute("LISTEN events")
        .await
        .expect("LISTEN");
    let notifier = env.connect().await;

    notifier
        .batch_execute("NOTIFY events, 'hello'")
        .await
        .expect("NOTIFY");
    let got = within("notification", Duration::from_secs(5), rx.recv()).await;
    assert_eq!(got, Some(("events".to_string(), "hello".to_string())));

    // Inside a transaction: delivered only after COMMIT.
    notifier
        .batch_execute("BEGIN; SELECT pg_notify('events', 'in-tx')")
        .await
        .expect("notify in tx");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "a notification must not arrive before its transaction commits"
    );
    notifier.batch_execute("COMMIT").await.expect("commit");
    let got = within(
        "notification after commit",
        Duration::from_secs(5),
        rx.recv(),
    )
    .await;
    assert_eq!(got, Some(("events".to_string(), "in-tx".to_string())));

    // Many notifications, in order, while the listener is idle.
    for i in 0..100 {
        notifier
            .execute("SELECT pg_notify('events', $1)", &[&format!("n{i}")])
            .await
            .expect("pg_notify");
    }
    for i in 0..100 {
        let got = within("notification burst", Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got, Some(("events".to_string(), format!("n{i}"))));
    }

    // A channel the listener did not LISTEN to, and UNLISTEN.
    notifier
        .batch_execute("NOTIFY other, 'nope'")
        .await
        .expect("NOTIFY other");
    listener
        .batch_execute("UNLISTEN events")
        .await
        .expect("UNLISTEN");
    notifier
        .batch_execute("NOTIFY events, 'after unlisten'")
        .await
        .expect("NOTIFY");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "no notification after UNLISTEN or on other channels"
    );
    assert_eq!(
        simple_value(&listener, "SELECT 'still here'").await,
        "still here"
    );
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_bytea_value_and_a_700_kb_query_get_through() {
    const SIZE: usize = 100 * 1024 * 1024;
    let env = env(|_| {}).await;
    let client = env.connect().await;
    let big = Duration::from_secs(180);

    // Server to client.
    let started = Instant::now();
    let row = within(
        "100 MB select",
        big,
        client.query_one("SELECT repeat('x', 100*1024*1024)::bytea", &[]),
    )
    .await
    .expect("100 MB select");
    let value: &[u8] = row.get(0);
    assert_eq!(value.len(), SIZE);
    assert!(value.iter().all(|&b| b == b'x'), "every byte is 'x'");
    drop(row);
    println!("100 MB bytea server -> client: {:?}", started.elapsed());

    // Client to server.
    client
        .batch_execute("CREATE TABLE big_t (v bytea)")
        .await
        .expect("create");
    let data = vec![b'y'; SIZE];
    let started = Instant::now();
    let n = within(
        "100 MB insert",
        big,
        client.execute("INSERT INTO big_t VALUES ($1)", &[&data]),
    )
    .await
    .expect("100 MB insert");
    assert_eq!(n, 1);
    drop(data);
    println!("100 MB bytea client -> server: {:?}", started.elapsed());
    assert_eq!(
        on_primary(
            &env,
            "SELECT length(v), v = repeat('y', 100*1024*1024)::bytea FROM big_t"
        )
        .await,
        "104857600|t"
    );

    // And back as text through the simple query protocol (hex: 200 MB + 2 bytes).
    let started = Instant::now();
    let messages = within(
        "100 MB simple query",
        big,
        client.simple_query("SELECT v FROM big_t"),
    )
    .await
    .expect("simple query of 100 MB");
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    let hex = row.get(0).expect("not null");
    assert_eq!(hex.len(), 2 + 2 * SIZE);
    assert!(hex.starts_with("\\x7979"));
    println!("100 MB bytea as hex text: {:?}", started.elapsed());
    drop(messages);

    // A named statement whose query text (700 KB) is more than pgswitch reads ahead of the
    // server, but small enough to be remembered for a failover: its Parse is held whole.
    let text = "q".repeat(700 * 1024);
    let statement = within(
        "prepare a 700 KB query",
        big,
        client.prepare(&format!("SELECT length('{text}') + $1::int")),
    )
    .await
    .expect("prepare a 700 KB query");
    let row = within("run it", big, client.query_one(&statement, &[&1i32]))
        .await
        .expect("run the 700 KB query");
    assert_eq!(row.get::<_, i32>(0), 700 * 1024 + 1);

    assert_eq!(simple_value(&client, "SELECT 'after'").await, "after");
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_are_applied_on_the_server_and_do_not_leak_to_the_next_client() {
    let env = env(|_| {}).await;
    on_primary(
        &env,
        "CREATE SCHEMA myschema AUTHORIZATION app; CREATE TABLE myschema.only_in_myschema (x int); \
         GRANT ALL ON myschema.only_in_myschema TO app",
    )
    .await;
    let mut checks = Checks::default();
    let mut cfg: tokio_postgres::Config = env.app_dsn().parse().expect("dsn");
    cfg.application_name("spec_app")
        .options("-c statement_timeout=1234 -c search_path=myschema,public -c TimeZone=Asia/Tokyo");
    let (client, connection) = within("connect", STEP, cfg.connect(NoTls))
        .await
        .expect("connect with parameters");
    tokio::spawn(connection);

    checks.eq(
        "application_name",
        simple_value(&client, "SELECT current_setting('application_name')").await,
        "spec_app",
    );
    checks.eq(
        "statement_timeout",
        simple_value(&client, "SHOW statement_timeout").await,
        "1234ms",
    );
    checks.eq(
        "TimeZone",
        simple_value(&client, "SHOW TimeZone").await,
        "Asia/Tokyo",
    );
    // PostgreSQL itself, given `-c search_path=myschema,public`, searches two schemas.
    checks.eq(
        "search_path from options (-c search_path=myschema,public)",
        simple_value(&client, "SELECT current_schemas(false)::text").await,
        "{myschema,public}",
    );
    checks.eq(
        "an unqualified table of the first schema in search_path",
        match client
            .simple_query("SELECT count(*) FROM only_in_myschema")
            .await
        {
            Ok(_) => "found".to_string(),
            Err(e) => format!("{e:?}"),
        },
        "found",
    );
    checks.eq(
        "application_name in pg_stat_activity",
        on_primary(
            &env,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'spec_app'",
        )
        .await,
        "1",
    );
    // statement_timeout really applies.
    let started = Instant::now();
    expect_sqlstate(
        within(
            "pg_sleep under statement_timeout",
            STEP,
            client.simple_query("SELECT pg_sleep(10)"),
        )
        .await,
        &SqlState::QUERY_CANCELED,
        "statement_timeout",
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(client);

    // With one server connection, the next client gets the same backend, reset.
    let solo = extra_proxy(&env, "solo", |c| c.default_pool_size = 1).await;
    let mut cfg: tokio_postgres::Config = dsn_for(&solo, USER, PASSWORD).parse().expect("dsn");
    cfg.application_name("leaky")
        .options("-c statement_timeout=4321");
    let (first, connection) = cfg.connect(NoTls).await.expect("first client");
    let first_conn = tokio::spawn(connection);
    first
        .batch_execute(
            "SET work_mem = '7MB'; SET search_path = leaked, public; PREPARE leaked_stmt AS SELECT 1; \
             CREATE TEMP TABLE leaked_tmp (x int); LISTEN leaked_channel",
        )
        .await
        .expect("session state");
    let first_pid = simple_value(&first, "SELECT pg_backend_pid()").await;
    drop(first);
    let _ = within("first client closes", STEP, first_conn).await;

    let second = within(
        "second client",
        STEP,
        connect_dsn(&dsn_for(&solo, USER, PASSWORD)),
    )
    .await
    .expect("second client connects");
    checks.eq(
        "session pooling reuses the only server connection",
        simple_value(&second, "SELECT pg_backend_pid()").await,
        &first_pid,
    );
    checks.ne(
        "application_name of the next client",
        simple_value(&second, "SELECT current_setting('application_name')").await,
        "leaky",
    );
    checks.eq(
        "statement_timeout of the next client",
        simple_value(&second, "SHOW statement_timeout").await,
        "0",
    );
    checks.eq(
        "work_mem of the next client",
        simple_value(&second, "SHOW work_mem").await,
        "4MB",
    );
    checks.eq(
        "search_path of the next client",
        simple_value(&second, "SHOW search_path").await,
        "\"$user\", public",
    );
    checks.eq(
        "prepared statements of the next client",
        simple_value(&second, "SELECT count(*) FROM pg_prepared_statements").await,
        "0",
    );
    checks.eq(
        "temp tables of the next client",
        simple_value(
            &second,
            "SELECT count(*) FROM pg_class WHERE relname = 'leaked_tmp'",
        )
        .await,
        "0",
    );
    checks.eq(
        "LISTEN channels of the next client",
        simple_value(&second, "SELECT count(*) FROM pg_listening_channels()").await,
        "0",
    );
    checks.assert_all();
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_the_clients_pg_sleep_and_nothing_else() {
    let env = env(|_| {}).await;
    let victim = env.connect().await;
    let bystander = env.connect().await;

    let bystander_task = tokio::spawn(async move {
        let started = Instant::now();
        let result = bystander
            .simple_query("SELECT pg_sleep(3) /* bystander */")
            .await;
        (result.map(|_| ()), started.elapsed(), bystander)
    });
    let token = victim.cancel_token();
    let victim_task = tokio::spawn(async move {
        let result = victim
            .simple_query("SELECT pg_sleep(30) /* victim */")
            .await;
        (result.map(|_| ()), Instant::now(), victim)
    });
    wait_on_primary(
        &env,
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(%'",
        "2",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        !bystander_task.is_finished(),
        "the bystander still sleeps when the cancel is sent"
    );

    let sent = Instant::now();
    within("cancel request", STEP, token.cancel_query(NoTls))
        .await
        .expect("cancel request sent");
    let (result, finished, victim) =
        within("cancelled query", Duration::from_secs(10), victim_task)
            .await
            .expect("victim task");
    let latency = finished.duration_since(sent);
    println!("cancel latency through pgswitch: {latency:?}");
    expect_sqlstate(result, &SqlState::QUERY_CANCELED, "cancelled pg_sleep(30)");
    assert!(latency < Duration::from_secs(5), "cancel took {latency:?}");

    let (result, slept, _bystander) = within("bystander", STEP, bystander_task)
        .await
        .expect("bystander task");
    result.unwrap_or_else(|e| panic!("the bystander's pg_sleep(3) must not be cancelled: {e:?}"));
    assert!(
        slept >= Duration::from_secs(3),
        "the bystander slept only {slept:?}"
    );

    // The cancelled session goes on; a cancel while idle does nothing to the next query.
    assert_eq!(simple_value(&victim, "SELECT 'alive'").await, "alive");
    victim
        .cancel_token()
        .cancel_query(NoTls)
        .await
        .expect("idle cancel sent");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    victim
        .simple_query("SELECT pg_sleep(0.5)")
        .await
        .expect("a later query is not cancelled");
    assert!(started.elapsed() >= Duration::from_millis(500));
    panic_watch::assert_no_proxy_panics();
}

// ---------------------------------------------------------------------------------------------
// psql
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_queries_and_wrong_password_and_unknown_user_fail_alike() {
    let env = env(|_| {}).await;
    let port = env.port();

    let ok = psql(
        proxy_conninfo(port, USER, ""),
        "select 1",
        &[("PGPASSWORD", PASSWORD)],
        None,
    )
    .await;
    assert!(ok.success, "psql -c 'select 1' failed: {ok:?}");
    assert_eq!(ok.stdout, "1");

    let wrong = psql(
        proxy_conninfo(port, USER, ""),
        "select 1",
        &[("PGPASSWORD", "wrong")],
        None,
    )
    .await;
    assert!(!wrong.success, "a wrong password must fail: {wrong:?}");
    assert!(
        wrong
            .stderr
            .contains("password authentication failed for user \"app\""),
        "stderr: {}",
        wrong.stderr
    );

    let unknown = psql(
        proxy_conninfo(port, "nobody", ""),
        "select 1",
        &[("PGPASSWORD", PASSWORD)],
        None,
    )
    .await;
    assert!(!unknown.success, "an unknown user must fail: {unknown:?}");
    assert!(
        unknown
            .stderr
            .contains("password authentication failed for user \"nobody\""),
        "stderr: {}",
        unknown.stderr
    );

    // Startup parameters from libpq's environment.
    let params = psql(
        proxy_conninfo(port, USER, ""),
        "SELECT current_setting('application_name'), current_setting('statement_timeout'), \
         current_setting('TimeZone'), current_setting('DateStyle'), current_setting('client_encoding')",
        &[
            ("PGPASSWORD", PASSWORD),
            ("PGAPPNAME", "psql_spec"),
            ("PGOPTIONS", "-c statement_timeout=1234"),
            ("PGTZ", "Europe/Paris"),
            ("PGDATESTYLE", "German"),
            ("PGCLIENTENCODING", "LATIN1"),
        ],
        None,
    )
    .await;
    assert!(params.success, "{params:?}");
    assert_eq!(
        params.stdout,
        "psql_spec|1234ms|Europe/Paris|German, DMY|LATIN1"
    );

    // COPY FROM STDIN fed by psql's stdin, then a script with several statements.
    let setup = psql(
        proxy_conninfo(port, USER, ""),
        "CREATE TABLE psql_t (id int, v text)",
        &[("PGPASSWORD", PASSWORD)],
        None,
    )
    .await;
    assert!(setup.success, "{setup:?}");
    let data: String = (0..1000).map(|i| format!("{i}\tv{i}\n")).collect();
    let copy = psql(
        proxy_conninfo(port, USER, ""),
        "COPY psql_t FROM STDIN",
        &[("PGPASSWORD", PASSWORD)],
        Some(data),
    )
    .await;
    assert!(copy.success, "{copy:?}");
    assert_eq!(copy.stdout, "COPY 1000");
    let check = psql(
        proxy_conninfo(port, USER, ""),
        "BEGIN; DELETE FROM psql_t WHERE id >= 500; ROLLBACK; SELECT count(*) FROM psql_t",
        &[("PGPASSWORD", PASSWORD)],
        None,
    )
    .await;
    assert!(check.success, "{check:?}");
    assert!(check.stdout.ends_with("1000"), "{check:?}");
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_sslmode_require_works_and_plaintext_clients_still_connect() {
    let dir = TempDir::new("tls");
    let (cert, key) = self_signed_cert(&dir.0).await;
    let (c, k) = (cert.clone(), key.clone());
    let env = env(move |config| config.tls = Some(TlsConfig { cert: c, key: k })).await;
    let port = env.port();
    let password = [("PGPASSWORD", PASSWORD)];

    let require = psql(
        proxy_conninfo(port, USER, "sslmode=require"),
        "SELECT 1",
        &password,
        None,
    )
    .await;
    assert!(require.success, "sslmode=require: {require:?}");
    assert_eq!(require.stdout, "1");

    let info = psql(
        proxy_conninfo(port, USER, "sslmode=require"),
        "\\conninfo",
        &password,
        None,
    )
    .await;
    assert!(info.success, "{info:?}");
    assert!(
        info.stdout.contains("SSL connection"),
        "\\conninfo over sslmode=require: {}",
        info.stdout
    );

    // The proxy presents the configured certificate.
    let verify = psql(
        proxy_conninfo(
            port,
            USER,
            &format!("sslmode=verify-ca sslrootcert={}", cert.display()),
        ),
        "SELECT 'verified'",
        &password,
        None,
    )
    .await;
    assert!(
        verify.success,
        "sslmode=verify-ca with the proxy's certificate: {verify:?}"
    );
    assert_eq!(verify.stdout, "verified");

    // Wrong password over TLS: the same 28P01 message.
    let wrong = psql(
        proxy_conninfo(port, USER, "sslmode=require"),
        "SELECT 1",
        &[("PGPASSWORD", "nope")],
        None,
    )
    .await;
    assert!(!wrong.success);
    assert!(
        wrong
            .stderr
            .contains("password authentication failed for user \"app\""),
        "{wrong:?}"
    );

    // Plaintext still works.
    let plain = psql(
        proxy_conninfo(port, USER, "sslmode=disable"),
        "\\conninfo",
        &password,
        None,
    )
    .await;
    assert!(plain.success, "sslmode=disable: {plain:?}");
    assert!(!plain.stdout.contains("SSL connection"), "{}", plain.stdout);
    let plain = psql(
        proxy_conninfo(port, USER, "sslmode=disable"),
        "SELECT 2",
        &password,
        None,
    )
    .await;
    assert_eq!(plain.stdout, "2", "{plain:?}");

    // Plaintext bytes sent along with the SSLRequest could be injected by a man in the middle:
    // refused. A TLS handshake of garbage: closed.
    let mut ssl_request = 8u32.to_be_bytes().to_vec();
    ssl_request.extend_from_slice(&80_877_103u32.to_be_bytes());
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    let mut injected = ssl_request.clone();
    injected.extend_from_slice(&[0, 0, 0, 8, 0, 3, 0, 0]);
    tcp.write_all(&injected).await.expect("send");
    let answer = read_to_close(&mut tcp).await;
    assert!(
        !answer.starts_with(b"S"),
        "TLS must not start after injected plaintext: {answer:?}"
    );
    assert!(
        answer.first() == Some(&b'E') && String::from_utf8_lossy(&answer).contains("08P01"),
        "injected plaintext after SSLRequest: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    tcp.write_all(&ssl_request).await.expect("send");
    let mut s = [0u8; 1];
    within("SSL answer", STEP, tcp.read_exact(&mut s))
        .await
        .expect("SSL answer");
    assert_eq!(&s, b"S");
    tcp.write_all(b"this is not a TLS ClientHello, not at all\r\n")
        .await
        .expect("send");
    read_to_close(&mut tcp).await;

    // A bigger result over TLS.
    let big = psql(
        proxy_conninfo(port, USER, "sslmode=require"),
        "SELECT length(string_agg(repeat('z', 1000), '')) FROM generate_series(1, 10000)",
        &password,
        None,
    )
    .await;
    assert_eq!(big.stdout, "10000000", "{big:?}");
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_cleartext_and_trust_client_auth_let_in_exactly_who_they_should() {
    let env = env(|_| {}).await;
    for method in ["md5", "password"] {
        let proxy = extra_proxy(&env, method, |c| c.auth_type = method.to_string()).await;
        let port = proxy.listen_addr.port();
        let ok = psql(
            proxy_conninfo(port, USER, ""),
            "SELECT 'in'",
            &[("PGPASSWORD", PASSWORD)],
            None,
        )
        .await;
        assert!(ok.success, "{method}: right password: {ok:?}");
        assert_eq!(ok.stdout, "in");
        let wrong = psql(
            proxy_conninfo(port, USER, ""),
            "SELECT 1",
            &[("PGPASSWORD", "wrong")],
            None,
        )
        .await;
        assert!(!wrong.success, "{method}: wrong password must fail");
        assert!(
            wrong
                .stderr
                .contains("password authentication failed for user \"app\""),
            "{method}: {wrong:?}"
        );
        let unknown = psql(
            proxy_conninfo(port, "nobody", ""),
            "SELECT 1",
            &[("PGPASSWORD", PASSWORD)],
            None,
        )
        .await;
        assert!(!unknown.success, "{method}: unknown user must fail");
        assert!(
            unknown
                .stderr
                .contains("password authentication failed for user \"nobody\""),
            "{method}: {unknown:?}"
        );
        // tokio-postgres speaks the same method.
        let client = connect_dsn(&dsn_for(&proxy, USER, PASSWORD))
            .await
            .unwrap_or_else(|e| panic!("{method}: tokio-postgres: {e:?}"));
        assert_eq!(simple_value(&client, "SELECT 'tp'").await, "tp");
        let bad = connect_dsn(&dsn_for(&proxy, USER, "wrong")).await;
        expect_sqlstate(
            bad.map(|_| ()),
            &SqlState::INVALID_PASSWORD,
            "tokio-postgres, wrong password",
        );
    }

    let trust = extra_proxy(&env, "trust", |c| c.auth_type = "trust".to_string()).await;
    let port = trust.listen_addr.port();
    let ok = psql(
        proxy_conninfo(port, USER, ""),
        "SELECT current_user",
        &[],
        None,
    )
    .await;
    assert!(ok.success, "trust without a password: {ok:?}");
    assert_eq!(ok.stdout, "app");
    let unknown = psql(proxy_conninfo(port, "nobody", ""), "SELECT 1", &[], None).await;
    assert!(
        !unknown.success,
        "trust still refuses users not in [[users]]"
    );
    assert!(
        unknown
            .stderr
            .contains("password authentication failed for user \"nobody\""),
        "{unknown:?}"
    );
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_and_an_exhausted_pool_give_clear_errors() {
    let env = env(|c| {
        c.default_pool_size = 1;
        c.pool_timeout_ms = 700;
    })
    .await;

    // PostgreSQL's own error for a database that does not exist.
    let missing = connect_dsn(&format!(
        "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname=no_such_db",
        env.port()
    ))
    .await;
    expect_sqlstate(
        missing.map(|_| ()),
        &SqlState::INVALID_CATALOG_NAME,
        "missing database",
    );
    let missing = psql(
        proxy_conninfo(env.port(), USER, "").replace("dbname=postgres", "dbname=no_such_db"),
        "SELECT 1",
        &[("PGPASSWORD", PASSWORD)],
        None,
    )
    .await;
    assert!(!missing.success);
    assert!(
        missing
            .stderr
            .contains("database \"no_such_db\" does not exist"),
        "{missing:?}"
    );

    // The only server is taken: the next client waits pool_timeout_ms, then gets an error.
    let holder = env.connect().await;
    let started = Instant::now();
    let waiting = connect_dsn(&env.app_dsn()).await;
    let waited = started.elapsed();
    match waiting {
        Ok(_) => panic!("a client must not get a server while the only one is taken"),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("an ErrorResponse, not {e:?}"));
            println!(
                "pool timeout after {waited:?}: {} {}",
                db.code().code(),
                db.message()
            );
            assert_eq!(db.code().code(), "53300", "{db:?}");
        }
    }
    assert!(
        waited >= Duration::from_millis(600),
        "gave up after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    assert_eq!(
        simple_value(&holder, "SELECT 'holder ok'").await,
        "holder ok"
    );
    drop(holder);
    // Once the server is free again, it is handed out.
    let deadline = Instant::now() + Duration::from_secs(5);
    let next = loop {
        match connect_dsn(&env.app_dsn()).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                println!("retrying after {e}");
            }
            Err(e) => panic!("the freed server is never handed out: {e:?}"),
        }
    };
    assert_eq!(simple_value(&next, "SELECT 'next ok'").await, "next ok");
    panic_watch::assert_no_proxy_panics();
}

// ---------------------------------------------------------------------------------------------
// Many clients
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_sessions_share_twenty_servers_with_bounded_waits() {
    const CLIENTS: i32 = 500;
    // md5 rather than SCRAM: in a debug build the test's own PBKDF2 per SCRAM login (~0.1 s of
    // CPU each) would dominate on a 2-core machine; the pooling is what is under test here.
    let env = env(|c| {
        c.default_pool_size = 20;
        c.pool_timeout_ms = 120_000;
        c.auth_type = "md5".into();
    })
    .await;
    let setup = env.connect().await;
    setup
        .batch_execute("CREATE TABLE many_t (id int PRIMARY KEY)")
        .await
        .expect("create");
    drop(setup);

    // The clients run on a runtime of their own, so they never starve the proxy's.
    let dsn = Arc::new(env.app_dsn());
    let started = Instant::now();
    let clients = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("client runtime");
        runtime.block_on(async move {
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|i| {
                    let dsn = dsn.clone();
                    tokio::spawn(async move {
                        let t0 = Instant::now();
                        let (client, connection) = tokio_postgres::connect(&dsn, NoTls)
                            .await
                            .map_err(|e| format!("client {i}: connect after {:?}: {e:?}", t0.elapsed()))?;
                        let connected = t0.elapsed();
                        let conn = tokio::spawn(connection);
                        client
                            .batch_execute(&format!(
                                "BEGIN; INSERT INTO many_t VALUES ({i}); SELECT pg_sleep(0.01); COMMIT"
                            ))
                            .await
                            .map_err(|e| format!("client {i}: transaction: {e:?}"))?;
                        drop(client);
                        let _ = conn.await;
                        Ok::<_, String>((connected, t0.elapsed()))
                    })
                })
                .collect();
            tokio::time::timeout(Duration::from_secs(240), futures_util::future::join_all(tasks)).await
        })
    });
    let results = within("500 sessions", Duration::from_secs(250), clients)
        .await
        .expect("client runtime thread")
        .expect("500 sessions within 240 s");
    let total = started.elapsed();
    let mut errors = Vec::new();
    let mut waits = Vec::new();
    for r in results {
        match r.expect("client task") {
            Ok((wait, _)) => waits.push(wait),
            Err(e) => errors.push(e),
        }
    }
    waits.sort();
    let (max_wait, median) = (
        waits.last().copied().unwrap_or_default(),
        waits.get(waits.len() / 2).copied().unwrap_or_default(),
    );
    println!(
        "{CLIENTS} sessions: {} ok, {} failed, in {total:?}; connect+pool wait median {median:?}, max {max_wait:?}",
        waits.len(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} sessions failed; first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        max_wait < Duration::from_secs(120),
        "a client waited {max_wait:?}"
    );
    assert_eq!(
        on_primary(&env, "SELECT count(*) FROM many_t").await,
        CLIENTS.to_string()
    );
    let servers: usize = on_primary(
        &env,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
    )
    .await
    .parse()
    .expect("count");
    assert!(
        servers <= 20,
        "pgswitch opened {servers} server connections for a pool of 20"
    );
    for pool in env.proxy.proxy.pools.all() {
        let status = pool.status();
        assert!(
            status.servers_idle + status.servers_active <= 20,
            "{status:?}"
        );
    }
    // Every client slot is given back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.proxy.proxy.client_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} client slots still taken after all clients left",
            env.proxy.proxy.client_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the proxy still serves.
    let after = env.connect().await;
    assert_eq!(
        simple_value(&after, "SELECT 'after 500'").await,
        "after 500"
    );
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_beyond_max_client_connections_gets_53300_and_the_others_keep_working() {
    let env = env(|c| c.max_client_connections = 5).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(env.connect().await);
    }
    let sixth = connect_dsn(&env.app_dsn()).await;
    match sixth {
        Ok(_) => panic!("a sixth client must be refused"),
        Err(e) => {
            assert_eq!(sqlstate(&e), "53300", "{e:?}");
            println!(
                "sixth client: {}",
                e.as_db_error().map(|d| d.message()).unwrap_or("?")
            );
        }
    }
    // psql sees the same.
    let refused = psql(
        proxy_conninfo(env.port(), USER, ""),
        "SELECT 1",
        &[("PGPASSWORD", PASSWORD)],
        None,
    )
    .await;
    assert!(!refused.success);
    assert!(refused.stderr.contains("too many clients"), "{refused:?}");

    for (i, c) in clients.iter().enumerate() {
        assert_eq!(simple_value(c, &format!("SELECT {i}")).await, i.to_string());
    }
    // A freed slot can be used again (the slot is released asynchronously: bounded retry).
    drop(clients.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        match connect_dsn(&env.app_dsn()).await {
            Ok(c) => break c,
            Err(e) if sqlstate(&e) == "53300" && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("a freed slot must be reusable: {e:?}"),
        }
    };
    assert_eq!(simple_value(&again, "SELECT 'again'").await, "again");
    for c in &clients {
        assert_eq!(simple_value(c, "SELECT 1").await, "1");
    }
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_idle_in_a_transaction_is_closed_and_its_transaction_rolled_back() {
    let env = env(|c| {
        c.idle_transaction_timeout_ms = 300;
        c.default_pool_size = 1;
        c.pool_timeout_ms = 20_000;
    })
    .await;
    let dsn = env.app_dsn();
    let setup = env.connect().await;
    setup
        .simple_query("CREATE TABLE idle_s (n int)")
        .await
        .expect("create table");
    drop(setup);
    let (a, a_conn) = common::connect_watched(&dsn).await;
    a.simple_query("BEGIN; INSERT INTO idle_s VALUES (1)")
        .await
        .expect("A's transaction");
    // The session's server comes back to the pool (after a ROLLBACK) for the next client.
    let b = within("B's login", STEP, env.connect()).await;
    assert_eq!(common::ended_with("A", a_conn).await, "25P03");
    assert_eq!(simple_value(&b, "SELECT count(*) FROM idle_s").await, "0");
    // Outside a transaction there is no limit unless client_idle_timeout_ms is set.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(simple_value(&b, "SELECT 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_idle_outside_a_transaction_is_closed_counting_from_its_own_login() {
    let env = env(|c| {
        c.client_idle_timeout_ms = 2_000;
        c.default_pool_size = 1;
    })
    .await;
    let dsn = env.app_dsn();
    let first = env.connect().await;
    assert_eq!(simple_value(&first, "SELECT 1").await, "1");
    drop(first);
    // The server rests in the pool for longer than the timeout before B gets it: B's idle
    // time starts at its login, not at the server's last use.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (b, b_conn) = common::connect_watched(&dsn).await;
    for _ in 0..7 {
        assert_eq!(simple_value(&b, "SELECT 1").await, "1");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(common::ended_with("B", b_conn).await, "57P05");
}
