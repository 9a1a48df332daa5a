//! The cluster as pgswitch sees it: every node diagnosed over a control connection, and the
//! resulting `Topology` published through a `watch` channel. Pools and sessions only read it;
//! `failover::Controller` is its one owner.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio_postgres::{SimpleQueryMessage, SimpleQueryRow};

use crate::backend::ServerTarget;
use crate::config::{Config, NodeConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
    #[default]
    Unknown,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Unknown => "unknown",
        })
    }
}

/// A standby as the primary's `pg_stat_replication` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Replica {
    pub application_name: String,
    pub state: String,
    pub sync_state: String,
}

/// What the diagnoses of a node found: the last successful diagnosis, and how the latest ones
/// went.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// The last successful diagnosis (kept, stale, while the node fails them); its fields
    /// appear directly among the node's in `/status`.
    #[serde(flatten)]
    pub diagnosis: Diagnosis,
    pub healthy: bool,
    /// A former primary: never routed to until it rejoined as a standby.
    pub quarantined: bool,
    /// How long the last diagnosis took; `None` when it failed.
    pub latency_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

impl NodeStatus {
    fn new(n: &NodeConfig) -> NodeStatus {
        NodeStatus::unknown(&n.name, &n.host, n.port)
    }

    /// A node not diagnosed yet.
    pub fn unknown(name: &str, host: &str, port: u16) -> NodeStatus {
        NodeStatus {
            name: name.to_string(),
            host: host.to_string(),
            port,
            diagnosis: Diagnosis::default(),
            healthy: false,
            quarantined: false,
            latency_ms: None,
            consecutive_failures: 0,
            last_error: None,
        }
    }

    /// Updates from a successful diagnosis.
    pub fn record(&mut self, d: Diagnosis) {
        self.healthy = true;
        self.latency_ms = Some(d.latency.as_secs_f64() * 1000.0);
        self.diagnosis = d;
        self.consecutive_failures = 0;
        self.last_error = None;
    }

    /// Records a failed diagnosis; true when the error is new (worth a log line).
    pub fn record_failure(&mut self, error: String) -> bool {
        self.healthy = false;
        self.consecutive_failures += 1;
        self.latency_ms = None;
        let new = self.last_error.as_deref() != Some(error.as_str());
        self.last_error = Some(error);
        new
    }

    pub fn lsn_value(&self) -> Option<u64> {
        parse_lsn(self.diagnosis.lsn.as_deref()?)
    }

    pub fn replay_lsn_value(&self) -> Option<u64> {
        parse_lsn(self.diagnosis.replay_lsn.as_deref()?)
    }

    /// How far a standby's WAL goes: the later of what it received and what it replayed. A
    /// restarted standby reports as received the start of the WAL segment it resumed streaming
    /// from (up to 16 MB before what it already replayed) until new WAL arrives. How
    /// candidates for promotion are compared, and lag is measured.
    pub fn wal_position(&self) -> Option<u64> {
        match (self.lsn_value(), self.replay_lsn_value()) {
            (Some(received), Some(replayed)) => Some(received.max(replayed)),
            (received, replayed) => received.or(replayed),
        }
    }

    pub fn target(&self) -> ServerTarget {
        ServerTarget {
            node: Arc::from(self.name.as_str()),
            host: Arc::from(self.host.as_str()),
            port: self.port,
        }
    }
}

/// The published view of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    pub epoch: u64,
    /// Index into `nodes` of the node that takes writes, if any.
    pub primary: Option<usize>,
    /// A failover or switchover is running: new transactions wait.
    pub holding: bool,
    /// Why there is no primary, or why a failover did not happen.
    pub reason: Option<String>,
    pub nodes: Vec<NodeStatus>,
}

impl Topology {
    pub fn initial(config: &Config) -> Topology {
        Topology {
            epoch: 0,
            primary: None,
            holding: false,
            reason: Some("not diagnosed yet".into()),
            nodes: config.nodes.iter().map(NodeStatus::new).collect(),
        }
    }

    /// The server connections should go to, if a primary is known.
    pub fn primary_target(&self) -> Option<ServerTarget> {
        Some(self.nodes.get(self.primary?)?.target())
    }

    /// The name of the node that takes writes, if any.
    pub fn primary_name(&self) -> Option<&str> {
        Some(self.nodes.get(self.primary?)?.name.as_str())
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }
}

/// Handle the data path uses to read the topology and to report a broken server connection.
#[derive(Clone)]
pub struct ClusterView {
    pub topology: watch::Receiver<Topology>,
    rediagnose: Arc<Notify>,
    /// Clients now waiting for a primary (`pgswitch_clients_held`).
    held: Arc<AtomicUsize>,
}

