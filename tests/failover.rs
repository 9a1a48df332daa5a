//! Automatic failover and planned switchover against real PostgreSQL clusters and real faults
//! (issue 4, "Done means"). Every test starts its own primary + standbys and an in-process
//! pgswitch in front, runs a workload through it, injects a fault (SIGKILL, immediate stop,
//! SIGSTOP, a cut network path, a lagging standby, too few synchronous standbys, a promotion
//! whose answer is lost or whose new epoch cannot be recorded) and checks the invariants of
//! DESIGN.md: a synced standby is promoted, no acknowledged write is lost, idle transaction-mode
//! clients see no error, only in-flight transactions fail (08006/08007), the other standby
//! follows the new primary, never two primaries, and the old primary is fenced and rejoined by
//! the hook.
//!
//! Every wait has a deadline (the machine is small and shared: poll, never assume a speed);
//! every test prints what it measured. Run with
//! `cargo test --test failover -- --test-threads=1 --nocapture` (PGSWITCH_LOG=info for the
//! proxy's log).

mod common;
#[path = "common/panic_watch.rs"]
mod panic_watch;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{within as bounded, TestEnv, PASSWORD, USER};
use hyper::{Method, StatusCode};
use pgswitch::cluster::Role;
use pgswitch::config::{Config, PoolMode};
use pgswitch::harness::{ClusterSpec, PgNode, SyncMode, SUPERUSER, SUPERUSER_PASSWORD};
use pgswitch::metrics::sample;
use pgswitch::status::{request, AdminUrl, Answer};
use serde_json::Value;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

/// Longer than `failover.hold_ms` below, so the proxy's own answer (57P03) comes first.
const STEP: Duration = Duration::from_secs(40);
const HOLD_MS: u64 = 20_000;
/// Every test body ends within this, whatever happens.
const TEST_LIMIT: Duration = Duration::from_secs(900);
const INSERT: &str = "INSERT INTO t(id) VALUES ($1)";
const WRITERS: usize = 4;
const IDLE_CLIENTS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn ms(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Signed seconds of `t` relative to `origin`.
fn rel(t: Instant, origin: Instant) -> String {
    if t >= origin {
        format!("+{:.3}s", (t - origin).as_secs_f64())
    } else {
        format!("-{:.3}s", (origin - t).as_secs_f64())
    }
}

/// Polls `probe` every 100 ms until it returns `Ok`, for at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let last = match tokio::time::timeout(left, probe()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) => e,
            Err(_) => "the probe itself did not answer in time".to_string(),
        };
        if Instant::now() >= deadline {
            panic!("{what}: not within {limit:?}; last observation: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SQLSTATE (or "-") and a readable message of a tokio-postgres error.
/// Waits (up to 30 s) until pgswitch publishes a reason containing `needle`; returns it.
async fn wait_for_reason(env: &TestEnv, what: &str, needle: &'static str) -> String {
    wait_for(what, Duration::from_secs(30), || async move {
        let t = env.proxy.cluster.current();
        match &t.reason {
            Some(r) if r.contains(needle) => Ok(r.clone()),
            other => Err(format!("reason {other:?}, primary {:?}", t.primary)),
        }
    })
    .await
}

fn describe(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (
            db.code().code().to_string(),
            format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        ),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                let _ = write!(text, ": {s}");
                source = s.source();
            }
            ("-".to_string(), text)
        }
    }
}

