//! Every metric pgswitch exports, named in one place.
//!
//! Names carry the `pgswitch_` prefix and their unit (`_seconds`, `_bytes`, `_total` for
//! counters); labels are low-cardinality: `node` and `pool` (bounded by the config and the
//! databases clients use), and closed sets for `role`, `state`, `result`, `mode`, `phase`,
//! `kind`, `reason` and `direction`.
//!
//! Two kinds of metrics:
//! - Events (counters, histograms) are recorded by the data path and the control plane through
//!   the small typed functions below (`failover`, ...). The per-transaction latency histograms
//!   (query, transaction, pool wait) live in a [`PoolMetrics`] per pool: fixed buckets in
//!   atomics, recorded with no lookup, no allocation and no queue, and written out by
//!   [`render`] after the exporter's text.
//! - State (pool sizes, client counts, node up/role/lag, epoch, paused) is read from the `Proxy`
//!   and the `Topology` by [`refresh`] when `/metrics` is scraped, so the data path pays nothing
//!   for it.
//!
//! The Prometheus recorder is installed once per process by [`install`] (called by
//! `server::start`, and implicitly by every recording function, so nothing recorded is lost).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use ::metrics::{counter, gauge, histogram, Counter, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::warn;

use crate::cluster::{Role, Topology};
use crate::frontend::Proxy;

/// The kind of a metric, as Prometheus sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric: its name, kind, labels and meaning (the README table is this list).
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
    unit: Option<Unit>,
    buckets: Option<&'static [f64]>,
}

const fn def(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    unit: Option<Unit>,
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        labels,
        help,
        unit,
        buckets: None,
    }
}

const fn hist(
    name: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Histogram,
        labels,
        help,
        unit: Some(Unit::Seconds),
        buckets: Some(buckets),
    }
}

/// Latency of queries and transactions: 0.5 ms to a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Waiting for a pooled server: mostly zero, up to the pool timeout / failover hold.
const WAIT_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// One diagnosis round trip to a node (bounded by `diagnosis.timeout_ms`).
const DIAGNOSIS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Failover phases: tens of milliseconds (fence, publish) to minutes (waiting for replay).
const FAILOVER_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0,
];

// Names. Use these constants (or better, the functions below), never a string literal elsewhere.
pub const BUILD_INFO: &str = "pgswitch_build_info";
pub const CLIENT_CONNECTIONS: &str = "pgswitch_client_connections";
pub const MAX_CLIENT_CONNECTIONS: &str = "pgswitch_max_client_connections";
pub const CLIENT_CONNECTIONS_OPENED: &str = "pgswitch_client_connections_opened_total";
pub const CLIENT_CONNECTIONS_CLOSED: &str = "pgswitch_client_connections_closed_total";
pub const CLIENT_LOGIN_FAILURES: &str = "pgswitch_client_login_failures_total";
pub const SERVER_CONNECTIONS: &str = "pgswitch_server_connections";
pub const SERVER_CONNECTIONS_OPENED: &str = "pgswitch_server_connections_opened_total";
pub const SERVER_CONNECTIONS_CLOSED: &str = "pgswitch_server_connections_closed_total";
pub const SERVER_CONNECT_FAILURES: &str = "pgswitch_server_connect_failures_total";
pub const POOL_SIZE: &str = "pgswitch_pool_size";
pub const POOL_SERVER_CONNECTIONS: &str = "pgswitch_pool_server_connections";
pub const POOL_CLIENTS_WAITING: &str = "pgswitch_pool_clients_waiting";
pub const POOL_WAIT: &str = "pgswitch_pool_wait_seconds";
pub const POOL_ACQUIRE_FAILURES: &str = "pgswitch_pool_acquire_failures_total";
pub const QUERY_DURATION: &str = "pgswitch_query_duration_seconds";
pub const TRANSACTION_DURATION: &str = "pgswitch_transaction_duration_seconds";
pub const RELAYED_BYTES: &str = "pgswitch_relayed_bytes_total";
pub const SESSION_STATE_HAZARDS: &str = "pgswitch_session_state_hazards_total";
pub const CLIENT_IDLE_TIMEOUTS: &str = "pgswitch_client_idle_timeouts_total";
pub const PAUSED: &str = "pgswitch_paused";
pub const NODE_UP: &str = "pgswitch_node_up";
pub const NODE_ROLE: &str = "pgswitch_node_role";
pub const NODE_TIMELINE: &str = "pgswitch_node_timeline";
pub const NODE_LAG: &str = "pgswitch_node_replication_lag_bytes";
pub const NODE_REPLAY_LAG: &str = "pgswitch_node_replay_lag_bytes";
pub const NODE_DIAGNOSIS_LATENCY: &str = "pgswitch_node_diagnosis_latency_seconds";
pub const NODE_CONSECUTIVE_FAILURES: &str = "pgswitch_node_consecutive_failures";
pub const NODE_DIAGNOSES: &str = "pgswitch_node_diagnoses_total";
pub const NODE_DIAGNOSIS_DURATION: &str = "pgswitch_node_diagnosis_duration_seconds";
pub const NODE_QUARANTINED: &str = "pgswitch_node_quarantined";
pub const PRIMARY_AVAILABLE: &str = "pgswitch_primary_available";
pub const EPOCH: &str = "pgswitch_epoch";
pub const FAILOVERS: &str = "pgswitch_failovers_total";
pub const FAILOVER_PHASE_DURATION: &str = "pgswitch_failover_phase_duration_seconds";
pub const HOLD_ACTIVE: &str = "pgswitch_hold_active";
pub const CLIENTS_HELD: &str = "pgswitch_clients_held";
pub const TRANSACTIONS_ABORTED_BY_FAILOVER: &str =
    "pgswitch_transactions_aborted_by_failover_total";