impl ClusterView {
    pub fn new(topology: watch::Receiver<Topology>, rediagnose: Arc<Notify>) -> ClusterView {
        ClusterView {
            topology,
            rediagnose,
            held: Arc::default(),
        }
    }

    /// Clients now waiting for a primary to be known, or for an unreachable one to change.
    pub fn clients_held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// A passive signal: a server connection broke or could not be opened. Diagnose now
    /// instead of waiting for the next interval.
    pub fn report_server_failure(&self) {
        self.rediagnose.notify_one();
    }

    pub fn current(&self) -> Topology {
        self.topology.borrow().clone()
    }

    /// Waits until the primary is no longer `target` (a new one, or none), up to `limit`.
    pub async fn wait_for_change(&self, target: &ServerTarget, limit: Duration) {
        let _held = crate::metrics::Counted::new(&self.held);
        let mut rx = self.topology.clone();
        let wait = async {
            loop {
                if rx.borrow_and_update().primary_target().as_ref() != Some(target) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }

    /// Waits until a primary is known, up to `limit`.
    pub async fn wait_for_primary(&self, limit: Duration) -> Option<(ServerTarget, u64)> {
        // Fast path, taken by nearly every transaction: no timer when a primary is known.
        {
            let t = self.topology.borrow();
            if let Some(target) = t.primary_target() {
                return Some((target, t.epoch));
            }
        }
        let _held = crate::metrics::Counted::new(&self.held);
        let mut rx = self.topology.clone();
        let wait = async {
            loop {
                {
                    let t = rx.borrow_and_update();
                    if let Some(target) = t.primary_target() {
                        return Some((target, t.epoch));
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }
}

/// What one diagnosis of a node found. Serialized as part of `NodeStatus` (`/status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Diagnosis {
    pub role: Role,
    pub timeline: Option<u32>,
    /// Primary: current WAL LSN; standby: last received LSN.
    pub lsn: Option<String>,
    pub replay_lsn: Option<String>,
    pub replay_paused: bool,
    /// Standby: seconds since the last replayed transaction was committed on the primary.
    pub lag_seconds: Option<f64>,
    /// Standby: `host:port` its WAL receiver streams from.
    pub upstream: Option<String>,
    /// Standby: seconds since its WAL receiver last heard from the primary.
    pub last_msg_age_seconds: Option<f64>,
    /// Primary: `default_transaction_read_only` is on (fenced or being switched over).
    pub read_only: bool,
    /// Primary: its `synchronous_standby_names`.
    pub synchronous_standby_names: Option<String>,
    /// Primary: who streams from it.
    pub replicas: Vec<Replica>,
    /// How long the diagnosis took; `/status` shows it as the node's `latency_ms` instead.
    #[serde(skip)]
    pub latency: Duration,
}

/// Parses an LSN such as `0/3000060`.
pub fn parse_lsn(lsn: &str) -> Option<u64> {
    let (hi, lo) = lsn.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > u64::from(u32::MAX) || lo > u64::from(u32::MAX) {
        return None;
    }
    Some((hi << 32) | lo)
}

/// Column `i` of a control query's row; a type that does not match pgswitch's own SQL is an
/// error of the request (a failed diagnosis), never a panic.
pub fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, String> {
    row.try_get(i)
        .map_err(|e| format!("unexpected column {i} in a control answer: {e}"))
}

/// The LSN in text column `i` of a control query's row; `None` for NULL, a missing column or
/// text that is not an LSN.
pub fn lsn_column(row: &tokio_postgres::Row, i: usize) -> Option<u64> {
    row.try_get::<_, Option<String>>(i)
        .ok()
        .flatten()
        .as_deref()
        .and_then(parse_lsn)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// A control connection to one node, kept open between diagnoses and reopened when broken.
pub struct ControlConn {
    node: NodeConfig,
    client: Option<tokio_postgres::Client>,
}

/// The diagnosis row, then one row per standby streaming from this node.
const DIAGNOSIS_AND_REPLICATION_SQL: &str = concat!(
    "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text ELSE pg_current_wal_lsn()::text END, \
    pg_last_wal_replay_lsn()::text, \
    CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, \
    CASE WHEN pg_is_in_recovery() THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END, \
    CASE WHEN pg_is_in_recovery() THEN \
        (SELECT received_tli FROM pg_stat_wal_receiver) \
    ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
    (SELECT timeline_id FROM pg_control_checkpoint()), \
    (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'), \
    (SELECT extract(epoch FROM now() - last_msg_receipt_time)::float8 FROM pg_stat_wal_receiver WHERE status = 'streaming'), \
    current_setting('default_transaction_read_only') = 'on', \
    current_setting('synchronous_standby_names'); ",
    "SELECT coalesce(application_name, ''), coalesce(state, ''), coalesce(sync_state, '') \
    FROM pg_stat_replication WHERE NOT pg_is_in_recovery()"
);

/// Reads the answer to [`DIAGNOSIS_AND_REPLICATION_SQL`] (text values, as a simple query
/// returns them).
fn parse_diagnosis(messages: &[SimpleQueryMessage]) -> Result<Diagnosis, String> {
    let mut statements = messages.split(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)));
    fn rows(statement: Option<&[SimpleQueryMessage]>) -> Vec<&SimpleQueryRow> {
        statement
            .unwrap_or_default()
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .collect()
    }
    let diagnosis = rows(statements.next());
    let [row] = diagnosis.as_slice() else {
        return Err(format!(
            "the diagnosis query returned {} rows instead of one",
            diagnosis.len()
        ));
    };
    fn text_in(row: &SimpleQueryRow, i: usize) -> Result<Option<&str>, String> {
        row.try_get(i)
            .map_err(|e| format!("unexpected column {i} in a control answer: {e}"))
    }
    let text = |i: usize| text_in(row, i);
    let flag = |i: usize| -> Result<Option<bool>, String> {
        match text(i)? {
            None => Ok(None),
            Some("t") => Ok(Some(true)),
            Some("f") => Ok(Some(false)),
            Some(other) => Err(format!("column {i} is not a boolean: {other:?}")),
        }
    };
    fn number<T: std::str::FromStr>(i: usize, v: Option<&str>) -> Result<Option<T>, String> {
        v.map(|v| {
            v.parse()
                .map_err(|_| format!("column {i} is not a number: {v:?}"))
        })
        .transpose()
    }
    let in_recovery = flag(0)?.ok_or("pg_is_in_recovery() returned NULL")?;
    let timeline = number::<i64>(5, text(5)?)?.or(number::<i64>(6, text(6)?)?);
    let mut d = Diagnosis {
        role: if in_recovery {
            Role::Standby
        } else {
            Role::Primary
        },
        lsn: text(1)?.map(str::to_string),
        replay_lsn: text(2)?.map(str::to_string),
        replay_paused: flag(3)?.unwrap_or(false),
        lag_seconds: number(4, text(4)?)?,
        timeline: timeline.and_then(|t| u32::try_from(t).ok()),
        upstream: text(7)?.map(str::to_string),
        last_msg_age_seconds: number(8, text(8)?)?,
        read_only: flag(9)?.unwrap_or(false),
        synchronous_standby_names: text(10)?.map(str::to_string),
        replicas: Vec::new(),
        latency: Duration::ZERO,
    };
    for r in rows(statements.next()) {
        let get = |i: usize| text_in(r, i).map(|v| v.unwrap_or_default().to_string());
        d.replicas.push(Replica {
            application_name: get(0)?,
            state: get(1)?,
            sync_state: get(2)?,
        });
    }
    Ok(d)
}

impl ControlConn {
    pub fn new(node: NodeConfig) -> ControlConn {
        ControlConn { node, client: None }
    }

    pub fn name(&self) -> &str {
        &self.node.name
    }

    /// Connects (if needed) within `timeout`.
    pub async fn client(
        &mut self,
        config: &Config,
        timeout: Duration,
    ) -> Result<&tokio_postgres::Client, String> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let mut pg = tokio_postgres::Config::new();
            pg.host(&self.node.host)
                .port(self.node.port)
                .user(&config.control.user)
                .dbname(&config.control.database)
                .application_name("pgswitch")
                .connect_timeout(timeout)
                .keepalives_idle(Duration::from_secs(5));
            if !config.control.password.is_empty() {
                pg.password(&config.control.password);
            }
            let connect = pg.connect(tokio_postgres::NoTls);
            let (client, connection) = tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
                .map_err(|e| describe(&e))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.client = Some(client);
        }
        self.client
            .as_ref()
            .ok_or_else(|| "no control connection".to_string())
    }

    /// Runs the `;`-separated statements of `sql` one by one (ALTER SYSTEM refuses to share
    /// a transaction), in order, within `timeout` overall.
    pub async fn execute(
        &mut self,
        config: &Config,
        sql: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let result = async {
            let client = self.client(config, timeout).await?;
            for statement in split_statements(sql) {
                client
                    .batch_execute(statement)
                    .await
                    .map_err(|e| describe(&e))?;
            }
            Ok(())
        };
        let outcome = tokio::time::timeout(timeout, result).await;
        self.settle(outcome, timeout)
    }

    /// Runs a query returning one row of text-able columns within `timeout`.
    pub async fn query_one(
        &mut self,
        config: &Config,
        sql: &str,
        timeout: Duration,
    ) -> Result<tokio_postgres::Row, String> {
        self.query_one_coded(config, sql, timeout)
            .await
            .map_err(|f| f.message)
    }

    /// [`ControlConn::query_one`], telling an error the server raised (with its SQLSTATE) from
    /// no answer at all.
    pub async fn query_one_coded(
        &mut self,
        config: &Config,
        sql: &str,
        timeout: Duration,
    ) -> Result<tokio_postgres::Row, ControlFailure> {
        let result = async {
            let client = self
                .client(config, timeout)
                .await
                .map_err(ControlFailure::from)?;
            client
                .query_one(sql, &[])
                .await
                .map_err(|e| ControlFailure {
                    sqlstate: e.as_db_error().map(|db| db.code().code().to_string()),
                    message: describe(&e),
                })
        };
        let outcome = tokio::time::timeout(timeout, result).await;
        self.settle(outcome, timeout)
    }

    /// One diagnosis: role, timeline, LSNs, replication state. Both queries go in one simple
    /// query message, so a diagnosis is one round trip: on a loaded machine every round trip
    /// can wait tens of milliseconds for the CPU, and a diagnosis that needs fewer is less
    /// likely to overrun `timeout` on a healthy node.
    pub async fn diagnose(
        &mut self,
        config: &Config,
        timeout: Duration,
    ) -> Result<Diagnosis, String> {
        let started = Instant::now();
        let work = async {
            let client = self.client(config, timeout).await?;
            let messages = client
                .simple_query(DIAGNOSIS_AND_REPLICATION_SQL)
                .await
                .map_err(|e| describe(&e))?;
            let mut d = parse_diagnosis(&messages)?;
            d.latency = started.elapsed();
            Ok(d)
        };
        let outcome = tokio::time::timeout(timeout, work).await;
        self.settle(outcome, timeout)
    }

    /// The result of a request bounded by `timeout`. After any failure the connection is
    /// dropped, so the next request opens a fresh one: a connection that timed out may be stuck
    /// behind a hung server.
    fn settle<T, E: From<String>>(
        &mut self,
        outcome: Result<Result<T, E>, tokio::time::error::Elapsed>,
        timeout: Duration,
    ) -> Result<T, E> {
        let r = outcome
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", timeout.as_millis()).into()));
        if r.is_err() {
            self.client = None;
        }
        r
    }
}

/// A control request that failed: the server's SQLSTATE when the server itself raised the
/// error, `None` when it did not answer (timeout, broken connection, no connection).
#[derive(Debug, Clone)]
pub struct ControlFailure {
    pub sqlstate: Option<String>,
    pub message: String,
}

impl From<String> for ControlFailure {
    fn from(message: String) -> Self {
        ControlFailure {
            sqlstate: None,
            message,
        }
    }
}

/// Splits SQL on the semicolons outside string literals.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in sql.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&sql[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// tokio-postgres errors: the server's message when there is one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_literals() {
        assert_eq!(
            split_statements("ALTER SYSTEM SET x = 'a;b'; SELECT 1;"),
            vec!["ALTER SYSTEM SET x = 'a;b'", "SELECT 1"]
        );
    }

    #[test]
    fn lsns_parse_and_format() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0000_0010), "1/10");
        assert_eq!(parse_lsn("zz"), None);
    }

    #[test]
    fn a_node_serializes_its_diagnosis_inline_without_latency() {
        let mut node = NodeStatus::unknown("n0", "127.0.0.1", 5432);
        node.record(Diagnosis {
            role: Role::Standby,
            latency: Duration::from_millis(2),
            ..Diagnosis::default()
        });
        let value = serde_json::to_value(&node).unwrap_or_default();
        let mut keys: Vec<&str> = value
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "consecutive_failures",
                "healthy",
                "host",
                "lag_seconds",
                "last_error",
                "last_msg_age_seconds",
                "latency_ms",
                "lsn",
                "name",
                "port",
                "quarantined",
                "read_only",
                "replay_lsn",
                "replay_paused",
                "replicas",
                "role",
                "synchronous_standby_names",
                "timeline",
                "upstream",
            ]
        );
        assert_eq!(value["role"], "standby");
        assert_eq!(value["latency_ms"], 2.0);
    }
}