/// The config every failover test starts from: transaction pooling, a hold shorter than the
/// clients' own timeouts, everything else pgswitch's defaults (diagnosis every 1 s, 1 s
/// timeout, 3 failures).
fn failover_config(c: &mut Config) {
    c.pool_mode = PoolMode::Transaction;
    c.default_pool_size = 10;
    c.failover.hold_ms = HOLD_MS;
    c.pool_timeout_ms = 60_000;
}

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> T {
    let what = what.to_string();
    bounded(
        &what,
        Duration::from_secs(180),
        tokio::task::spawn_blocking(f),
    )
    .await
    .expect("blocking task")
    .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

// ---------------------------------------------------------------------------------------------
// Direct connections to the nodes (not through pgswitch)
// ---------------------------------------------------------------------------------------------

async fn direct_as(node: &PgNode, user: &str, password: &str) -> Result<Client, String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(node.host())
        .port(node.port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .application_name("failover-test")
        .connect_timeout(Duration::from_secs(3));
    match tokio::time::timeout(Duration::from_secs(5), cfg.connect(NoTls)).await {
        Err(_) => Err(format!("{}: no connection within 5 s", node.name)),
        Ok(Err(e)) => Err(format!("{}: {}", node.name, describe(&e).1)),
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
    }
}

async fn direct(node: &PgNode) -> Result<Client, String> {
    direct_as(node, SUPERUSER, SUPERUSER_PASSWORD).await
}

/// The first row of `sql` run on `node` as the superuser, as text (`None` = SQL NULL); an
/// empty vector when there is no row.
async fn sql_row(node: &PgNode, sql: &str) -> Result<Vec<Option<String>>, String> {
    let client = direct(node).await?;
    let msgs = tokio::time::timeout(Duration::from_secs(10), client.simple_query(sql))
        .await
        .map_err(|_| format!("{}: no answer to {sql:?} within 10 s", node.name))?
        .map_err(|e| format!("{}: {}", node.name, describe(&e).1))?;
    for m in msgs {
        if let SimpleQueryMessage::Row(r) = m {
            return Ok((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
        }
    }
    Ok(Vec::new())
}

async fn sql_exec(node: &PgNode, sql: &str) -> Result<(), String> {
    let client = direct(node).await?;
    tokio::time::timeout(Duration::from_secs(30), client.simple_query(sql))
        .await
        .map_err(|_| format!("{}: no answer to {sql:?} within 30 s", node.name))?
        .map_err(|e| format!("{}: {sql}: {}", node.name, describe(&e).1))?;
    Ok(())
}

async fn in_recovery(node: &PgNode) -> Result<bool, String> {
    let row = sql_row(node, "SELECT pg_is_in_recovery()").await?;
    Ok(row.first().cloned().flatten().as_deref() == Some("t"))
}

/// The port the node's WAL receiver streams from, if it streams.
async fn upstream_port(node: &PgNode) -> Result<Option<u16>, String> {
    let row = sql_row(
        node,
        "SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'",
    )
    .await?;
    Ok(row.first().cloned().flatten().and_then(|p| p.parse().ok()))
}

/// The node's `primary_conninfo`.
async fn conninfo_of(node: &PgNode) -> String {
    sql_row(node, "SELECT current_setting('primary_conninfo')")
        .await
        .unwrap_or_else(|e| panic!("reading primary_conninfo: {e}"))
        .first()
        .cloned()
        .flatten()
        .unwrap_or_default()
}

/// Polls until the node's `primary_conninfo` is `want`; returns how long that took.
async fn wait_conninfo(node: &PgNode, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_for(
        &format!("{}'s primary_conninfo is restored", node.name),
        limit,
        || async move {
            let got = sql_row(node, "SELECT current_setting('primary_conninfo')").await?;
            match got.first().cloned().flatten() {
                Some(c) if c == want => Ok(()),
                other => Err(format!("primary_conninfo {other:?}, want {want:?}")),
            }
        },
    )
    .await;
    started.elapsed()
}

/// The names of the nodes that answer and are not in recovery.
async fn out_of_recovery(nodes: &[PgNode]) -> Vec<String> {
    let mut out = Vec::new();
    for n in nodes {
        if in_recovery(n).await == Ok(false) {
            out.push(n.name.clone());
        }
    }
    out
}

async fn wait_streams_from(node: &PgNode, primary: &PgNode, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_for(
        &format!("{} streams from {}", node.name, primary.name),
        limit,
        || async move {
            match upstream_port(node).await? {
                Some(p) if p == primary.port => Ok(()),
                other => Err(format!(
                    "{} streams from {other:?}, want port {}",
                    node.name, primary.port
                )),
            }
        },
    )
    .await;
    started.elapsed()
}

/// Every id in table t on `node`.
async fn ids_on(node: &PgNode) -> HashSet<i64> {
    let client = direct(node)
        .await
        .unwrap_or_else(|e| panic!("reading table t: {e}"));
    let rows = bounded(
        "SELECT id FROM t",
        Duration::from_secs(60),
        client.query("SELECT id FROM t", &[]),
    )
    .await
    .unwrap_or_else(|e| panic!("SELECT id FROM t on {}: {}", node.name, describe(&e).1));
    rows.iter().map(|r| r.get::<_, i64>(0)).collect()
}

/// A short description of a node's state, for the record of how an old primary comes back.
async fn node_state(node: &PgNode) -> String {
    match sql_row(
        node,
        "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only'), \
         (SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming')",
    )
    .await
    {
        Err(_) => "unreachable".into(),
        Ok(row) => {
            let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
            match (get(0).as_str(), get(1).as_str(), get(2)) {
                ("f", "on", _) => "primary, read-only (fenced)".into(),
                ("f", _, _) => "primary, WRITABLE".into(),
                ("t", _, p) if p.is_empty() => "standby, not streaming".into(),
                ("t", _, p) => format!("standby streaming from port {p}"),
                (a, b, c) => format!("? {a} {b} {c}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients through pgswitch
// ---------------------------------------------------------------------------------------------

async fn connect_app(port: u16) -> Result<Client, (String, String)> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(USER)
        .password(PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10));
    match tokio::time::timeout(STEP, cfg.connect(NoTls)).await {
        Err(_) => Err(("timeout".into(), format!("no connection within {STEP:?}"))),
        Ok(Err(e)) => Err(describe(&e)),
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
    }
}

#[derive(Debug, Clone)]
struct Ack {
    id: i64,
    sent: Instant,
    acked: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Connecting (or preparing the INSERT on a fresh connection) failed.
    Connect,
    /// A statement failed on a connection that was already open.
    Existing,
}

#[derive(Debug, Clone)]
struct WriteError {
    writer: usize,
    id: Option<i64>,
    sent: Instant,
    at: Instant,
    place: Place,
    sqlstate: String,
    message: String,
    /// The client connection was closed after the error.
    closed: bool,
}

#[derive(Default)]
struct WorkLog {
    acks: Vec<Ack>,
    errors: Vec<WriteError>,
    connects: usize,
}

/// N writers through pgswitch, each on its own connection, inserting a fresh id every ~10 ms
/// (autocommit) with a statement prepared once per connection.
struct Workload {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WorkLog>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Workload {
    fn start(port: u16, writers: usize, first_id: i64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(WorkLog::default()));
        let next = Arc::new(AtomicI64::new(first_id));
        let tasks = (0..writers)
            .map(|w| tokio::spawn(writer(w, port, stop.clone(), log.clone(), next.clone())))
            .collect();
        Workload { stop, log, tasks }
    }

    fn acks_sent_after(&self, t: Instant) -> usize {
        let log = self.log.lock().unwrap();
        log.acks.iter().filter(|a| a.sent > t).count()
    }

    /// Waits until `n` inserts sent after `t` were acknowledged.
    async fn wait_acks_after(&self, t: Instant, n: usize, limit: Duration, what: &str) {
        wait_for(what, limit, || async move {
            let got = self.acks_sent_after(t);
            if got >= n {
                Ok(())
            } else {
                let errors = self.log.lock().unwrap().errors.len();
                Err(format!("{got} of {n} acknowledged, {errors} errors so far"))
            }
        })
        .await
    }

    async fn finish(self) -> WorkLog {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(STEP + Duration::from_secs(20), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

async fn open_writer(port: u16) -> Result<(Client, Statement), (String, String)> {
    let client = connect_app(port).await?;
    let stmt = match tokio::time::timeout(STEP, client.prepare(INSERT)).await {
        Err(_) => return Err(("timeout".into(), "prepare: no answer".into())),
        Ok(Err(e)) => return Err(describe(&e)),
        Ok(Ok(s)) => s,
    };
    Ok((client, stmt))
}

async fn writer(
    w: usize,
    port: u16,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WorkLog>>,
    next: Arc<AtomicI64>,
) {
    let mut conn: Option<(Client, Statement)> = None;
    while !stop.load(Ordering::SeqCst) {
        let tick = Instant::now();
        if conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            conn = None;
            let sent = Instant::now();
            match open_writer(port).await {
                Ok(c) => {
                    log.lock().unwrap().connects += 1;
                    conn = Some(c);
                }
                Err((sqlstate, message)) => {
                    log.lock().unwrap().errors.push(WriteError {
                        writer: w,
                        id: None,
                        sent,
                        at: Instant::now(),
                        place: Place::Connect,
                        sqlstate,
                        message,
                        closed: true,
                    });
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some((client, stmt)) = conn.as_ref() else {
            continue;
        };
        let id = next.fetch_add(1, Ordering::SeqCst);
        let sent = Instant::now();
        let result = tokio::time::timeout(STEP, client.execute(stmt, &[&id])).await;
        let at = Instant::now();
        match result {
            Ok(Ok(_)) => log.lock().unwrap().acks.push(Ack {
                id,
                sent,
                acked: at,
            }),
            Ok(Err(e)) => {
                let (sqlstate, message) = describe(&e);
                let closed = client.is_closed();
                // A lost prepared statement would fail every later insert: start afresh.
                let reconnect = sqlstate == "26000";
                log.lock().unwrap().errors.push(WriteError {
                    writer: w,
                    id: Some(id),
                    sent,
                    at,
                    place: Place::Existing,
                    sqlstate,
                    message,
                    closed,
                });
                if reconnect {
                    conn = None;
                }
            }
            Err(_) => {
                log.lock().unwrap().errors.push(WriteError {
                    writer: w,
                    id: Some(id),
                    sent,
                    at,
                    place: Place::Existing,
                    sqlstate: "timeout".into(),
                    message: format!("no answer within {STEP:?}"),
                    closed: false,
                });
                conn = None;
            }
        }
        let next_tick = tick + Duration::from_millis(10);
        tokio::time::sleep_until(next_tick.into()).await;
    }
}

/// Clients that connect before the fault, prepare a statement, and stay idle.
struct IdleClients {
    clients: Vec<(Client, Statement)>,
}

impl IdleClients {
    async fn connect(port: u16, n: usize) -> IdleClients {
        let mut clients = Vec::new();
        for i in 0..n {
            let client = connect_app(port)
                .await
                .unwrap_or_else(|e| panic!("idle client {i} connects: {e:?}"));
            let stmt = bounded("prepare", STEP, client.prepare("SELECT $1::int"))
                .await
                .expect("idle client prepares");
            let row = bounded("select", STEP, client.query_one(&stmt, &[&1i32]))
                .await
                .expect("idle client runs its statement");
            assert_eq!(row.get::<_, i32>(0), 1);
            clients.push((client, stmt));
        }
        IdleClients { clients }
    }

    /// Runs `SELECT 1` and the statement prepared before the fault on every client; returns
    /// every problem seen (none is expected).
    async fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, (client, stmt)) in self.clients.iter().enumerate() {
            if client.is_closed() {
                problems.push(format!("idle client {i}: its connection was closed"));
                continue;
            }
            match tokio::time::timeout(STEP, client.simple_query("SELECT 1")).await {
                Err(_) => problems.push(format!("idle client {i}: SELECT 1 got no answer")),
                Ok(Err(e)) => {
                    problems.push(format!("idle client {i}: SELECT 1: {:?}", describe(&e)))
                }
                Ok(Ok(_)) => {}
            }
            match tokio::time::timeout(STEP, client.query_one(stmt, &[&42i32])).await {
                Err(_) => problems.push(format!(
                    "idle client {i}: statement prepared before the fault got no answer"
                )),
                Ok(Err(e)) => problems.push(format!(
                    "idle client {i}: statement prepared before the fault: {:?}",
                    describe(&e)
                )),
                Ok(Ok(row)) if row.get::<_, i32>(0) != 42 => {
                    problems.push(format!("idle client {i}: wrong answer"))
                }
                Ok(Ok(_)) => {}
            }
        }
        problems
    }
}

// ---------------------------------------------------------------------------------------------
// What pgswitch published
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct TopoEvent {
    at: Instant,
    epoch: u64,
    primary: Option<String>,
    holding: bool,
    reason: Option<String>,
}

/// Every distinct (epoch, primary, holding, reason) pgswitch published.
struct TopologyLog {
    events: Arc<Mutex<Vec<TopoEvent>>>,
    task: JoinHandle<()>,
}

impl TopologyLog {
    fn start(env: &TestEnv) -> TopologyLog {
        let mut rx = env.proxy.cluster.topology.clone();
        let events = Arc::new(Mutex::new(Vec::<TopoEvent>::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            loop {
                let ev = {
                    let t = rx.borrow_and_update();
                    TopoEvent {
                        at: Instant::now(),
                        epoch: t.epoch,
                        primary: t.primary.map(|i| t.nodes[i].name.clone()),
                        holding: t.holding,
                        reason: t.reason.clone(),
                    }
                };
                {
                    let mut all = sink.lock().unwrap();
                    let same = all.last().is_some_and(|l: &TopoEvent| {
                        l.epoch == ev.epoch
                            && l.primary == ev.primary
                            && l.holding == ev.holding
                            && l.reason == ev.reason
                    });
                    if !same {
                        all.push(ev);
                    }
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
        TopologyLog { events, task }
    }

    fn events(&self) -> Vec<TopoEvent> {
        self.events.lock().unwrap().clone()
    }

    fn print(&self, origin: Instant, label: &str) {
        println!("[{label}] topology published by pgswitch (times relative to the fault):");
        for e in self.events() {
            println!(
                "  {:>9} epoch {} primary {:<4} holding {:<5} reason {}",
                rel(e.at, origin),
                e.epoch,
                e.primary.as_deref().unwrap_or("-"),
                e.holding,
                e.reason.as_deref().unwrap_or("-")
            );
        }
    }

    /// The first publication after `t` with a primary other than `old`.
    fn first_new_primary(&self, old: &str, t: Instant) -> Option<TopoEvent> {
        self.events()
            .into_iter()
            .find(|e| e.at >= t && e.primary.as_deref().is_some_and(|p| p != old))
    }
}

impl Drop for TopologyLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Admin API
// ---------------------------------------------------------------------------------------------

async fn admin(env: &TestEnv, method: Method, path: &str, body: Option<&str>) -> Answer {
    let url = AdminUrl::parse(&format!("http://{}", env.proxy.admin_addr)).expect("admin url");
    let what = format!("{method} {path}");
    bounded(
        &what,
        Duration::from_secs(150),
        request(
            &url,
            method,
            path,
            body.map(str::to_string),
            None,
            Duration::from_secs(120),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

async fn status_json(env: &TestEnv) -> Value {
    let answer = admin(env, Method::GET, "/status", None).await;
    assert_eq!(answer.status, StatusCode::OK, "/status: {}", answer.body);
    serde_json::from_str(&answer.body).expect("/status is JSON")
}

/// Every string value in /status under a key that names a reason.
fn reasons_in(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, val) in map {
                    if k.contains("reason") {
                        if let Some(s) = val.as_str() {
                            out.push(format!("{k}: {s}"));
                        }
                    }
                    walk(val, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

/// Prints the failover metrics pgswitch exports (phase durations, results).
async fn print_failover_metrics(env: &TestEnv, label: &str) {
    let answer = admin(env, Method::GET, "/metrics", None).await;
    println!("[{label}] failover metrics:");
    for line in answer.body.lines() {
        if !line.starts_with('#')
            && (line.contains("failover") || line.contains("aborted") || line.contains("held"))
            && !line.contains("_bucket")
        {
            println!("  {line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------

struct Summary {
    acks: usize,
    errors_existing: Vec<WriteError>,
    errors_connect: Vec<WriteError>,
    reconnects: usize,
    missing: Vec<i64>,
}

fn summarize(
    label: &str,
    log: &WorkLog,
    writers: usize,
    present: &HashSet<i64>,
    origin: Instant,
) -> Summary {
    let mut missing: Vec<i64> = log
        .acks
        .iter()
        .map(|a| a.id)
        .filter(|id| !present.contains(id))
        .collect();
    missing.sort_unstable();
    let errors_existing: Vec<WriteError> = log
        .errors
        .iter()
        .filter(|e| e.place == Place::Existing)
        .cloned()
        .collect();
    let errors_connect: Vec<WriteError> = log
        .errors
        .iter()
        .filter(|e| e.place == Place::Connect)
        .cloned()
        .collect();
    let s = Summary {
        acks: log.acks.len(),
        errors_existing,
        errors_connect,
        reconnects: log.connects.saturating_sub(writers),
        missing,
    };
    println!(
        "[{label}] writers: {} acknowledged inserts, {} errors on an existing connection, {} on connect, {} reconnections, {} acknowledged ids missing",
        s.acks,
        s.errors_existing.len(),
        s.errors_connect.len(),
        s.reconnects,
        s.missing.len()
    );
    for e in log.errors.iter().take(40) {
        println!(
            "  writer {} id {:?} sent {} failed {} {:?} {} (connection closed: {})",
            e.writer,
            e.id,
            rel(e.sent, origin),
            rel(e.at, origin),
            e.place,
            e.message,
            e.closed
        );
    }
    if !s.missing.is_empty() {
        println!(
            "  missing ids (first 50): {:?}",
            &s.missing[..s.missing.len().min(50)]
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The failover scenario shared by the SIGKILL, immediate-stop and SIGSTOP tests
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill9,
    StopImmediate,
    Hang,
}

async fn create_table(env: &TestEnv) {
    let client = env.connect().await;
    bounded(
        "CREATE TABLE t",
        STEP,
        client.batch_execute("CREATE TABLE t(id bigint PRIMARY KEY)"),
    )
    .await
    .expect("CREATE TABLE t through pgswitch");
}

/// Waits for `n` more diagnosis cycles of pgswitch (each cycle publishes the topology).
async fn wait_cycles(env: &TestEnv, n: usize) {
    let mut rx = env.proxy.cluster.topology.clone();
    rx.borrow_and_update();
    for _ in 0..n {
        bounded("a diagnosis cycle", Duration::from_secs(30), rx.changed())
            .await
            .expect("the controller runs");
    }
}

/// Every node diagnosed, n0 the primary, and two more diagnosis cycles, so pgswitch has a
/// healthy diagnosis of the primary on record (its LSN, synchronous_standby_names) besides the
/// one that found it (see the test about a primary dying right after pgswitch starts).
async fn wait_all_healthy(env: &TestEnv) {
    wait_all_healthy_now(env).await;
    wait_cycles(env, 2).await;
}

async fn wait_all_healthy_now(env: &TestEnv) {
    wait_for(
        "every node diagnosed healthy",
        Duration::from_secs(60),
        || async move {
            let t = env.proxy.cluster.current();
            let bad: Vec<String> = t
                .nodes
                .iter()
                .filter(|n| !n.healthy || n.diagnosis.role == Role::Unknown)
                .map(|n| format!("{} ({:?})", n.name, n.last_error))
                .collect();
            if t.primary == Some(0) && bad.is_empty() {
                Ok(())
            } else {
                Err(format!("primary {:?}, unhealthy {bad:?}", t.primary))
            }
        },
    )
    .await
}

/// Waits until `old` (restarted or resumed) is a standby streaming from `primary` and pgswitch
/// counts it as a standby again; returns the states it went through.
async fn watch_rejoin(
    env: &TestEnv,
    old: usize,
    primary: &PgNode,
    limit: Duration,
    origin: Instant,
) -> Vec<String> {
    let node = env.cluster.nodes[old].clone();
    let mut seen: Vec<String> = Vec::new();
    let mut last = String::new();
    // Consecutive observations of the old primary accepting writes although pgswitch has
    // diagnosed it (and so should have fenced it in that same cycle).
    let mut writable_known = 0;
    let deadline = Instant::now() + limit;
    loop {
        let state = node_state(&node).await;
        let t = env.proxy.cluster.current();
        let ns = &t.nodes[old];
        if state == "primary, WRITABLE" && ns.healthy {
            writable_known += 1;
            assert!(
                writable_known <= 10,
                "{} accepts writes although pgswitch diagnosed it as a returned old primary: not fenced; states seen:\n  {}",
                node.name,
                seen.join("\n  ")
            );
        } else {
            writable_known = 0;
        }
        let proxy_view = format!(
            "pgswitch: {} {}{}",
            ns.diagnosis.role,
            if ns.healthy { "healthy" } else { "down" },
            if ns.quarantined { ", quarantined" } else { "" }
        );
        let line = format!("{state} | {proxy_view}");
        if line != last {
            seen.push(format!("{} {line}", rel(Instant::now(), origin)));
            last = line;
        }
        let streams = state == format!("standby streaming from port {}", primary.port);
        if streams && !ns.quarantined && ns.healthy && ns.diagnosis.role == Role::Standby {
            return seen;
        }
        if Instant::now() >= deadline {
            panic!(
                "{} did not rejoin as a standby of {} within {limit:?}; states seen:\n  {}\n--- its log ---\n{}\n--- rejoin hook log ---\n{}",
                node.name,
                primary.name,
                seen.join("\n  "),
                node.log_tail(30),
                std::fs::read_to_string(node.data_dir.join("pgswitch-rejoin.log"))
                    .unwrap_or_else(|e| format!("(none: {e})"))
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn failover_scenario(label: &str, fault: Fault, sync: SyncMode, require_sync: bool) {
    panic_watch::install();
    let env = TestEnv::start(
        ClusterSpec {
            standbys: 2,
            sync,
            ..ClusterSpec::default()
        },
        |c| {
            failover_config(c);
            c.failover.require_sync = require_sync;
        },
    )
    .await;
    let env = &env;
    assert!(
        std::path::Path::new("scripts/rejoin-local.sh").is_file(),
        "the tests run from the repository root, where the demo config sets the rejoin hook"
    );
    // failover_config keeps pgswitch's default diagnosis and lag settings.
    let diag = pgswitch::config::DiagnosisConfig::default();
    let max_lag = pgswitch::config::FailoverConfig::default().max_lag_bytes;
    let port = env.port();
    create_table(env).await;
    wait_all_healthy(env).await;
    let topo = TopologyLog::start(env);
    let epoch0 = env.proxy.cluster.current().epoch;

    let idle = IdleClients::connect(port, IDLE_CLIENTS).await;
    let work = Workload::start(port, WRITERS, 1);
    let warmup = Instant::now();
    work.wait_acks_after(
        warmup,
        100,
        Duration::from_secs(60),
        "100 inserts before the fault",
    )
    .await;

    // The fault.
    let n0 = env.cluster.nodes[0].clone();
    let fault_started = Instant::now();
    {
        let n0 = n0.clone();
        blocking(&format!("{fault:?} of n0"), move || match fault {
            Fault::Kill9 => n0.kill9(),
            Fault::StopImmediate => n0.stop_immediate(),
            Fault::Hang => n0.hang(),
        })
        .await;
    }
    let fault_done = Instant::now();
    println!(
        "[{label}] {fault:?} of n0 took {}",
        ms(fault_done - fault_started)
    );

    // A standby becomes the primary.
    let (p, _) = wait_for(
        "a standby becomes the primary",
        Duration::from_secs(90),
        || async move {
            let t = env.proxy.cluster.current();
            match t.primary {
                Some(p) if p != 0 => Ok((p, t.epoch)),
                other => Err(format!("primary {other:?}, reason {:?}", t.reason)),
            }
        },
    )
    .await;
    let new = env.cluster.nodes[p].clone();
    let published = topo
        .first_new_primary("n0", fault_started)
        .map(|e| e.at)
        .unwrap_or_else(Instant::now);

    // Writes resume.
    work.wait_acks_after(
        fault_done,
        1,
        Duration::from_secs(60),
        "a write acknowledged after the fault",
    )
    .await;
    // The first write on the new primary ended the failover's first_write phase.
    let scrape = admin(env, Method::GET, "/metrics", None).await.body;
    let first_writes = sample(
        &scrape,
        "pgswitch_failover_phase_duration_seconds_count{phase=\"first_write\"}",
    );
    assert!(
        first_writes.is_some_and(|n| n >= 1.0),
        "no first_write phase recorded: {first_writes:?}"
    );
    let keep_until = fault_started + Duration::from_secs(5);
    tokio::time::sleep_until(keep_until.into()).await;
    let idle_problems = idle.check().await;

    // The new primary really is one, on a new epoch.
    assert!(
        !in_recovery(&new).await.expect("new primary answers"),
        "{} is still in recovery although pgswitch routes writes to it",
        new.name
    );
    let epoch1 = env.proxy.cluster.current().epoch;
    assert!(
        epoch1 > epoch0,
        "epoch {epoch0} -> {epoch1}: not incremented"
    );

    // The other standby follows the new primary.
    let other = env
        .cluster
        .nodes
        .iter()
        .enumerate()
        .find(|(i, _)| *i != 0 && *i != p)
        .map(|(_, n)| n.clone())
        .expect("a second standby");
    let repointed = wait_streams_from(&other, &new, Duration::from_secs(60)).await;

    // The old primary comes back: fenced, rejoined by the hook, streaming from the new primary.
    let back = Instant::now();
    match fault {
        Fault::Hang => {
            let n0 = n0.clone();
            blocking("resume n0", move || n0.resume()).await;
        }
        _ => {
            let n0 = n0.clone();
            blocking("restart n0", move || n0.start()).await;
        }
    }
    let states = watch_rejoin(env, 0, &new, Duration::from_secs(180), back).await;
    let rejoined = back.elapsed();

    // A little more traffic with the old primary back as a standby, then the books.
    let after_rejoin = Instant::now();
    work.wait_acks_after(
        after_rejoin,
        20,
        Duration::from_secs(60),
        "writes after the rejoin",
    )
    .await;
    let log = work.finish().await;
    let present = ids_on(&new).await;
    let s = summarize(label, &log, WRITERS, &present, fault_started);

    let first_write = log
        .acks
        .iter()
        .filter(|a| a.sent > fault_done)
        .map(|a| a.acked)
        .min()
        .expect("a write after the fault");
    let last_before = log
        .acks
        .iter()
        .filter(|a| a.acked <= fault_started)
        .map(|a| a.acked)
        .max();
    topo.print(fault_started, label);
    println!(
        "[{label}] n0 -> {} (epoch {epoch0} -> {epoch1}); failover published {} after the fault; \
         first acknowledged write after the fault at {} (last one before it at {}); \
         {} re-pointed within {} of the check; n0 rejoined {} after it came back",
        new.name,
        ms(published.saturating_duration_since(fault_started)),
        ms(first_write - fault_started),
        last_before.map_or("-".into(), |t| rel(t, fault_started)),
        other.name,
        ms(repointed),
        ms(rejoined),
    );
    if fault == Fault::Hang {
        println!(
            "[{label}] hung primary failed over {} after SIGSTOP (issue 4 target: timeout_ms x failures + 1 s = {})",
            ms(published.saturating_duration_since(fault_started)),
            ms(Duration::from_millis(diag.timeout_ms * u64::from(diag.failures) + 1000))
        );
    }
    println!(
        "[{label}] n0 after it came back:\n  {}",
        states.join("\n  ")
    );
    println!("[{label}] idle clients: {:?}", idle_problems);
    print_failover_metrics(env, label).await;

    // Never routed to the old primary once the new one was published.
    let routed_back: Vec<TopoEvent> = topo
        .events()
        .into_iter()
        .filter(|e| e.at > published && e.primary.as_deref() == Some("n0"))
        .collect();
    assert!(
        routed_back.is_empty(),
        "pgswitch routed to the old primary after the failover: {routed_back:?}"
    );
    assert!(
        idle_problems.is_empty(),
        "idle transaction-mode clients saw errors: {idle_problems:?}"
    );
    let shutdown_errors: Vec<&WriteError> = s
        .errors_existing
        .iter()
        .filter(|e| e.sqlstate == "57P03")
        .collect();
    assert!(
        shutdown_errors.is_empty(),
        "new transactions got the dying primary's 57P03 ('the database system is shutting down', \
         a FATAL answer to a new server connection) instead of being held for the new primary: {shutdown_errors:?}"
    );
    match sync {
        SyncMode::Any(_) => assert!(
            s.missing.is_empty(),
            "{} acknowledged inserts are missing on the new primary {} (synchronous replication): {:?}",
            s.missing.len(),
            new.name,
            &s.missing[..s.missing.len().min(50)]
        ),
        SyncMode::Async => {
            // Each lost insert is at least ~50 bytes of WAL (heap + index + commit records):
            // losing more than max_lag_bytes / 50 of them means more than max_lag was lost.
            let bound = max_lag as usize / 50;
            println!(
                "[{label}] async: {} acknowledged inserts lost (bound from max_lag_bytes = {max_lag}: {bound})",
                s.missing.len()
            );
            assert!(s.missing.len() <= bound, "lost more than max_lag_bytes allows");
        }
    }
    assert!(
        s.errors_connect.is_empty() && s.reconnects == 0,
        "writers had to reconnect or could not connect: {} connect errors, {} reconnections",
        s.errors_connect.len(),
        s.reconnects
    );
    let bad_codes: Vec<&WriteError> = s
        .errors_existing
        .iter()
        .filter(|e| e.sqlstate != "08006" && e.sqlstate != "08007")
        .collect();
    assert!(
        bad_codes.is_empty(),
        "errors other than 08006/08007 on existing connections: {bad_codes:?}"
    );
    for w in 0..WRITERS {
        let n = s.errors_existing.iter().filter(|e| e.writer == w).count();
        assert!(
            n <= 1,
            "writer {w} got {n} errors: only the one transaction in flight at the fault may fail"
        );
    }
    if fault != Fault::Hang {
        // The server was already gone when these were sent: they should have been held and
        // run on the new primary, not failed.
        let late: Vec<&WriteError> = s
            .errors_existing
            .iter()
            .filter(|e| e.sent > fault_done)
            .collect();
        assert!(
            late.is_empty(),
            "inserts sent after n0 was already down failed instead of waiting for the new primary: {late:?}"
        );
    } else {
        let limit =
            Duration::from_millis(diag.timeout_ms * u64::from(diag.failures) + diag.interval_ms)
                + Duration::from_secs(8);
        assert!(
            published - fault_started <= limit,
            "a hung primary was failed over after {}, more than timeout_ms x failures + interval + 8 s = {}",
            ms(published - fault_started),
            ms(limit)
        );
    }
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_with_sigkill_fails_over_to_a_synced_standby_without_losing_acknowledged_writes(
) {
    bounded(
        "test",
        TEST_LIMIT,
        failover_scenario("sigkill", Fault::Kill9, SyncMode::Any(1), true),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_stopped_immediately_fails_over_with_async_replication_within_the_lag_bound() {
    bounded(
        "test",
        TEST_LIMIT,
        failover_scenario(
            "stop-immediate",
            Fault::StopImmediate,
            SyncMode::Async,
            false,
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_primary_sigstop_is_failed_over_and_fenced_when_it_resumes() {
    bounded(
        "test",
        TEST_LIMIT,
        failover_scenario("sigstop", Fault::Hang, SyncMode::Any(1), false),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// A broken path to a primary that still streams WAL
// ---------------------------------------------------------------------------------------------

/// A TCP relay the test controls: forwards 127.0.0.1:port to 127.0.0.1:target until cut; cut
/// closes every relayed connection and black-holes new ones (accepted, never answered).
struct TcpRelay {
    port: u16,
    target: Arc<AtomicU16>,
    cut: Arc<AtomicBool>,
    trip: Arc<Trip>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accepted: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

/// A statement that cuts the relay once the server has run it (see [`TcpRelay::cut_after`]).
#[derive(Default)]
struct Trip {
    /// Text of the statement; taken when a client sends it.
    pattern: Mutex<Option<Vec<u8>>>,
    fired: AtomicBool,
}

/// The bytes of an extended-protocol Execute of the unnamed portal, all rows: the statement a
/// client prepared (tokio-postgres sends Parse first, Bind + Execute after its answer) runs.
const EXECUTE_UNNAMED: &[u8] = b"E\0\0\0\x09\0\0\0\0\0";

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Forwards one relayed connection. Once the client sent the trip's statement and its Execute
/// (or a simple Query), the server's answer is swallowed: when it comes (the statement ran), or
/// after 10 s, the relay is cut.
async fn relay_connection(
    mut client: TcpStream,
    mut upstream: TcpStream,
    trip: Arc<Trip>,
    cut: Arc<AtomicBool>,
) {
    use tokio::io::AsyncWriteExt as _;
    let (mut to_server, mut to_client) = (vec![0u8; 16384], vec![0u8; 16384]);
    let mut armed = false;
    let mut swallow_until: Option<Instant> = None;
    loop {
        let give_up = swallow_until.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = client.read(&mut to_server), if swallow_until.is_none() => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &to_server[..n];
                if upstream.write_all(chunk).await.is_err() {
                    return;
                }
                if !armed {
                    let mut pattern = trip.pattern.lock().unwrap();
                    if pattern.as_deref().is_some_and(|p| holds(chunk, p)) {
                        *pattern = None;
                        armed = true;
                    }
                }
                if armed && (holds(chunk, EXECUTE_UNNAMED) || chunk.first() == Some(&b'Q')) {
                    swallow_until = Some(Instant::now() + Duration::from_secs(10));
                }
            }
            r = upstream.read(&mut to_client) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if swallow_until.is_some() {
                    break;
                }
                if client.write_all(&to_client[..n]).await.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(give_up.into()), if swallow_until.is_some() => break,
        }
    }
    cut.store(true, Ordering::SeqCst);
    trip.fired.store(true, Ordering::SeqCst);
}

impl TcpRelay {
    async fn start() -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay binds");
        let port = listener.local_addr().expect("relay addr").port();
        let target = Arc::new(AtomicU16::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let trip = Arc::new(Trip::default());
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let accept = {
            let (target, cut, trip, conns, accepted) = (
                target.clone(),
                cut.clone(),
                trip.clone(),
                conns.clone(),
                accepted.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let Ok((mut sock, _)) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let task = if cut.load(Ordering::SeqCst) {
                        // Black hole: read and drop, never answer.
                        tokio::spawn(async move {
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = sock.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        })
                    } else {
                        let port = target.load(Ordering::SeqCst);
                        let (trip, cut) = (trip.clone(), cut.clone());
                        tokio::spawn(async move {
                            if let Ok(upstream) = TcpStream::connect(("127.0.0.1", port)).await {
                                relay_connection(sock, upstream, trip, cut).await;
                            }
                        })
                    };
                    let mut all = conns.lock().unwrap();
                    all.retain(|t| !t.is_finished());
                    all.push(task);
                }
            })
        };
        TcpRelay {
            port,
            target,
            cut,
            trip,
            conns,
            accepted,
            accept,
        }
    }

    /// Once a client runs a statement containing `pattern`, the server runs it but its answer
    /// never reaches the client: the relay is cut (new connections black-holed) when it comes.
    fn cut_after(&self, pattern: &str) {
        *self.trip.pattern.lock().unwrap() = Some(pattern.as_bytes().to_vec());
    }

    /// Whether a statement given to [`TcpRelay::cut_after`] ran and cut the relay.
    fn tripped(&self) -> bool {
        self.trip.fired.load(Ordering::SeqCst)
    }

    fn abort_all(&self) -> usize {
        let all = std::mem::take(&mut *self.conns.lock().unwrap());
        let n = all.iter().filter(|t| !t.is_finished()).count();
        for t in all {
            t.abort();
        }
        n
    }

    /// Closes every relayed connection and black-holes new ones.
    fn cut(&self) -> usize {
        self.cut.store(true, Ordering::SeqCst);
        self.abort_all()
    }

    /// Forwards again (black-holed connections are closed).
    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.abort_all();
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.accept.abort();
        self.abort_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_path_to_a_primary_that_still_streams_wal_does_not_fail_over() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let relay = TcpRelay::start().await;
        let target = relay.target.clone();
        let relay_port = relay.port;
        let env = TestEnv::start(ClusterSpec::default(), move |c| {
            failover_config(c);
            target.store(c.nodes[0].port, Ordering::SeqCst);
            c.nodes[0].port = relay_port;
        })
        .await;
        let env = &env;
        let n0 = env.cluster.nodes[0].clone();
        println!(
            "[relay] n0 listens on {}, pgswitch reaches it through the relay on {}",
            n0.port, relay.port
        );
        create_table(env).await;
        wait_all_healthy(env).await;
        let topo = TopologyLog::start(env);
        let epoch0 = env.proxy.cluster.current().epoch;
        let idle = IdleClients::connect(env.port(), 2).await;

        // A writer connected directly to n0 keeps producing WAL.
        let direct_writer = direct(&n0).await.expect("direct connection to n0");
        direct_writer
            .batch_execute("CREATE TABLE w(id bigint)")
            .await
            .expect("CREATE TABLE w");
        let direct_acks = Arc::new(AtomicUsize::new(0));
        let direct_errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let direct_task = {
            let (acks, errors, stop) = (direct_acks.clone(), direct_errors.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0i64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        direct_writer.execute("INSERT INTO w VALUES ($1)", &[&i]),
                    )
                    .await
                    {
                        Ok(Ok(_)) => {
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => errors.lock().unwrap().push(describe(&e).1),
                        Err(_) => errors.lock().unwrap().push("timeout".into()),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Cut pgswitch's path to n0.
        let cut_at = Instant::now();
        let closed = relay.cut();
        let acks_at_cut = direct_acks.load(Ordering::Relaxed);
        println!("[relay] cut: {closed} relayed connections closed, new ones black-holed");

        let reason = wait_for_reason(env, "pgswitch explains why it does not fail over", "WAL").await;
        println!(
            "[relay] {} after the cut, reason: {reason}",
            ms(cut_at.elapsed())
        );
        assert!(
            reason.contains("still receives WAL") || reason.contains("receiv"),
            "the reason should say a standby still receives WAL: {reason}"
        );

        // No promotion for a while: every standby stays in recovery.
        let watch_until = (cut_at + Duration::from_secs(8)).max(Instant::now() + Duration::from_secs(4));
        let mut checks = 0;
        while Instant::now() < watch_until {
            let t = env.proxy.cluster.current();
            assert!(
                t.primary.is_none() || t.primary == Some(0),
                "pgswitch routes to another node: {:?} (reason {:?})",
                t.primary,
                t.reason
            );
            assert_eq!(t.epoch, epoch0, "the epoch changed: a failover ran");
            for s in &env.cluster.nodes[1..] {
                assert!(
                    in_recovery(s).await.expect("standby answers"),
                    "{} was promoted although n0 is alive",
                    s.name
                );
            }
            checks += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let st = status_json(env).await;
        let status_reasons = reasons_in(&st);
        let direct_during = direct_acks.load(Ordering::Relaxed) - acks_at_cut;
        println!(
            "[relay] {checks} checks over {}: no promotion; the direct writer committed {direct_during} inserts on n0 meanwhile; /status reasons: {status_reasons:?}",
            ms(cut_at.elapsed())
        );
        assert!(direct_during > 10, "the direct writer should keep writing on n0");

        // Restore the path: pgswitch routes to n0 again.
        relay.restore();
        let restored = Instant::now();
        wait_for("pgswitch routes to n0 again", Duration::from_secs(30), || async move {
            let t = env.proxy.cluster.current();
            if t.primary == Some(0) && t.reason.is_none() {
                Ok(())
            } else {
                Err(format!("primary {:?}, reason {:?}", t.primary, t.reason))
            }
        })
        .await;
        let client = env.connect().await;
        bounded(
            "insert after restore",
            STEP,
            client.execute("INSERT INTO t(id) VALUES (424242)", &[]),
        )
        .await
        .expect("a write through pgswitch after the path is restored");
        let on_n0 = sql_row(&n0, "SELECT count(*) FROM t WHERE id = 424242")
            .await
            .expect("n0 answers");
        assert_eq!(on_n0.first().cloned().flatten().as_deref(), Some("1"));
        let idle_problems = idle.check().await;
        println!(
            "[relay] routing to n0 again {} after the restore; idle clients: {idle_problems:?}",
            ms(restored.elapsed())
        );
        stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(15), direct_task).await;
        let direct_errs = direct_errors.lock().unwrap().clone();
        topo.print(cut_at, "relay");
        println!(
            "[relay] relay accepted {} connections in all; direct writer errors: {direct_errs:?}",
            relay.accepted.load(Ordering::Relaxed)
        );
        assert!(direct_errs.is_empty(), "the direct writer saw errors: {direct_errs:?}");
        assert!(idle_problems.is_empty(), "idle clients saw errors: {idle_problems:?}");
        assert!(
            status_reasons.iter().any(|r| r.contains("WAL")),
            "/status does not say why there was no failover (reasons found: {status_reasons:?}); full /status: {st}"
        );
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// A primary whose diagnosis hangs while it keeps answering clients is busy, not down. Every
/// diagnosis query of n0 waits on a lock (a transaction holds `pg_stat_wal_receiver`, which
/// the diagnosis reads), while readers through pgswitch keep getting answers from n0. The
/// readers write nothing, so no WAL reaches the standbys and their corroboration cannot help:
/// only the readers' answers show that n0 serves. Without that evidence pgswitch promotes a
/// standby after three diagnosis timeouts, although n0 never stopped answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_answers_clients_while_its_diagnosis_hangs_is_not_failed_over() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let env = TestEnv::start(ClusterSpec::default(), |c| {
            failover_config(c);
            // The default timeout: on a loaded machine the readers' answers still land well
            // inside each diagnosis window.
            c.diagnosis.interval_ms = 200;
            c.diagnosis.timeout_ms = 1000;
        })
        .await;
        let env = &env;
        let n0 = env.cluster.nodes[0].clone();
        create_table(env).await;
        wait_all_healthy(env).await;
        let topo = TopologyLog::start(env);
        let epoch0 = env.proxy.cluster.current().epoch;

        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut readers = Vec::new();
        for _ in 0..4 {
            let client = env.connect().await;
            let (stop, answers, errors) = (stop.clone(), answers.clone(), errors.clone());
            readers.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let read = client.query_one("SELECT count(*) FROM t", &[]);
                    match tokio::time::timeout(Duration::from_secs(10), read).await {
                        Ok(Ok(_)) => {
                            answers.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => errors.lock().unwrap().push(describe(&e).1),
                        Err(_) => errors.lock().unwrap().push("no answer within 10 s".into()),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        let locker = direct(&n0).await.expect("direct connection to n0");
        bounded(
            "lock pg_stat_wal_receiver",
            STEP,
            locker.batch_execute(
                "BEGIN; LOCK TABLE pg_catalog.pg_stat_wal_receiver IN ACCESS EXCLUSIVE MODE",
            ),
        )
        .await
        .expect("LOCK TABLE pg_stat_wal_receiver");
        let locked_at = Instant::now();
        let answers_at_lock = answers.load(Ordering::Relaxed);

        let reason =
            wait_for_reason(env, "pgswitch says n0 is busy, not failed", "answered clients").await;
        println!("[busy] {} after the lock, reason: {reason}", ms(locked_at.elapsed()));

        // Six or so diagnosis timeouts (failures = 3 would fail over after three).
        let watch_until = locked_at + Duration::from_secs(8);
        let mut checks = 0;
        while Instant::now() < watch_until {
            let t = env.proxy.cluster.current();
            assert_eq!(t.primary, Some(0), "n0 is not routed to (reason {:?})", t.reason);
            assert!(!t.holding, "pgswitch holds transactions (reason {:?})", t.reason);
            assert_eq!(t.epoch, epoch0, "the epoch changed: a failover ran");
            checks += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let st = status_json(env).await;
        let status_reasons = reasons_in(&st);
        let n0_failures = env.proxy.cluster.current().nodes[0].consecutive_failures;
        let during = answers.load(Ordering::Relaxed) - answers_at_lock;
        println!(
            "[busy] {checks} checks over {}: n0 routed to throughout, {n0_failures} failed diagnoses of n0 in a row, readers got {during} answers; /status reasons: {status_reasons:?}",
            ms(locked_at.elapsed())
        );
        assert!(
            n0_failures >= 4,
            "the lock should have made n0's diagnoses fail ({n0_failures} in a row)"
        );
        assert!(during > 50, "the readers should keep getting answers ({during})");
        assert!(
            status_reasons.iter().any(|r| r.contains("answered clients")),
            "/status does not say why there was no failover (reasons found: {status_reasons:?})"
        );

        // Released: n0 is diagnosed healthy again and the reason goes.
        bounded("COMMIT", STEP, locker.batch_execute("COMMIT"))
            .await
            .expect("COMMIT");
        wait_for("n0 healthy, no reason", Duration::from_secs(30), || async move {
            let t = env.proxy.cluster.current();
            if t.primary == Some(0) && t.reason.is_none() && t.nodes[0].healthy {
                Ok(())
            } else {
                Err(format!("primary {:?}, reason {:?}", t.primary, t.reason))
            }
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(15), r).await;
        }
        topo.print(locked_at, "busy");
        for s in &env.cluster.nodes[1..] {
            assert!(
                in_recovery(s).await.expect("standby answers"),
                "{} was promoted although n0 served",
                s.name
            );
        }
        let errs = errors.lock().unwrap().clone();
        assert!(errs.is_empty(), "readers saw errors: {errs:?}");
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Refusals: a lagging standby, require_sync with too few standbys
// ---------------------------------------------------------------------------------------------

/// After the primary died, checks for `hold` that nothing is promoted, and returns the reason
/// pgswitch gives (which must contain `expect`).
async fn assert_no_promotion(env: &TestEnv, label: &str, expect: &str, hold: Duration) -> String {
    let epoch0 = env.proxy.cluster.current().epoch;
    let started = Instant::now();
    let reason = wait_for(
        &format!("pgswitch refuses to fail over, saying '{expect}'"),
        Duration::from_secs(45),
        || async move {
            let t = env.proxy.cluster.current();
            match &t.reason {
                Some(r) if r.contains(expect) => Ok(r.clone()),
                other => Err(format!("reason {other:?}, primary {:?}", t.primary)),
            }
        },
    )
    .await;
    println!(
        "[{label}] refusal reason after {}: {reason}",
        ms(started.elapsed())
    );
    let until = Instant::now() + hold;
    while Instant::now() < until {
        let t = env.proxy.cluster.current();
        assert!(
            t.primary.is_none(),
            "pgswitch routes to {:?} although it must not fail over (reason {:?})",
            t.primary.map(|i| t.nodes[i].name.clone()),
            t.reason
        );
        assert_eq!(t.epoch, epoch0, "the epoch changed");
        for s in &env.cluster.nodes[1..] {
            if let Ok(r) = in_recovery(s).await {
                assert!(r, "{} was promoted", s.name);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    reason
}

async fn assert_status_explains(env: &TestEnv, label: &str, expect: &str) {
    let ready = admin(env, Method::GET, "/ready", None).await;
    let st = status_json(env).await;
    let reasons = reasons_in(&st);
    println!(
        "[{label}] /ready {} {}; /status reasons {reasons:?}",
        ready.status, ready.body
    );
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "/ready must be 503 without a primary"
    );
    assert!(
        reasons.iter().any(|r| r.contains(expect)),
        "/status does not say why no standby was promoted (want '{expect}' in a reason; found {reasons:?})"
    );
}

/// Detaches `standby` from `primary` (its WAL receiver stops) and writes ~4 MB on the primary,
/// so the standby is far behind; returns the primary's LSN after the writes.
async fn make_lag(primary: &PgNode, standby: &PgNode, label: &str) -> String {
    sql_exec(standby, "ALTER SYSTEM SET primary_conninfo = ''")
        .await
        .expect("detach");
    sql_exec(standby, "SELECT pg_reload_conf()")
        .await
        .expect("reload");
    wait_for(
        &format!("{} stops streaming", standby.name),
        Duration::from_secs(30),
        || async move {
            match upstream_port(standby).await? {
                None => Ok(()),
                Some(p) => Err(format!("still streams from {p}")),
            }
        },
    )
    .await;
    sql_exec(
        primary,
        "CREATE TABLE big AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 4000) g",
    )
    .await
    .expect("write 4 MB on the primary");
    let primary_lsn = sql_row(primary, "SELECT pg_current_wal_lsn()")
        .await
        .expect("primary lsn")[0]
        .clone()
        .unwrap_or_default();
    let standby_lsn = sql_row(standby, "SELECT pg_last_wal_receive_lsn()")
        .await
        .expect("standby lsn")[0]
        .clone()
        .unwrap_or_default();
    let lag = sql_row(
        primary,
        &format!("SELECT pg_wal_lsn_diff('{primary_lsn}', '{standby_lsn}')::bigint"),
    )
    .await
    .expect("lag")[0]
        .clone()
        .unwrap_or_default();
    println!(
        "[{label}] {} at {primary_lsn}, {} received {standby_lsn}: {lag} bytes behind",
        primary.name, standby.name
    );
    primary_lsn
}

/// A primary and one standby, failover on, with this `max_lag_bytes`.
async fn one_standby(max_lag_bytes: u64) -> TestEnv {
    TestEnv::start(
        ClusterSpec {
            standbys: 1,
            ..ClusterSpec::default()
        },
        |c| {
            failover_config(c);
            c.failover.max_lag_bytes = max_lag_bytes;
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_lagging_beyond_max_lag_bytes_is_never_promoted() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let env = one_standby(1024).await;
        let env = &env;
        let (n0, n1) = (env.cluster.nodes[0].clone(), env.cluster.nodes[1].clone());
        let n1 = &n1;
        wait_all_healthy(env).await;
        let primary_lsn = make_lag(&n0, n1, "lag").await;
        // pgswitch must have seen the primary's new LSN before it dies.
        let want = pgswitch::cluster::parse_lsn(&primary_lsn).expect("lsn");
        wait_for(
            "pgswitch diagnoses n0's new LSN",
            Duration::from_secs(30),
            || async move {
                let t = env.proxy.cluster.current();
                match t.nodes[0].lsn_value() {
                    Some(l) if l >= want => Ok(()),
                    other => Err(format!("pgswitch saw {other:?}")),
                }
            },
        )
        .await;

        blocking("kill n0", move || n0.kill9()).await;
        let reason = assert_no_promotion(env, "lag", "max_lag_bytes", Duration::from_secs(6)).await;
        assert!(
            reason.contains("n1"),
            "the reason names the standby: {reason}"
        );
        assert!(
            in_recovery(n1).await.expect("n1 answers"),
            "n1 must still be a standby"
        );
        assert_status_explains(env, "lag", "max_lag_bytes").await;
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// A standby restarted with nothing new to stream reports as received the start of the WAL
/// segment it resumed streaming from, behind what it already replayed. It holds everything the
/// primary wrote: its lag shows as 0, and it is promoted even with a `max_lag_bytes` smaller
/// than that gap (before, pgswitch compared the received position alone and refused it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_standby_that_replayed_everything_is_not_taken_for_a_lagging_one() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let max_lag: i64 = 256;
        let env = one_standby(max_lag as u64).await;
        let env = &env;
        create_table(env).await;
        wait_all_healthy(env).await;
        let (n0, n1) = (env.cluster.nodes[0].clone(), env.cluster.nodes[1].clone());
        let client = env.connect().await;
        let mut gap = 0i64;
        for round in 0..5i64 {
            // WAL into the segment, so that its start lies well behind the end.
            bounded(
                "insert",
                STEP,
                client.batch_execute(&format!(
                    "INSERT INTO t SELECT g FROM generate_series({0} * 1000 + 1, {0} * 1000 + 1000) g",
                    round
                )),
            )
            .await
            .expect("insert through pgswitch");
            wait_for("n1 replays it", Duration::from_secs(30), || async {
                let row = sql_row(&n0, "SELECT pg_current_wal_lsn()::text").await?;
                let want = row.first().cloned().flatten().unwrap_or_default();
                let done = sql_row(&n1, &format!("SELECT pg_last_wal_replay_lsn() >= '{want}'"))
                    .await?;
                match done.first().cloned().flatten().as_deref() {
                    Some("t") => Ok(()),
                    other => Err(format!("n1 has not replayed {want}: {other:?}")),
                }
            })
            .await;
            let restart = n1.clone();
            blocking("restart n1", move || {
                restart.stop_fast()?;
                restart.start()
            })
            .await;
            wait_streams_from(&n1, &n0, Duration::from_secs(30)).await;
            let row = sql_row(
                &n1,
                "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn())::bigint",
            )
            .await
            .expect("n1 answers");
            gap = row
                .first()
                .cloned()
                .flatten()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            println!("[restarted] round {round}: n1 replayed {gap} bytes past what it reports as received");
            if gap > max_lag {
                break;
            }
        }
        assert!(
            gap > max_lag,
            "a restarted n1 never reported less received than replayed (gap {gap})"
        );
        wait_cycles(env, 2).await;
        let status = status_json(env).await;
        assert_eq!(
            status["nodes"][1]["lag_bytes"],
            serde_json::json!(0),
            "n1 holds all the primary wrote: {status}"
        );

        blocking("kill n0", move || n0.kill9()).await;
        wait_for("n1 promoted", Duration::from_secs(60), || async {
            match env.proxy.cluster.current().primary {
                Some(1) => Ok(()),
                other => Err(format!("primary {other:?}")),
            }
        })
        .await;
        assert!(!in_recovery(&n1).await.expect("n1 answers"), "n1 is the primary");
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_sync_with_too_few_standbys_refuses_to_promote() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let env = TestEnv::start(
            ClusterSpec {
                standbys: 2,
                sync: SyncMode::Any(1),
                ..ClusterSpec::default()
            },
            |c| {
                failover_config(c);
                c.failover.require_sync = true;
            },
        )
        .await;
        let env = &env;
        create_table(env).await;
        wait_all_healthy(env).await;
        let (n0, n2) = (env.cluster.nodes[0].clone(), env.cluster.nodes[2].clone());
        blocking("stop n2", move || n2.stop_immediate()).await;
        // Commits still succeed with ANY 1 (n1 acknowledges them).
        let client = env.connect().await;
        for id in 1..=20i64 {
            bounded("insert", STEP, client.execute(INSERT, &[&id]))
                .await
                .expect("insert with one synchronous standby left");
        }
        wait_for(
            "pgswitch sees n2 down",
            Duration::from_secs(30),
            || async move {
                let t = env.proxy.cluster.current();
                if t.nodes[2].healthy {
                    Err("n2 still healthy".to_string())
                } else {
                    Ok(())
                }
            },
        )
        .await;
        let nodes = env.cluster.nodes.clone();
        let n1_conninfo = conninfo_of(&nodes[1]).await;
        assert!(!n1_conninfo.is_empty(), "n1 follows n0 before the failure");
        blocking("kill n0", move || n0.kill9()).await;
        let reason =
            assert_no_promotion(env, "require_sync", "require_sync", Duration::from_secs(6)).await;
        assert_status_explains(env, "require_sync", "require_sync").await;
        assert!(reason.contains("require_sync"), "{reason}");

        // The refused failover detached n1 to compare LSNs; it must point n1 back at n0.
        let restored = wait_conninfo(&nodes[1], &n1_conninfo, Duration::from_secs(30)).await;
        println!(
            "[require_sync] n1's primary_conninfo is n0's again ({} after the check began)",
            ms(restored)
        );
        let (n0, n2) = (nodes[0].clone(), nodes[2].clone());
        blocking("restart n0", move || n0.start()).await;
        blocking("restart n2", move || n2.start()).await;
        let n1_back = wait_streams_from(&nodes[1], &nodes[0], Duration::from_secs(60)).await;
        let n2_back = wait_streams_from(&nodes[2], &nodes[0], Duration::from_secs(60)).await;
        println!(
            "[require_sync] n0 back: n1 streams from it after {}, n2 after {}",
            ms(n1_back),
            ms(n2_back)
        );
        wait_for(
            "pgswitch routes to n0 again",
            Duration::from_secs(30),
            || async move {
                let t = env.proxy.cluster.current();
                match t.primary {
                    Some(0) => Ok(()),
                    other => Err(format!("primary {other:?}, reason {:?}", t.reason)),
                }
            },
        )
        .await;
        let client = env.connect().await;
        bounded(
            "insert on n0 again",
            STEP,
            client.execute(INSERT, &[&21i64]),
        )
        .await
        .expect("a synchronous commit on n0 once it is back");
        assert_eq!(out_of_recovery(&nodes).await, vec!["n0".to_string()]);
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// pgswitch records the primary's LSN (and synchronous_standby_names) only from the second
/// diagnosis cycle on: a primary that dies within `interval_ms` of a fresh start must still not
/// be replaced by a standby beyond max_lag_bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_dying_right_after_pgswitch_starts_is_not_replaced_by_a_lagging_standby() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        // The first pgswitch only sets the scene: its failover is disabled.
        let env = TestEnv::start(
            ClusterSpec {
                standbys: 1,
                ..ClusterSpec::default()
            },
            |c| {
                failover_config(c);
                c.failover.enabled = false;
            },
        )
        .await;
        let env = &env;
        let (n0, n1) = (env.cluster.nodes[0].clone(), env.cluster.nodes[1].clone());
        wait_all_healthy(env).await;
        make_lag(&n0, &n1, "fresh-start").await;

        // A second pgswitch with a fresh state file; the primary dies right after it started.
        let state_file = env.cluster.dir.join("second.state");
        let config = common::config_for(&env.cluster, move |c| {
            failover_config(c);
            c.failover.max_lag_bytes = 1024;
            c.coordination.state_file = state_file;
        });
        let second = pgswitch::server::start(config)
            .await
            .expect("second pgswitch starts");
        let started = Instant::now();
        {
            let n0 = n0.clone();
            blocking("kill n0", move || n0.kill9()).await;
        }
        println!(
            "[fresh-start] n0 killed {} after the second pgswitch started",
            ms(started.elapsed())
        );
        let until = Instant::now() + Duration::from_secs(10);
        let mut promoted = None;
        let mut last = None;
        while Instant::now() < until {
            let t = second.cluster.current();
            last = Some((t.epoch, t.primary, t.reason.clone()));
            if t.primary == Some(1) {
                promoted = Some("pgswitch routes writes to n1");
                break;
            }
            if in_recovery(&n1).await == Ok(false) {
                promoted = Some("n1 left recovery (pg_promote ran)");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("[fresh-start] second pgswitch: (epoch, primary, reason) = {last:?}");
        second.shutdown().await;
        assert!(
            promoted.is_none(),
            "n1, megabytes behind, was promoted (max_lag_bytes = 1024) by a pgswitch whose primary \
             died before its second diagnosis cycle: {}; pgswitch's (epoch, primary, reason) then: {last:?}",
            promoted.unwrap_or_default()
        );
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Planned switchover there and back
// ---------------------------------------------------------------------------------------------

async fn switchover_to(env: &TestEnv, to: &str) -> (Duration, String) {
    let started = Instant::now();
    let answer = admin(
        env,
        Method::POST,
        "/switchover",
        Some(&format!("{{\"to\":\"{to}\"}}")),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "switchover to {to} refused: {}",
        answer.body
    );
    (took, answer.body)
}

/// Planned switchovers lose no acknowledged write, drop no client connection and fail at most
/// `WRITERS` transactions in all (those in flight when an old primary was cut).
fn assert_switchover_lost_nothing(s: &Summary) {
    assert!(
        s.missing.is_empty(),
        "{} acknowledged writes lost by a planned switchover",
        s.missing.len()
    );
    assert!(
        s.errors_connect.is_empty() && s.reconnects == 0,
        "a switchover must not drop client connections ({} connect errors, {} reconnections)",
        s.errors_connect.len(),
        s.reconnects
    );
    assert!(
        s.errors_existing.len() <= WRITERS,
        "{} writer errors (at most {WRITERS} expected)",
        s.errors_existing.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_there_and_back_loses_nothing_and_drops_no_idle_client() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let env = TestEnv::start(ClusterSpec::default(), failover_config).await;
        let env = &env;
        let port = env.port();
        create_table(env).await;
        wait_all_healthy(env).await;
        let topo = TopologyLog::start(env);
        let nodes = env.cluster.nodes.clone();
        let idle = IdleClients::connect(port, IDLE_CLIENTS).await;
        let work = Workload::start(port, WRITERS, 1);
        let origin = Instant::now();
        work.wait_acks_after(origin, 100, Duration::from_secs(60), "100 inserts before the switchover")
            .await;

        // There: n0 -> n1.
        let (took1, body1) = switchover_to(env, "n1").await;
        println!("[switchover] to n1 in {}: {body1}", ms(took1));
        let t = env.proxy.cluster.current();
        assert_eq!(t.primary, Some(1), "n1 is the primary after the switchover");
        assert!(!in_recovery(&nodes[1]).await.expect("n1 answers"));
        let s1 = Instant::now();
        work.wait_acks_after(s1, 50, Duration::from_secs(60), "writes on n1").await;
        let n2_follows = wait_streams_from(&nodes[2], &nodes[1], Duration::from_secs(60)).await;
        let states0 = watch_rejoin(env, 0, &nodes[1], Duration::from_secs(180), s1).await;
        println!(
            "[switchover] n2 follows n1 ({} after the check began); n0 rejoined {} after the switchover:\n  {}",
            ms(n2_follows),
            ms(s1.elapsed()),
            states0.join("\n  ")
        );

        // And back: n1 -> n0.
        let (took2, body2) = switchover_to(env, "n0").await;
        println!("[switchover] back to n0 in {}: {body2}", ms(took2));
        let t = env.proxy.cluster.current();
        assert_eq!(t.primary, Some(0), "n0 is the primary again");
        assert!(!in_recovery(&nodes[0]).await.expect("n0 answers"));
        let s2 = Instant::now();
        work.wait_acks_after(s2, 50, Duration::from_secs(60), "writes on n0 again")
            .await;
        wait_streams_from(&nodes[2], &nodes[0], Duration::from_secs(60)).await;
        let states1 = watch_rejoin(env, 1, &nodes[0], Duration::from_secs(180), s2).await;
        println!(
            "[switchover] n1 rejoined {} after the switchover back:\n  {}",
            ms(s2.elapsed()),
            states1.join("\n  ")
        );

        let idle_problems = idle.check().await;
        let log = work.finish().await;
        let present = ids_on(&nodes[0]).await;
        let s = summarize("switchover", &log, WRITERS, &present, origin);
        topo.print(origin, "switchover");
        // Longest write stall around each switchover.
        let mut acked: Vec<Instant> = log.acks.iter().map(|a| a.acked).collect();
        acked.sort();
        let stall = acked
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        println!(
            "[switchover] longest gap between acknowledged writes: {}; idle clients: {idle_problems:?}",
            ms(stall)
        );
        print_failover_metrics(env, "switchover").await;
        assert!(idle_problems.is_empty(), "idle clients saw errors: {idle_problems:?}");
        assert_switchover_lost_nothing(&s);
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// Nodes given by their socket directories: control connections, the server connections the
/// fence cuts, the standbys' `primary_conninfo` and the rejoin hook all use the Unix socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_between_nodes_given_by_socket_directories_loses_nothing() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let env = TestEnv::start_on_sockets(ClusterSpec::default(), failover_config).await;
        let dirs: Vec<String> = env
            .proxy
            .cluster
            .current()
            .nodes
            .iter()
            .map(|n| n.host.clone())
            .collect();
        assert!(dirs.iter().all(|d| d.starts_with('/')), "{dirs:?}");
        let env = &env;
        let port = env.port();
        create_table(env).await;
        wait_all_healthy(env).await;
        let nodes = env.cluster.nodes.clone();
        let work = Workload::start(port, WRITERS, 1);
        let origin = Instant::now();
        work.wait_acks_after(
            origin,
            100,
            Duration::from_secs(60),
            "100 inserts before the switchover",
        )
        .await;

        let (took, body) = switchover_to(env, "n1").await;
        println!("[socket switchover] to n1 in {}: {body}", ms(took));
        assert_eq!(env.proxy.cluster.current().primary, Some(1));
        let s1 = Instant::now();
        work.wait_acks_after(s1, 50, Duration::from_secs(60), "writes on n1")
            .await;
        wait_streams_from(&nodes[2], &nodes[1], Duration::from_secs(60)).await;
        let states = watch_rejoin(env, 0, &nodes[1], Duration::from_secs(180), s1).await;
        println!(
            "[socket switchover] n0 rejoined:\n  {}",
            states.join("\n  ")
        );
        for standby in [0, 2] {
            let sender = sql_row(
                &nodes[standby],
                "SELECT sender_host FROM pg_stat_wal_receiver WHERE status = 'streaming'",
            )
            .await
            .expect("WAL receiver");
            assert_eq!(
                sender.first().cloned().flatten().as_deref(),
                Some(dirs[1].as_str()),
                "{} streams from n1's socket",
                nodes[standby].name
            );
        }

        let log = work.finish().await;
        let present = ids_on(&nodes[1]).await;
        let s = summarize("socket switchover", &log, WRITERS, &present, origin);
        assert_switchover_lost_nothing(&s);
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// Asks for a switchover that must fail; returns pgswitch's answer and how long it took.
async fn failed_switchover_to(env: &TestEnv, to: &str) -> (Duration, String) {
    let started = Instant::now();
    let answer = admin(
        env,
        Method::POST,
        "/switchover",
        Some(&format!("{{\"to\":\"{to}\"}}")),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::CONFLICT,
        "the switchover to {to} must fail: {}",
        answer.body
    );
    (started.elapsed(), answer.body)
}

/// Waits until pgswitch routes writes to `nodes[i]`.
async fn wait_routed_to(env: &TestEnv, i: usize) {
    wait_for(
        &format!("pgswitch routes writes to n{i}"),
        Duration::from_secs(30),
        || async move {
            let t = env.proxy.cluster.current();
            match t.primary {
                Some(p) if p == i && t.nodes[i].healthy => Ok(()),
                other => Err(format!("primary {other:?}, reason {:?}", t.reason)),
            }
        },
    )
    .await
}

/// Makes `pg_promote` fail on each node before it writes its promote signal file: a dangling
/// symbolic link where the file goes (creating it fails with 58P01). Unlike a directory or a
/// file, which PostgreSQL's stat() finds and takes for a promote request at the next signal to
/// its postmaster, a dangling link is never one. Returns the links, to remove afterwards.
fn block_promotion(nodes: &[PgNode]) -> Vec<std::path::PathBuf> {
    nodes
        .iter()
        .map(|n| {
            let blocker = n.data_dir.join("promote");
            std::os::unix::fs::symlink(n.data_dir.join("no-such-dir/promote"), &blocker)
                .expect("a dangling link where pg_promote writes its file");
            blocker
        })
        .collect()
}

/// A write through pgswitch that must land on `node`.
async fn write_lands_on(env: &TestEnv, node: &PgNode, id: i64) {
    let client = env.connect().await;
    bounded("insert", STEP, client.execute(INSERT, &[&id]))
        .await
        .unwrap_or_else(|e| panic!("insert {id} through pgswitch: {}", describe(&e).1));
    assert!(ids_on(node).await.contains(&id), "{id} is on {}", node.name);
}

/// Three switchovers to n1 that fail at different points. Before the promotion (n1 cannot
/// replay, or pg_promote fails and n1 stays a standby) everything is undone: n0 takes writes
/// again and n1 streams from it again. After the promotion (n1 is out of recovery but the new
/// epoch cannot be written), n0 stays read-only and nothing is routed until n1 is published.
/// At no point do two nodes take writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_switchover_leaves_exactly_one_writable_primary_and_the_target_following_it() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let mut state_file = std::path::PathBuf::new();
        let env = TestEnv::start(ClusterSpec::default(), |c| {
            failover_config(c);
            // The old primary stays fenced after the last switchover; no hook runs.
            c.failover.rejoin_command = String::new();
            state_file = c.coordination.state_file.clone();
        })
        .await;
        let env = &env;
        create_table(env).await;
        wait_all_healthy(env).await;
        let nodes = env.cluster.nodes.clone();
        let n1_conninfo = conninfo_of(&nodes[1]).await;
        write_lands_on(env, &nodes[0], 1).await;

        // 1. n1 cannot catch up: its replay is paused behind n0.
        sql_exec(&nodes[1], "SELECT pg_wal_replay_pause()")
            .await
            .expect("pause replay on n1");
        write_lands_on(env, &nodes[0], 2).await;
        let (took, body) = failed_switchover_to(env, "n1").await;
        println!(
            "[failed switchover] catch-up: refused after {}: {body}",
            ms(took)
        );
        assert!(body.contains("target replayed"), "{body}");
        sql_exec(&nodes[1], "SELECT pg_wal_replay_resume()")
            .await
            .expect("resume replay on n1");
        wait_routed_to(env, 0).await;
        write_lands_on(env, &nodes[0], 3).await;
        wait_streams_from(&nodes[1], &nodes[0], Duration::from_secs(60)).await;
        assert_eq!(out_of_recovery(&nodes).await, vec!["n0".to_string()]);
        wait_all_healthy(env).await;

        // 2. pg_promote fails on n1 (its promote signal file cannot be created) after n1 was
        //    detached from n0: n1 stays a standby and must follow n0 again.
        let blocker = block_promotion(&nodes[1..2]).remove(0);
        let (took, body) = failed_switchover_to(env, "n1").await;
        std::fs::remove_file(&blocker).expect("remove the promote blocker");
        println!(
            "[failed switchover] pg_promote: refused after {}: {body}",
            ms(took)
        );
        assert!(body.contains("still in recovery"), "{body}");
        let restored = wait_conninfo(&nodes[1], &n1_conninfo, Duration::from_secs(5)).await;
        let streams = wait_streams_from(&nodes[1], &nodes[0], Duration::from_secs(60)).await;
        println!(
            "[failed switchover] n1's primary_conninfo restored ({}), n1 streams from n0 ({})",
            ms(restored),
            ms(streams)
        );
        wait_routed_to(env, 0).await;
        write_lands_on(env, &nodes[0], 4).await;
        assert_eq!(out_of_recovery(&nodes).await, vec!["n0".to_string()]);
        wait_all_healthy(env).await;

        // 3. n1 is promoted but the new epoch cannot be written (a directory where the state
        //    file's temporary copy goes): n0 must stay read-only, nothing is routed, and n1 is
        //    published once the state file can be written.
        let tmp = state_file.with_extension("tmp");
        std::fs::create_dir(&tmp).expect("a directory where the state file is written");
        let (took, body) = failed_switchover_to(env, "n1").await;
        println!(
            "[failed switchover] publish: refused after {}: {body}",
            ms(took)
        );
        assert!(body.contains("stays read-only"), "{body}");
        let n0_state = node_state(&nodes[0]).await;
        let n1_state = node_state(&nodes[1]).await;
        println!("[failed switchover] n0: {n0_state}; n1: {n1_state}");
        assert_eq!(n0_state, "primary, read-only (fenced)");
        assert!(!in_recovery(&nodes[1]).await.expect("n1 answers"));
        let t = env.proxy.cluster.current();
        assert_eq!(
            t.primary, None,
            "nothing is routed while n1 is not published"
        );
        assert_status_explains(env, "failed switchover", "stays read-only").await;
        std::fs::remove_dir(&tmp).expect("remove the state file blocker");
        wait_routed_to(env, 1).await;
        let epoch = env.proxy.cluster.current().epoch;
        write_lands_on(env, &nodes[1], 5).await;
        wait_streams_from(&nodes[2], &nodes[1], Duration::from_secs(60)).await;
        let n0_state = node_state(&nodes[0]).await;
        println!("[failed switchover] n1 published at epoch {epoch}; n0: {n0_state}");
        assert_ne!(n0_state, "primary, WRITABLE");
        let recorded = std::fs::read_to_string(&state_file).expect("state file");
        assert!(recorded.contains("\"n1\""), "{recorded}");
        print_failover_metrics(env, "failed switchover").await;
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// n0 dies and both standbys refuse pg_promote before it could act: their promote signal files
/// cannot be created (a dangling symbolic link in the place of each, as in the switchover test
/// above). A candidate that refused is still a standby with no promote request left, so one
/// failover attempt goes on to the next candidate: both are asked (each one's log shows the
/// refusal) and the attempt fails. Once the links are gone the next attempt promotes one, which
/// is published at the next epoch and takes writes, and the other follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_refuses_pg_promote_is_passed_over_for_the_next_one() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let env = &without_rejoin_hook().await;
        let nodes = env.cluster.nodes.clone();
        let (epoch0, scrape0) = first_write_on_n0(env).await;

        let blockers = block_promotion(&nodes[1..]);
        let killed = Instant::now();
        let n0 = nodes[0].clone();
        blocking("kill n0", move || n0.kill9()).await;
        let refusal = "could not create file \"promote\"";
        let standbys = &nodes[1..];
        wait_for(
            "both standbys refuse pg_promote",
            Duration::from_secs(90),
            || async move {
                let refused: Vec<&str> = standbys
                    .iter()
                    .filter(|n| n.log_tail(400).contains(refusal))
                    .map(|n| n.name.as_str())
                    .collect();
                match refused.len() {
                    2 => Ok(()),
                    _ => Err(format!(
                        "refused so far: {refused:?}; reason {:?}",
                        env.proxy.cluster.current().reason
                    )),
                }
            },
        )
        .await;
        let asked = killed.elapsed();
        let reason = wait_for_reason(
            env,
            "the attempt ends without a new primary",
            "every candidate failed to promote",
        )
        .await;
        let t = env.proxy.cluster.current();
        assert_eq!(t.primary, None, "nothing is routed while no standby can be promoted");
        assert_eq!(t.epoch, epoch0, "nothing was published");
        assert_eq!(out_of_recovery(&nodes[1..]).await, Vec::<String>::new());
        let failed_scrape = admin(env, Method::GET, "/metrics", None).await.body;
        let failed = automatic_failovers(&failed_scrape, "failed") - automatic_failovers(&scrape0, "failed");
        println!(
            "[refused promote] both standbys refused pg_promote {} after the kill; failed attempts counted: {failed}; reason: {reason}",
            ms(asked)
        );

        for blocker in &blockers {
            std::fs::remove_file(blocker).expect("remove the promote blocker");
        }
        let unblocked = Instant::now();
        let (p, other) = wait_for(
            "a standby is promoted once pg_promote can act",
            Duration::from_secs(60),
            || async move {
                let t = env.proxy.cluster.current();
                match t.primary {
                    Some(p) if p > 0 && t.nodes[p].healthy => Ok((p, 3 - p)),
                    other => Err(format!("primary {other:?}, reason {:?}", t.reason)),
                }
            },
        )
        .await;
        let took = unblocked.elapsed();
        assert_eq!(promoted_and_other(&nodes).await, (p, other));
        assert_eq!(
            env.proxy.cluster.current().epoch,
            epoch0 + 1,
            "published at the next epoch"
        );
        write_lands_on(env, &nodes[p], 2).await;
        let streams = wait_streams_from(&nodes[other], &nodes[p], Duration::from_secs(60)).await;
        let scrape = admin(env, Method::GET, "/metrics", None).await.body;
        let success = automatic_failovers(&scrape, "success") - automatic_failovers(&scrape0, "success");
        println!(
            "[refused promote] {} promoted and routed {} after the links were removed; {} streams from it {} later; successful failovers counted: {success}",
            nodes[p].name,
            ms(took),
            nodes[other].name,
            ms(streams)
        );
        // The counters are process-wide: another test of this binary may fail over meanwhile.
        assert!(
            failed >= 1.0 && success >= 1.0,
            "the attempt in which both refused is counted as failed ({failed}), the next as a success ({success})"
        );
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// n2 is down when n0 dies, so the failover cannot re-point it: n2 comes back still following
/// the dead (and quarantined) n0. pgswitch points it at n1, the primary,
/// and it streams from n1; when n0 comes back (fenced, no rejoin hook), n2 keeps following n1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_was_down_during_a_failover_follows_the_new_primary_when_it_returns() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let env = &without_rejoin_hook().await;
        let nodes = env.cluster.nodes.clone();
        first_write_on_n0(env).await;
        let n2 = nodes[2].clone();
        blocking("stop n2", move || n2.stop_fast()).await;
        let n0 = nodes[0].clone();
        blocking("kill n0", move || n0.kill9()).await;
        wait_routed_to(env, 1).await;
        write_lands_on(env, &nodes[1], 2).await;
        let n2 = nodes[2].clone();
        blocking("start n2", move || n2.start()).await;
        let started = Instant::now();
        let before = conninfo_of(&nodes[2]).await;
        assert!(
            before.contains(&format!("port={}", nodes[0].port)),
            "n2 comes back following n0: {before:?}"
        );
        let streams = wait_streams_from(&nodes[2], &nodes[1], Duration::from_secs(60)).await;
        println!(
            "[stray standby] n2 came back following n0; it streams from n1 {} after it started",
            ms(started.elapsed().max(streams))
        );
        let n0 = nodes[0].clone();
        blocking("restart n0", move || n0.start()).await;
        wait_for(
            "pgswitch fences the returning n0",
            Duration::from_secs(60),
            || async {
                match node_state(&nodes[0]).await.as_str() {
                    "primary, read-only (fenced)" => Ok(()),
                    other => Err(other.to_string()),
                }
            },
        )
        .await;
        wait_cycles(env, 3).await;
        assert_eq!(upstream_port(&nodes[2]).await, Ok(Some(nodes[1].port)));
        write_lands_on(env, &nodes[1], 3).await;
        let n2 = &nodes[2];
        wait_for(
            "n2 replays the writes n1 took",
            Duration::from_secs(30),
            || async move {
                let ids = ids_on(n2).await;
                match ids.contains(&2) && ids.contains(&3) {
                    true => Ok(()),
                    false => Err(format!("n2 has {ids:?}")),
                }
            },
        )
        .await;
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// The node's startup process (the one that replays WAL and acts on a promote request).
fn startup_pid(node: &PgNode) -> i32 {
    node.child_pids()
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("startup"))
        })
        .unwrap_or_else(|| panic!("{} has no startup process", node.name))
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this test started (through the harness).
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Whether `node` runs pg_promote now.
async fn runs_pg_promote(node: &PgNode) -> bool {
    sql_row(
        node,
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_promote%'",
    )
    .await
    .is_ok_and(|row| row.first().cloned().flatten().as_deref() == Some("1"))
}

/// n0 dies while both standbys' startup processes are stopped (SIGSTOP), so neither can act on
/// a promote request. Once pgswitch sent pg_promote to one (X), the other's (Y) startup
/// process resumes. pg_promote on X answers `false` after 60 s and X is still in recovery, but
/// its promote request stands: pgswitch sets X aside (read-only, quarantined) and promotes Y in
/// the same attempt. When X's startup process resumes, X acts on the request and leaves
/// recovery, read-only: it takes no writes, and writes keep going to Y. Once the rejoin hook is
/// configured, X is rejoined as a standby of Y.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_whose_promotion_does_not_finish_is_set_aside_and_the_next_one_promoted() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let env = &without_rejoin_hook().await;
        let nodes = env.cluster.nodes.clone();
        let (epoch0, scrape0) = first_write_on_n0(env).await;
        let lsn = sql_row(&nodes[0], "SELECT pg_current_wal_lsn()::text")
            .await
            .expect("n0's LSN")[0]
            .clone()
            .unwrap_or_default();
        for n in &nodes[1..] {
            let lsn = &lsn;
            wait_for(
                &format!("{} replays all n0 wrote", n.name),
                Duration::from_secs(30),
                || async move {
                    let row = sql_row(
                        n,
                        &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
                    )
                    .await?;
                    match row.first().cloned().flatten().as_deref() {
                        Some("t") => Ok(()),
                        other => Err(format!("not yet: {other:?}")),
                    }
                },
            )
            .await;
        }
        let startups = [startup_pid(&nodes[1]), startup_pid(&nodes[2])];
        for &pid in &startups {
            signal(pid, libc::SIGSTOP);
        }
        let killed = Instant::now();
        let n0 = nodes[0].clone();
        blocking("kill n0", move || n0.kill9()).await;
        let standbys = &nodes[1..];
        let x = wait_for(
            "pgswitch sends pg_promote to a standby",
            Duration::from_secs(60),
            || async move {
                for (k, n) in standbys.iter().enumerate() {
                    if runs_pg_promote(n).await {
                        return Ok(k + 1);
                    }
                }
                Err(format!("reason {:?}", env.proxy.cluster.current().reason))
            },
        )
        .await;
        let y = 3 - x;
        signal(startups[y - 1], libc::SIGCONT);
        println!(
            "[set aside] {} runs pg_promote {} after the kill; {}'s startup process resumed",
            nodes[x].name,
            ms(killed.elapsed()),
            nodes[y].name
        );
        let routed = wait_for(
            "the other standby is promoted and routed to",
            Duration::from_secs(150),
            || async move {
                let t = env.proxy.cluster.current();
                match t.primary {
                    Some(p) if p == y && t.nodes[y].healthy => Ok(killed.elapsed()),
                    other => Err(format!("primary {other:?}, reason {:?}", t.reason)),
                }
            },
        )
        .await;
        let t = env.proxy.cluster.current();
        assert_eq!(t.epoch, epoch0 + 1, "published at the next epoch");
        assert!(t.nodes[x].quarantined, "{} is quarantined", nodes[x].name);
        assert_eq!(node_state(&nodes[x]).await, "standby, not streaming");
        let read_only = sql_row(&nodes[x], "SHOW default_transaction_read_only")
            .await
            .expect("x answers");
        assert_eq!(read_only[0].as_deref(), Some("on"), "{} is read-only", nodes[x].name);
        write_lands_on(env, &nodes[y], 2).await;
        println!(
            "[set aside] {} routed {} after the kill at epoch {}; {} is read-only and quarantined",
            nodes[y].name,
            ms(routed),
            t.epoch,
            nodes[x].name
        );

        signal(startups[x - 1], libc::SIGCONT);
        let late = &nodes[x];
        wait_for(
            "the set-aside node acts on its promote request",
            Duration::from_secs(60),
            || async move {
                match in_recovery(late).await? {
                    false => Ok(()),
                    true => Err("still in recovery".to_string()),
                }
            },
        )
        .await;
        wait_cycles(env, 2).await;
        assert_eq!(node_state(late).await, "primary, read-only (fenced)");
        let refused = sql_exec(late, "INSERT INTO t(id) VALUES (99)").await;
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("read-only")),
            "a write on the set-aside node must fail: {refused:?}"
        );
        let t = env.proxy.cluster.current();
        assert_eq!(t.primary, Some(y), "writes still go to {}", nodes[y].name);
        write_lands_on(env, &nodes[y], 3).await;
        let scrape = admin(env, Method::GET, "/metrics", None).await.body;
        let success =
            automatic_failovers(&scrape, "success") - automatic_failovers(&scrape0, "success");
        assert!(success >= 1.0, "the failover is counted as a success: {success}");
        println!(
            "[set aside] {} left recovery late, read-only: its write was refused; {} still takes writes",
            late.name, nodes[y].name
        );

        // With the rejoin hook configured (a reload), the set-aside node is rejoined like a
        // former primary: rewound, a standby of the primary, and no longer quarantined.
        let hook = common::config_for(&env.cluster, failover_config)
            .failover
            .rejoin_command;
        assert!(!hook.is_empty(), "the test config sets the rejoin hook");
        let mut with_hook = Config::clone(&env.proxy.proxy.config());
        with_hook.failover.rejoin_command = hook;
        let restart = env.proxy.reload(with_hook).expect("reload with the rejoin hook");
        assert!(restart.is_empty(), "nothing needs a restart: {restart:?}");
        let reloaded = Instant::now();
        let states = watch_rejoin(env, x, &nodes[y], Duration::from_secs(180), reloaded).await;
        println!(
            "[set aside] {} rejoined as a standby of {} {} after the hook was configured:\n  {}",
            late.name,
            nodes[y].name,
            ms(reloaded.elapsed()),
            states.join("\n  ")
        );
        // Both promoted from timeline 1 and picked timeline 2: pg_rewind sees one timeline
        // and finds nothing to rewind, so the hook clones the node anew (keeping the old
        // directory beside it).
        let hook_log = std::fs::read_to_string(late.data_dir.join("pgswitch-rejoin.log"))
            .expect("the rejoin hook's log");
        assert!(
            hook_log.contains("cloning it anew"),
            "the hook must clone the twin timeline anew:\n{hook_log}"
        );
        let parent = late.data_dir.parent().expect("data dir parent");
        let kept = std::fs::read_dir(parent)
            .expect("cluster dir")
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{}.diverged-", late.name))
            });
        assert!(kept, "the diverged directory is kept beside the new one");
        write_lands_on(env, &nodes[y], 4).await;
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Automatic failovers whose promotion is not settled
// ---------------------------------------------------------------------------------------------

/// Automatic failovers counted with `result` in a /metrics scrape.
fn automatic_failovers(scrape: &str, result: &str) -> f64 {
    sample(
        scrape,
        &format!("pgswitch_failovers_total{{mode=\"automatic\",result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

/// The standby that left recovery after n0 died, and the other one.
async fn promoted_and_other(nodes: &[PgNode]) -> (usize, usize) {
    let out = out_of_recovery(&nodes[1..]).await;
    assert_eq!(
        out.len(),
        1,
        "exactly one standby must have left recovery: {out:?}"
    );
    let p = if out[0] == nodes[1].name { 1 } else { 2 };
    (p, 3 - p)
}

/// For `cycles` diagnosis cycles after n0 died with `promoted` promoted but not published:
/// nothing is routed, the epoch stays, `promoted` is the only node out of recovery, `other`
/// stays detached (never promoted, never pointed back at n0), and the reason says `expect`.
async fn assert_promotion_pending(
    env: &TestEnv,
    label: &str,
    (promoted, other): (usize, usize),
    expect: &str,
    epoch0: u64,
    cycles: usize,
) {
    let nodes = &env.cluster.nodes;
    let started = Instant::now();
    for _ in 0..cycles {
        wait_cycles(env, 1).await;
        let t = env.proxy.cluster.current();
        assert_eq!(
            t.primary.map(|i| t.nodes[i].name.clone()),
            None,
            "nothing may be routed while {} is not published (reason {:?})",
            nodes[promoted].name,
            t.reason
        );
        assert_eq!(t.epoch, epoch0, "the epoch changed (reason {:?})", t.reason);
        let reason = t.reason.clone().unwrap_or_default();
        assert!(
            reason.contains(expect),
            "the reason must say '{expect}': {reason:?}"
        );
        assert_eq!(
            out_of_recovery(nodes).await,
            vec![nodes[promoted].name.clone()],
            "only {} may be out of recovery",
            nodes[promoted].name
        );
        assert_eq!(
            conninfo_of(&nodes[other]).await,
            "",
            "{} must stay detached: neither promoted nor pointed back at the dead n0",
            nodes[other].name
        );
    }
    println!(
        "[{label}] {cycles} cycles in {}: nothing routed, only {} out of recovery, {} detached; reason: {}",
        ms(started.elapsed()),
        nodes[promoted].name,
        nodes[other].name,
        env.proxy.cluster.current().reason.unwrap_or_default()
    );
}

/// Once the promoted node can be published: it is routed to at epoch + 1, a write held
/// meanwhile runs on it, and the metrics count one successful automatic failover and no
/// failed one.
async fn assert_published_after_pending(
    env: &TestEnv,
    label: &str,
    promoted: usize,
    epoch0: u64,
    scrape0: &str,
    held: JoinHandle<Result<u64, String>>,
) {
    let nodes = &env.cluster.nodes;
    let unblocked = Instant::now();
    wait_routed_to(env, promoted).await;
    let epoch = env.proxy.cluster.current().epoch;
    assert_eq!(epoch, epoch0 + 1, "published at the next epoch");
    let held = bounded("the held write", STEP, held)
        .await
        .expect("held write task");
    assert_eq!(held, Ok(1), "the write held while nothing was routed");
    assert!(
        ids_on(&nodes[promoted]).await.contains(&100),
        "the held write ran on {}",
        nodes[promoted].name
    );
    write_lands_on(env, &nodes[promoted], 101).await;
    let scrape = admin(env, Method::GET, "/metrics", None).await.body;
    let success = automatic_failovers(&scrape, "success") - automatic_failovers(scrape0, "success");
    let failed = automatic_failovers(&scrape, "failed") - automatic_failovers(scrape0, "failed");
    println!(
        "[{label}] {} published at epoch {epoch} {} after the state file could be written; automatic failovers counted: {success} success, {failed} failed",
        nodes[promoted].name,
        ms(unblocked.elapsed())
    );
    // The counters are process-wide: another test of this binary may fail over at the same
    // time, so this one adds at least one success (when published) and no failure.
    assert!(
        success >= 1.0 && failed == 0.0,
        "the failover is counted as a success when it was published, never as failed: {success} success, {failed} failed"
    );
}

/// A write through pgswitch, sent now, that waits for a primary (id 100).
fn held_write(env: &TestEnv) -> JoinHandle<Result<u64, String>> {
    let port = env.port();
    tokio::spawn(async move {
        let client = connect_app(port).await.map_err(|e| e.1)?;
        client
            .execute(INSERT, &[&100i64])
            .await
            .map_err(|e| describe(&e).1)
    })
}

/// n0 dies while the state file cannot be written (a directory where its temporary copy
/// goes): the standby pgswitch promotes is a primary that cannot be published. Nothing is
/// routed, the other standby is neither promoted nor pointed back at the dead n0, over several
/// cycles; once the state file can be written the promoted node is published (epoch + 1),
/// takes writes through pgswitch, and the other standby streams from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_whose_epoch_cannot_be_recorded_is_published_later_and_never_joined_by_a_second_primary(
) {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let mut state_file = std::path::PathBuf::new();
        let env = TestEnv::start(ClusterSpec::default(), |c| {
            failover_config(c);
            c.failover.rejoin_command = String::new();
            state_file = c.coordination.state_file.clone();
        })
        .await;
        let env = &env;
        let nodes = env.cluster.nodes.clone();
        let (epoch0, scrape0) = first_write_on_n0(env).await;

        let tmp = state_file.with_extension("tmp");
        std::fs::create_dir(&tmp).expect("a directory where the state file is written");
        let n0 = nodes[0].clone();
        let killed = Instant::now();
        blocking("kill n0", move || n0.kill9()).await;
        let reason = wait_for_reason(
            env,
            "the promoted standby cannot be published",
            "cannot record the new epoch",
        )
        .await;
        println!(
            "[unpublished] {} after the kill: {reason}",
            ms(killed.elapsed())
        );
        let pair = promoted_and_other(&nodes).await;
        assert_promotion_pending(
            env,
            "unpublished",
            pair,
            "cannot record the new epoch",
            epoch0,
            4,
        )
        .await;
        assert_status_explains(env, "unpublished", "cannot record the new epoch").await;

        let held = held_write(env);
        std::fs::remove_dir(&tmp).expect("remove the state file blocker");
        assert_published_after_pending(env, "unpublished", pair.0, epoch0, &scrape0, held).await;
        let (new, other) = (&nodes[pair.0], &nodes[pair.1]);
        let streams = wait_streams_from(other, new, Duration::from_secs(60)).await;
        println!(
            "[unpublished] {} streams from {} ({} after the check began)",
            other.name,
            new.name,
            ms(streams)
        );
        assert_eq!(out_of_recovery(&nodes).await, vec![new.name.clone()]);
        let recorded = std::fs::read_to_string(&state_file).expect("state file");
        assert!(
            recorded.contains(&format!("\"{}\"", new.name)),
            "{recorded}"
        );
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// The failover config with each standby reached through one of `relays`, so the test can cut
/// pgswitch's path to it; no rejoin hook.
fn standbys_behind_relays(c: &mut Config, relays: &[TcpRelay; 2]) {
    failover_config(c);
    c.failover.rejoin_command = String::new();
    for (relay, node) in relays.iter().zip(&mut c.nodes[1..]) {
        relay.target.store(node.port, Ordering::SeqCst);
        node.port = relay.port;
    }
}

/// Three nodes with pgswitch in front, transaction pooling, no rejoin hook: a former primary
/// stays quarantined.
async fn without_rejoin_hook() -> TestEnv {
    TestEnv::start(ClusterSpec::default(), |c| {
        failover_config(c);
        c.failover.rejoin_command = String::new();
    })
    .await
}

/// A table, every node healthy, id 1 written through pgswitch to n0: returns the epoch and a
/// /metrics scrape from then, to compare against after a failover.
async fn first_write_on_n0(env: &TestEnv) -> (u64, String) {
    create_table(env).await;
    wait_all_healthy(env).await;
    write_lands_on(env, &env.cluster.nodes[0], 1).await;
    let epoch0 = env.proxy.cluster.current().epoch;
    let scrape0 = admin(env, Method::GET, "/metrics", None).await.body;
    (epoch0, scrape0)
}

/// Writes through pgswitch to n0, then kills n0 with every relay set to cut its standby's path
/// once pg_promote went through. Returns the index of the standby pgswitch promoted, the epoch
/// and a /metrics scrape from before the kill.
async fn kill_primary_and_cut_the_promotion(
    env: &TestEnv,
    relays: &[TcpRelay; 2],
    label: &str,
) -> (usize, u64, String) {
    let nodes = &env.cluster.nodes;
    let (epoch0, scrape0) = first_write_on_n0(env).await;
    for relay in relays {
        relay.cut_after("pg_promote(");
    }
    let n0 = nodes[0].clone();
    let killed = Instant::now();
    blocking("kill n0", move || n0.kill9()).await;
    let p = wait_for(
        "pg_promote reaches a standby and its answer is cut off",
        Duration::from_secs(60),
        || async move {
            match relays.iter().position(TcpRelay::tripped) {
                Some(r) => Ok(r + 1),
                None => Err(format!("reason {:?}", env.proxy.cluster.current().reason)),
            }
        },
    )
    .await;
    println!(
        "[{label}] {} ran pg_promote {} after the kill; pgswitch's path to it is cut",
        nodes[p].name,
        ms(killed.elapsed())
    );
    (p, epoch0, scrape0)
}

/// After the pending standby `pair.0` was published: the other one streams from it (through the
/// relay pgswitch knows it by), never got pg_promote, and only `pair.0` is out of recovery.
async fn assert_the_other_follows_through_its_relay(
    nodes: &[PgNode],
    relays: &[TcpRelay; 2],
    pair: (usize, usize),
) {
    let (p, other) = (pair.0, &nodes[pair.1]);
    let relay_port = relays[p - 1].port;
    wait_for(
        &format!("{} streams from {}", other.name, nodes[p].name),
        Duration::from_secs(60),
        || async move {
            match upstream_port(other).await? {
                Some(port) if port == relay_port => Ok(()),
                got => Err(format!("streams from {got:?}, want {relay_port}")),
            }
        },
    )
    .await;
    assert!(
        !relays[pair.1 - 1].tripped(),
        "pg_promote was sent to {}",
        other.name
    );
    assert_eq!(out_of_recovery(nodes).await, vec![nodes[p].name.clone()]);
}

/// pg_promote reaches the standby pgswitch chose, but its answer never comes back and the
/// standby stops answering (the path to it is cut once it ran pg_promote): whether it was
/// promoted is unknown. Nothing is routed and the other standby is neither promoted nor pointed
/// back at the dead n0 over several cycles. When the standby answers again (out of recovery)
/// while the state file cannot be written, that stays so; once it can, the standby is published
/// (epoch + 1), takes writes, and the other standby streams from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_with_an_unknown_outcome_blocks_every_other_promotion_until_the_node_answers() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        // pgswitch reaches each standby through a relay the test can cut.
        let relays = [TcpRelay::start().await, TcpRelay::start().await];
        let relays = &relays;
        let env = TestEnv::start(ClusterSpec::default(), |c| {
            standbys_behind_relays(c, relays)
        })
        .await;
        let env = &env;
        let state_file = env.proxy.proxy.config().coordination.state_file.clone();
        let nodes = env.cluster.nodes.clone();
        let (p, epoch0, scrape0) = kill_primary_and_cut_the_promotion(env, relays, "unknown").await;
        let pair = (p, 3 - p);
        let relay = &relays[p - 1];
        let unknown = "whether it left recovery is unknown";
        let reason = wait_for_reason(env, "the promotion's outcome is unknown", unknown).await;
        println!("[unknown] reason: {reason}");
        assert_eq!(promoted_and_other(&nodes).await, pair);
        assert_promotion_pending(env, "unknown", pair, unknown, epoch0, 3).await;
        assert_status_explains(env, "unknown", unknown).await;

        // The standby answers again, out of recovery, but its epoch cannot be recorded yet.
        let tmp = state_file.with_extension("tmp");
        std::fs::create_dir(&tmp).expect("a directory where the state file is written");
        relay.restore();
        let unpublished = "cannot record the new epoch";
        let reason =
            wait_for_reason(env, "the standby answers but is not published", unpublished).await;
        println!("[unknown] path restored: {reason}");
        assert_promotion_pending(env, "unknown", pair, unpublished, epoch0, 2).await;

        let held = held_write(env);
        std::fs::remove_dir(&tmp).expect("remove the state file blocker");
        assert_published_after_pending(env, "unknown", p, epoch0, &scrape0, held).await;
        assert_the_other_follows_through_its_relay(&nodes, relays, pair).await;
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// As above, pg_promote reaches a standby and its answer never comes back; then pgswitch
/// stops while that standby does not answer, and a second pgswitch starts from the same config
/// and state file. The pending promotion was recorded there: the second pgswitch routes nothing
/// and promotes no other node over several cycles, and publishes the standby (epoch + 1) once it
/// answers, out of recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_pgswitch_keeps_a_promotion_with_an_unknown_outcome_pending_until_the_node_answers(
) {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let relays = [TcpRelay::start().await, TcpRelay::start().await];
        let relays = &relays;
        let tweak = |c: &mut Config| standbys_behind_relays(c, relays);
        let first = TestEnv::start(ClusterSpec::default(), tweak).await;
        let state_file = first.proxy.proxy.config().coordination.state_file.clone();
        let nodes = first.cluster.nodes.clone();
        let unknown = "whether it left recovery is unknown";
        let (p, epoch0, scrape0) = {
            let env = &first;
            let (p, epoch0, scrape0) =
                kill_primary_and_cut_the_promotion(env, relays, "restart").await;
            let reason = wait_for_reason(env, "the promotion's outcome is unknown", unknown).await;
            println!("[restart] reason: {reason}");
            assert_promotion_pending(env, "restart", (p, 3 - p), unknown, epoch0, 2).await;
            (p, epoch0, scrape0)
        };
        let pair = (p, 3 - p);
        let recorded = std::fs::read_to_string(&state_file).expect("state file");
        println!("[restart] state file while pending: {recorded}");
        assert!(
            recorded.contains("\"pending\"")
                && recorded.contains(&format!("\"{}\"", nodes[p].name)),
            "the state file records {} as pending: {recorded}",
            nodes[p].name
        );

        // pgswitch stops; a second one starts from the same config and state file while the
        // promoted standby still does not answer.
        let TestEnv { proxy, cluster } = first;
        let restarted = Instant::now();
        proxy.shutdown().await;
        let second = pgswitch::server::start(common::config_for(&cluster, tweak))
            .await
            .expect("second pgswitch starts");
        let env = &TestEnv {
            proxy: second,
            cluster,
        };
        let t = env.proxy.cluster.current();
        println!(
            "[restart] second pgswitch started in {}: epoch {} primary {:?} reason {:?}",
            ms(restarted.elapsed()),
            t.epoch,
            t.primary.map(|i| t.nodes[i].name.clone()),
            t.reason
        );
        assert_eq!(
            t.primary, None,
            "the second pgswitch routes nothing at once"
        );
        assert_promotion_pending(env, "restart", pair, unknown, epoch0, 3).await;
        assert_status_explains(env, "restart", unknown).await;

        let held = held_write(env);
        relays[p - 1].restore();
        assert_published_after_pending(env, "restart", p, epoch0, &scrape0, held).await;
        assert_the_other_follows_through_its_relay(&nodes, relays, pair).await;
        let recorded = std::fs::read_to_string(&state_file).expect("state file");
        assert!(
            !recorded.contains("\"pending\""),
            "published: nothing pending any more: {recorded}"
        );
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

/// pg_promote reaches the standby pgswitch chose and is refused there (a dangling promote
/// link on each standby), but the answer is cut off with the path to it: the outcome is unknown
/// and the promotion pending. n0 comes back, pgswitch restarts, then the standby answers, still
/// in recovery. The second pgswitch knows from the state file which standbys the attempt
/// detached, not what they followed: it points both back at n0 (with the conninfo it builds for
/// re-pointing), routes to n0 again at the same epoch, and both stream from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_pgswitch_that_finds_the_pending_node_in_recovery_points_the_standbys_back_at_the_old_primary(
) {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let relays = [TcpRelay::start().await, TcpRelay::start().await];
        let relays = &relays;
        let tweak = |c: &mut Config| standbys_behind_relays(c, relays);
        let first = TestEnv::start(ClusterSpec::default(), tweak).await;
        let state_file = first.proxy.proxy.config().coordination.state_file.clone();
        let nodes = first.cluster.nodes.clone();
        let blockers = block_promotion(&nodes[1..]);
        let unknown = "whether it left recovery is unknown";
        let (p, epoch0) = {
            let env = &first;
            let (p, epoch0, _) = kill_primary_and_cut_the_promotion(env, relays, "undone").await;
            let reason = wait_for_reason(env, "the promotion's outcome is unknown", unknown).await;
            println!("[undone] reason: {reason}");
            (p, epoch0)
        };
        let other = 3 - p;
        let recorded = std::fs::read_to_string(&state_file).expect("state file");
        println!("[undone] state file while pending: {recorded}");
        let state: Value = serde_json::from_str(&recorded).expect("the state file is JSON");
        assert_eq!(
            state["pending"]["detached"],
            serde_json::json!([nodes[other].name]),
            "the state file names the other detached standby: {recorded}"
        );
        for n in &nodes[1..] {
            assert_eq!(conninfo_of(n).await, "", "{} is detached from n0", n.name);
        }
        let n0 = nodes[0].clone();
        blocking("restart n0", move || n0.start()).await;

        let TestEnv { proxy, cluster } = first;
        proxy.shutdown().await;
        let second = pgswitch::server::start(common::config_for(&cluster, tweak))
            .await
            .expect("second pgswitch starts");
        let env = &TestEnv {
            proxy: second,
            cluster,
        };
        assert_eq!(
            env.proxy.cluster.current().primary,
            None,
            "the second pgswitch routes nothing while the promotion is pending"
        );
        let answered = Instant::now();
        relays[p - 1].restore();
        wait_routed_to(env, 0).await;
        let routed = answered.elapsed();
        assert_eq!(
            env.proxy.cluster.current().epoch,
            epoch0,
            "nothing was published"
        );
        write_lands_on(env, &nodes[0], 2).await;
        for n in &nodes[1..] {
            let took = wait_streams_from(n, &nodes[0], Duration::from_secs(60)).await;
            println!(
                "[undone] {} streams from n0 again ({} after it was routed to)",
                n.name,
                ms(took)
            );
        }
        assert_eq!(out_of_recovery(&nodes).await, vec!["n0".to_string()]);
        let recorded = std::fs::read_to_string(&state_file).expect("state file");
        assert!(
            !recorded.contains("\"pending\""),
            "settled: nothing pending any more: {recorded}"
        );
        println!(
            "[undone] {} answered in recovery; n0 routed {} later at epoch {epoch0}",
            nodes[p].name,
            ms(routed)
        );
        for blocker in &blockers {
            std::fs::remove_file(blocker).expect("remove the promote blocker");
        }
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Fencing without a hook, and a restarted pgswitch
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_primary_without_a_rejoin_hook_is_fenced_and_a_restarted_pgswitch_never_routes_to_it(
) {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let tweak = |c: &mut Config| {
            failover_config(c);
            c.failover.rejoin_command = String::new();
        };
        let env = TestEnv::start(ClusterSpec::default(), tweak).await;
        let env = &env;
        create_table(env).await;
        wait_all_healthy(env).await;
        let n0 = env.cluster.nodes[0].clone();
        let epoch0 = env.proxy.cluster.current().epoch;
        {
            let n0 = n0.clone();
            blocking("stop n0", move || n0.stop_immediate()).await;
        }
        let p = wait_for("failover", Duration::from_secs(60), || async move {
            match env.proxy.cluster.current().primary {
                Some(p) if p != 0 => Ok(p),
                other => Err(format!("primary {other:?}")),
            }
        })
        .await;
        let new = env.cluster.nodes[p].clone();
        let client = env.connect().await;
        bounded("insert", STEP, client.execute(INSERT, &[&1i64]))
            .await
            .expect("write after the failover");

        // The old primary comes back as a primary: pgswitch must fence it.
        let back = Instant::now();
        {
            let n0 = n0.clone();
            blocking("restart n0", move || n0.start()).await;
        }
        let n0r = &n0;
        wait_for(
            "n0 fenced (read-only)",
            Duration::from_secs(30),
            || async move {
                match node_state(n0r).await.as_str() {
                    "primary, read-only (fenced)" => Ok(()),
                    other => Err(other.to_string()),
                }
            },
        )
        .await;
        let fenced_after = back.elapsed();
        let n0_app = direct_as(&n0, USER, PASSWORD).await.expect("app on n0");
        let err = n0_app
            .execute("INSERT INTO t(id) VALUES (-1)", &[])
            .await
            .expect_err("a fenced old primary refuses writes");
        assert_eq!(describe(&err).0, "25006", "{:?}", describe(&err));

        // It stays quarantined, and writes keep going to the new primary.
        for id in 2..=20i64 {
            bounded("insert", STEP, client.execute(INSERT, &[&id]))
                .await
                .expect("write with the old primary back");
        }
        let t = env.proxy.cluster.current();
        assert_eq!(t.primary, Some(p));
        assert!(
            t.nodes[0].quarantined,
            "n0 must stay quarantined without a hook"
        );
        let st = status_json(env).await;
        let n0_status = st["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == "n0"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            n0_status["quarantined"],
            Value::Bool(true),
            "/status shows n0 quarantined: {n0_status}"
        );
        let scrape = admin(env, Method::GET, "/metrics", None).await.body;
        assert_eq!(
            sample(&scrape, "pgswitch_node_quarantined{node=\"n0\"}"),
            Some(1.0),
            "the metrics show n0 quarantined"
        );
        assert_eq!(
            sample(&scrape, "pgswitch_node_quarantined{node=\"n1\"}"),
            Some(0.0),
            "the metrics show n1 in service"
        );

        // A second pgswitch started from the same state file never routes to n0.
        let config = common::config_for(&env.cluster, tweak);
        let second = pgswitch::server::start(config)
            .await
            .expect("second pgswitch starts");
        let t2 = second.cluster.current();
        println!(
            "[fence] second pgswitch: epoch {} primary {:?} quarantined {:?}",
            t2.epoch,
            t2.primary.map(|i| t2.nodes[i].name.clone()),
            t2.nodes
                .iter()
                .filter(|n| n.quarantined)
                .map(|n| n.name.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            t2.primary,
            Some(p),
            "a restarted pgswitch routes to {}",
            new.name
        );
        assert!(t2.epoch > epoch0);
        let (c2, conn2) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname=postgres",
                second.listen_addr.port()
            ),
            NoTls,
        )
        .await
        .expect("connect to the second pgswitch");
        tokio::spawn(conn2);
        bounded("insert", STEP, c2.execute(INSERT, &[&777i64]))
            .await
            .expect("write through the second pgswitch");
        let on_new = ids_on(&new).await;
        assert!(
            on_new.contains(&777),
            "the second pgswitch wrote to the new primary"
        );
        let state = node_state(&n0).await;
        println!(
            "[fence] n0 fenced {} after it came back; now: {state}",
            ms(fenced_after)
        );
        assert_eq!(state, "primary, read-only (fenced)");
        drop(c2);
        second.shutdown().await;
        panic_watch::assert_no_proxy_panics();
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Session mode: idle clients re-attached to the new primary
// ---------------------------------------------------------------------------------------------

/// Issue 4, "The switch": in session mode, clients not in a transaction are re-attached to the
/// new primary with their startup parameters, the parameters they set since, and their prepared
/// statements restored (only clients in a transaction get 08006 and are closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_idle_clients_are_reattached_to_the_new_primary() {
    bounded("test", TEST_LIMIT, async {
        panic_watch::install();
        let env = TestEnv::start(ClusterSpec::default(), |c| {
            failover_config(c);
            c.pool_mode = PoolMode::Session;
        })
        .await;
        let env = &env;
        create_table(env).await;
        wait_all_healthy(env).await;
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname=postgres application_name=idle-session",
                env.port()
            ),
            NoTls,
        )
        .await
        .expect("session-mode client connects");
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                println!("[session] the idle client's connection ended: {:?}", describe(&e));
            }
        });
        let stmt = client.prepare("SELECT $1::int").await.expect("prepare");
        client.query_one(&stmt, &[&1i32]).await.expect("run");
        // Session state set after login, in each of the ways clients set it.
        client
            .batch_execute("SET search_path = idle_schema, public; SET statement_timeout = '7s'")
            .await
            .expect("SET");
        client
            .query_one("SELECT set_config('work_mem', $1, false)", &[&"12MB"])
            .await
            .expect("set_config");
        client
            .execute("SET SESSION lock_timeout = 3000", &[])
            .await
            .expect("SET through Parse/Bind/Execute");
        // One more round trip: pgswitch reads the parameters back after each transaction that
        // set one, and serves the next query only after that, so from here on it knows them.
        // (A server lost during that read-back closes the client with 08006 instead.)
        client.simple_query("SELECT 1").await.expect("SELECT 1");
        let set_after_login = [
            ("search_path", "idle_schema, public"),
            ("statement_timeout", "7s"),
            ("work_mem", "12MB"),
            ("lock_timeout", "3s"),
        ];

        let n0 = env.cluster.nodes[0].clone();
        blocking("kill n0", move || n0.kill9()).await;
        let p = wait_for("failover", Duration::from_secs(60), || async move {
            match env.proxy.cluster.current().primary {
                Some(p) if p != 0 => Ok(p),
                other => Err(format!("primary {other:?}")),
            }
        })
        .await;
        println!("[session] failed over to {}", env.cluster.nodes[p].name);
        let mut problems = Vec::new();
        if client.is_closed() {
            problems.push("the idle session-mode client's connection was closed".to_string());
        } else {
            for (name, want) in [("application_name", "idle-session")]
                .into_iter()
                .chain(set_after_login)
            {
                let show = format!("SHOW {name}");
                match tokio::time::timeout(STEP, client.simple_query(&show)).await {
                    Ok(Ok(msgs)) => {
                        let value = msgs.iter().find_map(|m| match m {
                            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                            _ => None,
                        });
                        if value.as_deref() != Some(want) {
                            problems.push(format!("{name} after the failover: {value:?}"));
                        }
                    }
                    Ok(Err(e)) => problems.push(format!("{show}: {:?}", describe(&e))),
                    Err(_) => problems.push(format!("{show}: no answer")),
                }
            }
            match tokio::time::timeout(STEP, client.query_one(&stmt, &[&5i32])).await {
                Ok(Ok(row)) if row.get::<_, i32>(0) == 5 => {}
                Ok(Ok(_)) => problems.push("prepared statement: wrong answer".into()),
                Ok(Err(e)) => problems.push(format!("prepared statement: {:?}", describe(&e))),
                Err(_) => problems.push("prepared statement: no answer".into()),
            }
        }
        println!("[session] idle session-mode client after the failover: {problems:?}");
        assert!(
            problems.is_empty(),
            "an idle session-mode client must be re-attached to the new primary: {problems:?}"
        );
        panic_watch::assert_no_proxy_panics();
    })
    .await
}