pub const CONFIG_RELOADS: &str = "pgswitch_config_reloads_total";

/// Every metric pgswitch exports.
pub const CATALOG: &[MetricDef] = &[
    def(BUILD_INFO, Kind::Gauge, &["version"], None, "Always 1; the version label tells which pgswitch runs."),
    def(CLIENT_CONNECTIONS, Kind::Gauge, &["state"], Some(Unit::Count), "Client connections now, by state: active (holding a server connection), waiting (for a server connection: a free slot, one being opened, or a primary), idle (the rest, including clients still logging in)."),
    def(MAX_CLIENT_CONNECTIONS, Kind::Gauge, &[], Some(Unit::Count), "The max_client_connections setting: clients beyond it are refused with 53300."),
    def(CLIENT_CONNECTIONS_OPENED, Kind::Counter, &[], Some(Unit::Count), "Clients that logged in."),
    def(CLIENT_CONNECTIONS_CLOSED, Kind::Counter, &[], Some(Unit::Count), "Logged-in clients that disconnected."),
    def(CLIENT_LOGIN_FAILURES, Kind::Counter, &["reason"], Some(Unit::Count), "Client connections refused before or during login, by reason: auth, too_many_clients, protocol, tls, timeout."),
    def(SERVER_CONNECTIONS, Kind::Gauge, &["state"], Some(Unit::Count), "Server connections in all pools now, by state: active (lent to a client), idle."),
    def(SERVER_CONNECTIONS_OPENED, Kind::Counter, &["node"], Some(Unit::Count), "Server connections opened, by node."),
    def(SERVER_CONNECTIONS_CLOSED, Kind::Counter, &["node"], Some(Unit::Count), "Server connections closed, by node."),
    def(SERVER_CONNECT_FAILURES, Kind::Counter, &["node"], Some(Unit::Count), "Attempts to open a server connection that failed, by node."),
    def(POOL_SIZE, Kind::Gauge, &["pool"], Some(Unit::Count), "Most server connections a pool (user/database) may hold."),
    def(POOL_SERVER_CONNECTIONS, Kind::Gauge, &["pool", "state"], Some(Unit::Count), "Server connections of a pool now, by state: active, idle."),
    def(POOL_CLIENTS_WAITING, Kind::Gauge, &["pool"], Some(Unit::Count), "Clients waiting for a server connection of this pool now (a free slot, one being opened, or a primary)."),
    hist(POOL_WAIT, &["pool"], WAIT_BUCKETS, "Time a client waited for a server connection (including a failover hold)."),
    def(POOL_ACQUIRE_FAILURES, Kind::Counter, &["pool", "reason"], Some(Unit::Count), "Clients that got no server connection, by reason: timeout, no_primary, server_error."),
    hist(QUERY_DURATION, &["pool"], LATENCY_BUCKETS, "Query latency seen by the proxy, from the client's query to the server's ReadyForQuery."),
    hist(TRANSACTION_DURATION, &["pool"], LATENCY_BUCKETS, "Transaction latency, from its first query to the ReadyForQuery that ends it."),
    def(RELAYED_BYTES, Kind::Counter, &["direction"], Some(Unit::Bytes), "Bytes relayed between clients and servers, by direction: client_to_server, server_to_client."),
    def(SESSION_STATE_HAZARDS, Kind::Counter, &["kind"], Some(Unit::Count), "Session state used in transaction pooling mode that does not survive a server change, by kind: prepare, listen, advisory_lock, temp_table, set."),
    def(CLIENT_IDLE_TIMEOUTS, Kind::Counter, &["kind"], Some(Unit::Count), "Clients closed for sitting idle, by kind: transaction (idle_transaction_timeout_ms), session (client_idle_timeout_ms)."),
    def(PAUSED, Kind::Gauge, &[], None, "1 while paused by the admin API (POST /pause), else 0."),
    def(NODE_UP, Kind::Gauge, &["node"], None, "1 if the last diagnosis of the node succeeded, else 0."),
    def(NODE_ROLE, Kind::Gauge, &["node", "role"], None, "1 for the node's role as last diagnosed (primary, standby, unknown), 0 for the other roles."),
    def(NODE_TIMELINE, Kind::Gauge, &["node"], None, "The node's timeline as last diagnosed."),
    def(NODE_LAG, Kind::Gauge, &["node"], Some(Unit::Bytes), "WAL the node has not received yet: primary's current LSN minus the node's received LSN (0 on the primary)."),
    def(NODE_REPLAY_LAG, Kind::Gauge, &["node"], Some(Unit::Bytes), "WAL the node has not replayed yet: primary's current LSN minus the node's replay LSN (0 on the primary)."),
    def(NODE_DIAGNOSIS_LATENCY, Kind::Gauge, &["node"], Some(Unit::Seconds), "Round trip of the node's last successful diagnosis."),
    def(NODE_CONSECUTIVE_FAILURES, Kind::Gauge, &["node"], Some(Unit::Count), "Diagnoses of the node that failed in a row."),
    def(NODE_DIAGNOSES, Kind::Counter, &["node", "result"], Some(Unit::Count), "Diagnoses run, by node and result: ok, failed."),
    hist(NODE_DIAGNOSIS_DURATION, &["node"], DIAGNOSIS_BUCKETS, "Time one diagnosis of a node took (successful or not)."),
    def(NODE_QUARANTINED, Kind::Gauge, &["node"], None, "1 while the node is a former primary kept out of service (fenced, never routed to) until it streams from the current primary, else 0."),
    def(PRIMARY_AVAILABLE, Kind::Gauge, &[], None, "1 when a primary is known (a node answered diagnosis as primary), else 0; see /ready for whether writes are routed now."),
    def(EPOCH, Kind::Gauge, &[], None, "Current cluster epoch: raised by one at every change of primary."),
    def(FAILOVERS, Kind::Counter, &["mode", "result"], Some(Unit::Count), "Failovers and switchovers, by mode (automatic, switchover) and result (success, failed, refused)."),
    hist(FAILOVER_PHASE_DURATION, &["phase"], FAILOVER_BUCKETS, "Duration of each failover phase: detect, fence, elect, promote, publish, repoint, first_write, and total."),
    def(HOLD_ACTIVE, Kind::Gauge, &[], None, "1 while new transactions are held waiting for a primary (failover or switchover), else 0."),
    def(CLIENTS_HELD, Kind::Gauge, &[], Some(Unit::Count), "Clients waiting for a new primary now."),
    def(TRANSACTIONS_ABORTED_BY_FAILOVER, Kind::Counter, &["result"], Some(Unit::Count), "In-flight transactions cut by a failover, by result: rolled_back (08006), unknown (08007: COMMIT was in flight)."),
    def(CONFIG_RELOADS, Kind::Counter, &["result"], Some(Unit::Count), "Configuration reloads (SIGHUP), by result: ok, rejected."),
];

// ---------------------------------------------------------------------------------------------
// Closed label sets.

/// Which way relayed bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::ClientToServer, Direction::ServerToClient];
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToServer => "client_to_server",
            Direction::ServerToClient => "server_to_client",
        }
    }
}

/// Why a client was refused before or during login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    Auth,
    TooManyClients,
    Protocol,
    Tls,
    Timeout,
}

impl LoginFailure {
    pub const ALL: [LoginFailure; 5] = [
        LoginFailure::Auth,
        LoginFailure::TooManyClients,
        LoginFailure::Protocol,
        LoginFailure::Tls,
        LoginFailure::Timeout,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            LoginFailure::Auth => "auth",
            LoginFailure::TooManyClients => "too_many_clients",
            LoginFailure::Protocol => "protocol",
            LoginFailure::Tls => "tls",
            LoginFailure::Timeout => "timeout",
        }
    }
}

/// Why a client got no server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireFailure {
    Timeout,
    NoPrimary,
    ServerError,
}

impl AcquireFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AcquireFailure::Timeout => "timeout",
            AcquireFailure::NoPrimary => "no_primary",
            AcquireFailure::ServerError => "server_error",
        }
    }
}

/// Session state that transaction pooling cannot carry from one server to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hazard {
    Prepare,
    Listen,
    AdvisoryLock,
    TempTable,
    Set,
}

impl Hazard {
    pub const ALL: [Hazard; 5] = [
        Hazard::Prepare,
        Hazard::Listen,
        Hazard::AdvisoryLock,
        Hazard::TempTable,
        Hazard::Set,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Hazard::Prepare => "prepare",
            Hazard::Listen => "listen",
            Hazard::AdvisoryLock => "advisory_lock",
            Hazard::TempTable => "temp_table",
            Hazard::Set => "set",
        }
    }
}

/// Why a client was closed for sitting idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleTimeout {
    /// Inside a transaction: `idle_transaction_timeout_ms`.
    Transaction,
    /// Outside one: `client_idle_timeout_ms`.
    Session,
}

impl IdleTimeout {
    pub const ALL: [IdleTimeout; 2] = [IdleTimeout::Transaction, IdleTimeout::Session];
    pub fn as_str(self) -> &'static str {
        match self {
            IdleTimeout::Transaction => "transaction",
            IdleTimeout::Session => "session",
        }
    }
}

/// What started a change of primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverMode {
    /// The primary stopped serving.
    Automatic,
    /// Asked for through `POST /switchover` / `pgswitch switchover`.
    Switchover,
}

impl FailoverMode {
    pub const ALL: [FailoverMode; 2] = [FailoverMode::Automatic, FailoverMode::Switchover];
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverMode::Automatic => "automatic",
            FailoverMode::Switchover => "switchover",
        }
    }
}

/// How a failover or switchover ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverResult {
    /// A new primary was published.
    Success,
    /// It was tried and did not work; the cluster was left as it was.
    Failed,
    /// It was not tried: no safe candidate (lag, `require_sync`), or another proxy runs it.
    Refused,
}

impl FailoverResult {
    pub const ALL: [FailoverResult; 3] = [
        FailoverResult::Success,
        FailoverResult::Failed,
        FailoverResult::Refused,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverResult::Success => "success",
            FailoverResult::Failed => "failed",
            FailoverResult::Refused => "refused",
        }
    }
}

/// The steps of a failover (see DESIGN.md, "Failover, step by step").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverPhase {
    /// First failed diagnosis of the primary until the decision to fail over.
    Detect,
    /// Holding clients and dropping server connections to the old primary (and the epoch barrier).
    Fence,
    /// Freezing the standbys and choosing the candidate.
    Elect,
    /// Replay catch-up, `pg_promote`, confirmation, checkpoint.
    Promote,
    /// Writing the new epoch (state file / etcd).
    Publish,
    /// Re-pointing the other standbys.
    Repoint,
    /// Publication until the first transaction completed on the new primary (through this
    /// pgswitch; a held client's write, usually).
    FirstWrite,
    /// Detection until clients are released to the new primary.
    Total,
}

impl FailoverPhase {
    pub const ALL: [FailoverPhase; 8] = [
        FailoverPhase::Detect,
        FailoverPhase::Fence,
        FailoverPhase::Elect,
        FailoverPhase::Promote,
        FailoverPhase::Publish,
        FailoverPhase::Repoint,
        FailoverPhase::FirstWrite,
        FailoverPhase::Total,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverPhase::Detect => "detect",
            FailoverPhase::Fence => "fence",
            FailoverPhase::Elect => "elect",
            FailoverPhase::Promote => "promote",
            FailoverPhase::Publish => "publish",
            FailoverPhase::Repoint => "repoint",
            FailoverPhase::FirstWrite => "first_write",
            FailoverPhase::Total => "total",
        }
    }
}

/// What a client whose transaction a failover cut was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortOutcome {
    /// `08006`: the transaction was rolled back.
    RolledBack,
    /// `08007`: its COMMIT was in flight; whether it committed is unknown.
    Unknown,
}

impl AbortOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AbortOutcome::RolledBack => "rolled_back",
            AbortOutcome::Unknown => "unknown",
        }
    }
}

fn role_str(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Standby => "standby",
        Role::Unknown => "unknown",
    }
}

const ROLES: [Role; 3] = [Role::Primary, Role::Standby, Role::Unknown];

// ---------------------------------------------------------------------------------------------
// The recorder.

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global `metrics` recorder, once; later
/// calls return the same handle. Describes every metric and creates the counters with a closed
/// label set at zero, so alert rules see them before the first event.
pub fn install() -> PrometheusHandle {
    HANDLE.get_or_init(build_and_install).clone()
}

fn build_and_install() -> PrometheusHandle {
    let builder = match with_buckets(PrometheusBuilder::new()) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "histogram buckets rejected; histograms are exported as summaries");
            PrometheusBuilder::new()
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if let Err(e) = ::metrics::set_global_recorder(recorder) {
        // Another recorder was installed first (by an embedding program): /metrics then shows
        // nothing recorded, which is visible, rather than failing the proxy.
        warn!(error = %e, "another metrics recorder is installed; /metrics stays empty");
        return handle;
    }
    describe_all();
    seed();
    handle
}

fn with_buckets(
    mut builder: PrometheusBuilder,
) -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    for m in CATALOG {
        if let Some(buckets) = m.buckets {
            builder = builder.set_buckets_for_metric(Matcher::Full(m.name.to_string()), buckets)?;
        }
    }
    Ok(builder)
}

fn describe_all() {
    for m in CATALOG {
        match (m.kind, m.unit) {
            (Kind::Counter, Some(unit)) => ::metrics::describe_counter!(m.name, unit, m.help),
            (Kind::Counter, None) => ::metrics::describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(unit)) => ::metrics::describe_gauge!(m.name, unit, m.help),
            (Kind::Gauge, None) => ::metrics::describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(unit)) => ::metrics::describe_histogram!(m.name, unit, m.help),
            (Kind::Histogram, None) => ::metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// Series that exist from the start: alert rules and `increase()` need a zero to compare with.
fn seed() {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    counter!(CLIENT_CONNECTIONS_OPENED).absolute(0);
    counter!(CLIENT_CONNECTIONS_CLOSED).absolute(0);
    for reason in LoginFailure::ALL {
        counter!(CLIENT_LOGIN_FAILURES, "reason" => reason.as_str()).increment(0);
    }
    for kind in Hazard::ALL {
        counter!(SESSION_STATE_HAZARDS, "kind" => kind.as_str()).increment(0);
    }
    for kind in IdleTimeout::ALL {
        counter!(CLIENT_IDLE_TIMEOUTS, "kind" => kind.as_str()).increment(0);
    }
    for mode in FailoverMode::ALL {
        for result in FailoverResult::ALL {
            counter!(FAILOVERS, "mode" => mode.as_str(), "result" => result.as_str()).increment(0);
        }
    }
    for result in [AbortOutcome::RolledBack, AbortOutcome::Unknown] {
        counter!(TRANSACTIONS_ABORTED_BY_FAILOVER, "result" => result.as_str()).increment(0);
    }
    for result in ["ok", "rejected"] {
        counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
    gauge!(HOLD_ACTIVE).set(0.0);
    gauge!(CLIENTS_HELD).set(0.0);
}

/// One scrape: the state gauges set from `proxy` and `topology`, then the text. The metrics
/// live in one registry per process, so two proxies in one process (the tests run many) take
/// turns: each scrape shows its own proxy's state, never another's set in between.
pub fn scrape(proxy: &Proxy, topology: &Topology) -> String {
    static SCRAPE: Mutex<()> = Mutex::new(());
    let _turn = SCRAPE.lock().unwrap_or_else(|p| p.into_inner());
    refresh(proxy, topology);
    render()
}

/// The current metrics in the Prometheus text format. Also drains recorded histogram samples.
pub fn render() -> String {
    let mut text = install().render();
    render_relayed_bytes(&mut text);
    render_pool_histograms(&mut text);
    text
}

/// The value of the series `series` (name and labels exactly as rendered, labels in order) in
/// a rendered scrape such as [`render`]'s: for tests and scripts that read `/metrics`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Folds histogram samples into their buckets; run it periodically so memory stays bounded
/// when nobody scrapes (the admin server does, every few seconds).
pub fn run_upkeep() {
    install().run_upkeep();
}

/// Cached handles of the hottest label-free series.
struct Hot {
    client_opened: Counter,
    client_closed: Counter,
}

fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| {
        install();
        Hot {
            client_opened: counter!(CLIENT_CONNECTIONS_OPENED),
            client_closed: counter!(CLIENT_CONNECTIONS_CLOSED),
        }
    })
}

/// Makes sure events recorded before `server::start` (tests, tools) are not lost.
fn ready() {
    HANDLE.get_or_init(build_and_install);
}

// ---------------------------------------------------------------------------------------------
// Per-pool handles for the data path.

/// One pool's latency histograms. Recorded on every transaction, so they are kept here in
/// atomics with fixed buckets (a bucket search and three relaxed additions per sample) rather
/// than in the exporter, whose histograms queue every sample until the next scrape; `render`
/// writes them next to the exporter's text.
#[derive(Clone)]
pub struct PoolMetrics {
    histograms: Arc<PoolHistograms>,
}

struct PoolHistograms {
    query: AtomicHistogram,
    transaction: AtomicHistogram,
    wait: AtomicHistogram,
}

/// Every pool's histograms, by pool name (pools are never removed).
static POOL_HISTOGRAMS: Mutex<BTreeMap<String, Arc<PoolHistograms>>> = Mutex::new(BTreeMap::new());

fn pool_histograms() -> MutexGuard<'static, BTreeMap<String, Arc<PoolHistograms>>> {
    POOL_HISTOGRAMS.lock().unwrap_or_else(|p| p.into_inner())
}

impl PoolMetrics {
    /// `pool` is the pool's `user/database`; the same name gives the same series.
    pub fn new(pool: &str) -> PoolMetrics {
        let histograms = pool_histograms()
            .entry(pool.to_string())
            .or_insert_with(|| {
                Arc::new(PoolHistograms {
                    query: AtomicHistogram::new(LATENCY_BUCKETS),
                    transaction: AtomicHistogram::new(LATENCY_BUCKETS),
                    wait: AtomicHistogram::new(WAIT_BUCKETS),
                })
            })
            .clone();
        PoolMetrics { histograms }
    }

    /// A query finished (ReadyForQuery after it).
    pub fn query_finished(&self, seconds: f64) {
        self.histograms.query.record(seconds);
    }

    /// A transaction finished (committed, rolled back, or an implicit single-statement one).
    pub fn transaction_finished(&self, seconds: f64) {
        self.histograms.transaction.record(seconds);
    }

    /// A client got a server connection after waiting `seconds`.
    pub fn pool_wait(&self, seconds: f64) {
        self.histograms.wait.record(seconds);
    }
}

/// A Prometheus histogram with fixed buckets.
struct AtomicHistogram {
    bounds: &'static [f64],
    /// Samples per bucket (not cumulative); the last one is `+Inf`. Their total is the count.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn new(bounds: &'static [f64]) -> AtomicHistogram {
        AtomicHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn record(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        let bucket = self.bounds.partition_point(|&le| le < seconds);
        if let Some(b) = self.buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        // A client that took a server without waiting adds nothing to the sum.
        let nanos = (seconds * 1e9) as u64;
        if nanos > 0 {
            self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    /// The series of one labelled histogram, in the text format.
    fn render(&self, name: &str, pool: &str, out: &mut String) {
        use std::fmt::Write as _;
        let pool = escape_label(pool);
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |v| v.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{pool=\"{pool}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{pool=\"{pool}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{pool=\"{pool}\"}} {cumulative}");
    }
}

/// A label value as the text format wants it.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `# HELP` and `# TYPE` lines of a family pgswitch writes itself, from its catalog entry.
fn family_header(name: &str, out: &mut String) {
    use std::fmt::Write as _;
    if let Some(m) = CATALOG.iter().find(|m| m.name == name) {
        let _ = writeln!(
            out,
            "# HELP {name} {}\n# TYPE {name} {}",
            m.help,
            m.kind.as_str()
        );
    }
}

/// Appends the pools' latency histograms (the exporter never sees them).
fn render_pool_histograms(out: &mut String) {
    let pools: Vec<(String, Arc<PoolHistograms>)> = pool_histograms()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if pools.is_empty() {
        return;
    }
    type Pick = fn(&PoolHistograms) -> &AtomicHistogram;
    let families: [(&str, Pick); 3] = [
        (POOL_WAIT, |h| &h.wait),
        (QUERY_DURATION, |h| &h.query),
        (TRANSACTION_DURATION, |h| &h.transaction),
    ];
    for (name, pick) in families {
        family_header(name, out);
        for (pool, h) in &pools {
            pick(h).render(name, pool, out);
        }
        out.push('\n');
    }
}

// ---------------------------------------------------------------------------------------------
// Events: clients, pools, servers.

/// A client logged in.
pub fn client_connected() {
    hot().client_opened.increment(1);
}

/// A logged-in client disconnected.
pub fn client_disconnected() {
    hot().client_closed.increment(1);
}

/// A client was refused before or during login.
pub fn client_login_failed(reason: LoginFailure) {
    ready();
    counter!(CLIENT_LOGIN_FAILURES, "reason" => reason.as_str()).increment(1);
}

/// A client got no server connection.
pub fn pool_acquire_failed(pool: &str, reason: AcquireFailure) {
    ready();
    counter!(POOL_ACQUIRE_FAILURES, "pool" => pool.to_string(), "reason" => reason.as_str())
        .increment(1);
}

/// `n` bytes were relayed in `direction`.
pub fn bytes_relayed(direction: Direction, n: u64) {
    RELAYED[direction as usize].fetch_add(n, Ordering::Relaxed);
}

/// Bytes relayed by direction (`Direction as usize`): two plain atomics on the path of every
/// read, rendered by `render` like the pool histograms.
static RELAYED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

fn render_relayed_bytes(out: &mut String) {
    use std::fmt::Write as _;
    family_header(RELAYED_BYTES, out);
    for direction in Direction::ALL {
        let n = RELAYED[direction as usize].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{RELAYED_BYTES}{{direction=\"{}\"}} {n}",
            direction.as_str()
        );
    }
    out.push('\n');
}

pub fn server_connection_opened(node: &str) {
    ready();
    counter!(SERVER_CONNECTIONS_OPENED, "node" => node.to_string()).increment(1);
}

pub fn server_connection_closed(node: &str) {
    ready();
    counter!(SERVER_CONNECTIONS_CLOSED, "node" => node.to_string()).increment(1);
}

pub fn server_connect_failed(node: &str) {
    ready();
    counter!(SERVER_CONNECT_FAILURES, "node" => node.to_string()).increment(1);
}

/// A client used session state that transaction pooling cannot keep.
pub fn session_state_hazard(kind: Hazard) {
    ready();
    counter!(SESSION_STATE_HAZARDS, "kind" => kind.as_str()).increment(1);
}

/// A client was closed for sitting idle.
pub fn client_idle_timeout(kind: IdleTimeout) {
    ready();
    counter!(CLIENT_IDLE_TIMEOUTS, "kind" => kind.as_str()).increment(1);
}

/// A configuration reload was applied (`ok = true`) or rejected.
pub fn config_reloaded(ok: bool) {
    ready();
    counter!(CONFIG_RELOADS, "result" => if ok { "ok" } else { "rejected" }).increment(1);
}

// ---------------------------------------------------------------------------------------------
// Events: control plane.

/// One diagnosis of `node` finished. `lag_bytes` is the received-WAL lag behind the primary
/// when known; `latency_seconds` how long the diagnosis took.
pub fn node_diagnosed(
    node: &str,
    up: bool,
    role: Role,
    lag_bytes: Option<u64>,
    latency_seconds: f64,
) {
    ready();
    let result = if up { "ok" } else { "failed" };
    counter!(NODE_DIAGNOSES, "node" => node.to_string(), "result" => result).increment(1);
    histogram!(NODE_DIAGNOSIS_DURATION, "node" => node.to_string()).record(latency_seconds);
    gauge!(NODE_UP, "node" => node.to_string()).set(if up { 1.0 } else { 0.0 });
    set_role(node, role);
    if let Some(lag) = lag_bytes {
        gauge!(NODE_LAG, "node" => node.to_string()).set(lag as f64);
    }
    if up {
        gauge!(NODE_DIAGNOSIS_LATENCY, "node" => node.to_string()).set(latency_seconds);
    }
}

fn set_role(node: &str, role: Role) {
    for r in ROLES {
        let value = if r == role { 1.0 } else { 0.0 };
        gauge!(NODE_ROLE, "node" => node.to_string(), "role" => role_str(r)).set(value);
    }
}

/// The current epoch changed.
pub fn epoch(e: u64) {
    ready();
    gauge!(EPOCH).set(e as f64);
}

/// A failover or switchover ended.
pub fn failover(mode: FailoverMode, result: FailoverResult) {
    ready();
    counter!(FAILOVERS, "mode" => mode.as_str(), "result" => result.as_str()).increment(1);
}

/// A failover phase took `seconds`.
pub fn failover_phase(phase: FailoverPhase, seconds: f64) {
    ready();
    histogram!(FAILOVER_PHASE_DURATION, "phase" => phase.as_str()).record(seconds);
}

/// When the last new primary was published ([`crate::clock::now_micros`]), until the first
/// transaction after it completes; 0 otherwise.
static FIRST_WRITE_AWAITED: AtomicU64 = AtomicU64::new(0);

/// A new primary was published: the next transaction that completes ends the `first_write`
/// phase.
pub fn await_first_write() {
    FIRST_WRITE_AWAITED.store(crate::clock::now_micros().max(1), Ordering::Relaxed);
}

/// A transaction completed at `now` (the data path: one relaxed load unless a new primary
/// awaits its first one).
#[inline]
pub fn transaction_completed(now: u64) {
    if FIRST_WRITE_AWAITED.load(Ordering::Relaxed) != 0 {
        first_write_done(now);
    }
}

#[cold]
fn first_write_done(now: u64) {
    let since = FIRST_WRITE_AWAITED.swap(0, Ordering::Relaxed);
    if since != 0 {
        failover_phase(
            FailoverPhase::FirstWrite,
            crate::clock::seconds_between(since, now),
        );
    }
}

/// A hold (new transactions wait for a primary) started or ended.
pub fn hold_active(active: bool) {
    ready();
    gauge!(HOLD_ACTIVE).set(if active { 1.0 } else { 0.0 });
}

/// Counts one in a gauge's source for as long as it lives, however the wait it stands for
/// ends: also when the future that holds it is dropped mid-wait (a client that gives up).
pub struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    pub fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An in-flight transaction was cut by a failover.
pub fn transactions_aborted_by_failover(outcome: AbortOutcome) {
    ready();
    counter!(TRANSACTIONS_ABORTED_BY_FAILOVER, "result" => outcome.as_str()).increment(1);
}

// ---------------------------------------------------------------------------------------------
// State, read at scrape time.

pub use crate::cluster::parse_lsn;

/// Received and replayed lag of node `index` behind the primary, in bytes, when both are known.
pub fn node_lag(topology: &Topology, index: usize) -> (Option<u64>, Option<u64>) {
    let Some(node) = topology.nodes.get(index) else {
        return (None, None);
    };
    if topology.primary == Some(index) {
        return (Some(0), Some(0));
    }
    let primary_lsn = topology
        .primary
        .and_then(|p| topology.nodes.get(p))
        .and_then(|p| p.lsn_value());
    let behind = |lsn: Option<u64>| Some(primary_lsn?.saturating_sub(lsn?));
    if !node.healthy {
        return (None, None);
    }
    (behind(node.wal_position()), behind(node.replay_lsn_value()))
}

/// Sets the state gauges from the proxy and the topology; only through `scrape`, which takes
/// the turn.
fn refresh(proxy: &Proxy, topology: &Topology) {
    ready();
    let (mut active, mut waiting, mut idle_servers) = (0usize, 0usize, 0usize);
    for pool in proxy.pools.all() {
        let s = pool.status();
        let key = format!("{}/{}", s.user, s.database);
        gauge!(POOL_SIZE, "pool" => key.clone()).set(s.size as f64);
        gauge!(POOL_CLIENTS_WAITING, "pool" => key.clone()).set(s.clients_waiting as f64);
        gauge!(POOL_SERVER_CONNECTIONS, "pool" => key.clone(), "state" => "active")
            .set(s.servers_active as f64);
        gauge!(POOL_SERVER_CONNECTIONS, "pool" => key, "state" => "idle")
            .set(s.servers_idle as f64);
        active += s.servers_active;
        waiting += s.clients_waiting;
        idle_servers += s.servers_idle;
    }
    let clients = proxy.client_count();
    gauge!(CLIENT_CONNECTIONS, "state" => "active").set(active as f64);
    gauge!(CLIENT_CONNECTIONS, "state" => "waiting").set(waiting as f64);
    gauge!(CLIENT_CONNECTIONS, "state" => "idle")
        .set(clients.saturating_sub(active + waiting) as f64);
    gauge!(MAX_CLIENT_CONNECTIONS).set(proxy.config().max_client_connections as f64);
    gauge!(SERVER_CONNECTIONS, "state" => "active").set(active as f64);
    gauge!(SERVER_CONNECTIONS, "state" => "idle").set(idle_servers as f64);
    gauge!(PAUSED).set(if proxy.is_paused() { 1.0 } else { 0.0 });
    gauge!(CLIENTS_HELD).set(proxy.cluster.clients_held() as f64);

    gauge!(EPOCH).set(topology.epoch as f64);
    gauge!(PRIMARY_AVAILABLE).set(if topology.primary.is_some() { 1.0 } else { 0.0 });
    for (i, node) in topology.nodes.iter().enumerate() {
        let name = node.name.as_str();
        gauge!(NODE_UP, "node" => name.to_string()).set(if node.healthy { 1.0 } else { 0.0 });
        set_role(
            name,
            if node.healthy {
                node.diagnosis.role
            } else {
                Role::Unknown
            },
        );
        if let Some(tl) = node.diagnosis.timeline {
            gauge!(NODE_TIMELINE, "node" => name.to_string()).set(f64::from(tl));
        }
        gauge!(NODE_CONSECUTIVE_FAILURES, "node" => name.to_string())
            .set(f64::from(node.consecutive_failures));
        gauge!(NODE_QUARANTINED, "node" => name.to_string()).set(if node.quarantined {
            1.0
        } else {
            0.0
        });
        if let Some(ms) = node.latency_ms {
            gauge!(NODE_DIAGNOSIS_LATENCY, "node" => name.to_string()).set(ms / 1000.0);
        }
        let (lag, replay_lag) = node_lag(topology, i);
        if let Some(lag) = lag {
            gauge!(NODE_LAG, "node" => name.to_string()).set(lag as f64);
        }
        if let Some(lag) = replay_lag {
            gauge!(NODE_REPLAY_LAG, "node" => name.to_string()).set(lag as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Diagnosis, NodeStatus};

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for m in CATALOG {
            assert!(seen.insert(m.name), "{} defined twice", m.name);
            assert!(m.name.starts_with("pgswitch_"), "{}", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
            if m.kind == Kind::Histogram {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
                let buckets = m.buckets.unwrap_or_default();
                assert!(
                    buckets.windows(2).all(|w| w[0] < w[1]),
                    "{} buckets unsorted",
                    m.name
                );
            }
            if m.unit == Some(Unit::Bytes) {
                assert!(m.name.contains("_bytes"), "{}", m.name);
            }
            if m.unit == Some(Unit::Seconds) {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
            }
            for label in m.labels {
                assert!(
                    [
                        "node",
                        "pool",
                        "role",
                        "state",
                        "result",
                        "mode",
                        "phase",
                        "kind",
                        "reason",
                        "direction",
                        "version"
                    ]
                    .contains(label),
                    "{}: label {label} is not in the low-cardinality set",
                    m.name
                );
            }
            assert!(!m.help.is_empty());
        }
    }

    #[test]
    fn lsns_parse() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("1/"), None);
        assert_eq!(parse_lsn("1FFFFFFFF/0"), None);
    }

    fn node(
        name: &str,
        role: Role,
        healthy: bool,
        lsn: Option<&str>,
        replay: Option<&str>,
    ) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            diagnosis: Diagnosis {
                role,
                timeline: Some(1),
                lsn: lsn.map(Into::into),
                replay_lsn: replay.map(Into::into),
                ..Diagnosis::default()
            },
            healthy,
            latency_ms: Some(1.5),
            consecutive_failures: 0,
            last_error: None,
            ..NodeStatus::unknown(name, "127.0.0.1", 5432)
        }
    }

    #[test]
    fn lag_is_measured_against_the_primary() {
        let topology = Topology {
            epoch: 3,
            primary: Some(0),
            holding: false,
            reason: None,
            nodes: vec![
                node(
                    "n0",
                    Role::Primary,
                    true,
                    Some("0/3000100"),
                    Some("0/3000100"),
                ),
                node(
                    "n1",
                    Role::Standby,
                    true,
                    Some("0/3000000"),
                    Some("0/2000000"),
                ),
                node("n2", Role::Standby, false, Some("0/1000000"), None),
                // Restarted with nothing new to stream: it reports the start of its segment
                // as received, behind what it replayed.
                node(
                    "n3",
                    Role::Standby,
                    true,
                    Some("0/3000000"),
                    Some("0/3000100"),
                ),
            ],
        };
        assert_eq!(node_lag(&topology, 0), (Some(0), Some(0)));
        assert_eq!(node_lag(&topology, 1), (Some(0x100), Some(0x1000100)));
        assert_eq!(node_lag(&topology, 2), (None, None));
        assert_eq!(node_lag(&topology, 3), (Some(0), Some(0)));
        assert_eq!(topology.nodes[3].wal_position(), Some(0x3000100));
        assert_eq!(topology.nodes[1].wal_position(), Some(0x3000000));
        assert_eq!(node_lag(&topology, 9), (None, None));
        let no_primary = Topology {
            primary: None,
            ..topology
        };
        assert_eq!(node_lag(&no_primary, 1), (None, None));
    }

    #[test]
    fn recording_functions_show_up_in_the_rendered_text() {
        install();
        let _ = install(); // twice is fine
        let pool = "unit_user/unit_db";
        let before = render();
        let opened = sample(&before, CLIENT_CONNECTIONS_OPENED).unwrap_or(0.0);
        client_connected();
        client_disconnected();
        client_login_failed(LoginFailure::Auth);
        let first = PoolMetrics::new(pool);
        first.query_finished(0.002);
        first.transaction_finished(0.004);
        first.pool_wait(0.0001);
        pool_acquire_failed(pool, AcquireFailure::Timeout);
        let pm = PoolMetrics::new(pool);
        pm.query_finished(0.003);
        pm.transaction_finished(0.005);
        pm.pool_wait(0.0);
        bytes_relayed(Direction::ClientToServer, 100);
        bytes_relayed(Direction::ServerToClient, 250);
        server_connection_opened("unit_node");
        server_connection_closed("unit_node");
        server_connect_failed("unit_node");
        session_state_hazard(Hazard::AdvisoryLock);
        node_diagnosed("unit_node", true, Role::Standby, Some(4096), 0.002);
        epoch(7);
        failover(FailoverMode::Automatic, FailoverResult::Success);
        failover_phase(FailoverPhase::Promote, 1.25);
        hold_active(true);
        transactions_aborted_by_failover(AbortOutcome::Unknown);
        config_reloaded(false);
        run_upkeep();
        let text = render();

        assert!(sample(&text, CLIENT_CONNECTIONS_OPENED).unwrap_or(0.0) >= opened + 1.0);
        assert!(
            text.contains(&format!("# TYPE {QUERY_DURATION} histogram")),
            "{text}"
        );
        assert!(
            text.contains(&format!("# HELP {QUERY_DURATION} ")),
            "{text}"
        );
        assert!(
            sample(&text, &format!("{QUERY_DURATION}_count{{pool=\"{pool}\"}}")).unwrap_or(0.0)
                >= 2.0,
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{QUERY_DURATION}_bucket{{pool=\"{pool}\",le=\"0.005\"}}"
            )),
            "{text}"
        );
        assert!(
            sample(
                &text,
                &format!("{TRANSACTION_DURATION}_count{{pool=\"{pool}\"}}")
            )
            .unwrap_or(0.0)
                >= 2.0
        );
        assert!(
            sample(&text, &format!("{POOL_WAIT}_count{{pool=\"{pool}\"}}")).unwrap_or(0.0) >= 2.0
        );
        assert!(
            sample(
                &text,
                &format!("{RELAYED_BYTES}{{direction=\"server_to_client\"}}")
            )
            .unwrap_or(0.0)
                >= 250.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("{SERVER_CONNECTIONS_OPENED}{{node=\"unit_node\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("{SESSION_STATE_HAZARDS}{{kind=\"advisory_lock\"}}")
            )
            .map(|v| v >= 1.0),
            Some(true)
        );
        assert!(sample(
            &text,
            &format!("{SESSION_STATE_HAZARDS}{{kind=\"listen\"}}")
        )
        .is_some());
        assert_eq!(
            sample(&text, &format!("{NODE_UP}{{node=\"unit_node\"}}")),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("{NODE_ROLE}{{node=\"unit_node\",role=\"standby\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("{NODE_ROLE}{{node=\"unit_node\",role=\"primary\"}}")
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, &format!("{NODE_LAG}{{node=\"unit_node\"}}")),
            Some(4096.0)
        );
        assert!(
            sample(
                &text,
                &format!("{FAILOVERS}{{mode=\"automatic\",result=\"success\"}}")
            )
            .unwrap_or(0.0)
                >= 1.0
        );
        assert!(sample(
            &text,
            &format!("{FAILOVERS}{{mode=\"switchover\",result=\"refused\"}}")
        )
        .is_some());
        assert!(
            sample(
                &text,
                &format!("{FAILOVER_PHASE_DURATION}_sum{{phase=\"promote\"}}")
            )
            .unwrap_or(0.0)
                >= 1.25
        );
        assert!(
            sample(
                &text,
                &format!("{TRANSACTIONS_ABORTED_BY_FAILOVER}{{result=\"unknown\"}}")
            )
            .unwrap_or(0.0)
                >= 1.0
        );
        assert!(
            sample(&text, &format!("{CONFIG_RELOADS}{{result=\"rejected\"}}")).unwrap_or(0.0)
                >= 1.0
        );
        assert!(text.contains(&format!(
            "{BUILD_INFO}{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
