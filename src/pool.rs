//! Per (user, database) pools of server connections to the current primary.
//!
//! A pool is a semaphore (its size) plus a stack of idle connections. Acquiring waits for a
//! permit, then reuses the most recently used idle connection that still points at the current
//! primary, or opens a new one. Dropping a `PooledServer` without `release` discards the
//! connection: only a connection known to be clean goes back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Semaphore, SemaphorePermit};
use tracing::{debug, info, warn};

use crate::backend::{ServerConn, ServerError, ServerLogin, ServerTarget};
use crate::cluster::ClusterView;
use crate::metrics::{self, AcquireFailure, PoolMetrics};
use crate::params::SharedSets;
use crate::prepared::KnownStatements;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PoolKey {
    pub user: String,
    pub database: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.user, self.database)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection available within {waited_ms} ms (pool {pool} has all {size} servers in use)")]
    Timeout {
        pool: PoolKey,
        size: usize,
        waited_ms: u128,
    },
    #[error("no primary available within {0} ms")]
    NoPrimary(u128),
    /// A primary is known, but no connection to it could be opened within the hold.
    #[error("no primary available within {waited_ms} ms: {node} is the primary, but {error}")]
    PrimaryUnreachable {
        node: String,
        waited_ms: u128,
        error: ServerError,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Counters a pool keeps for status and metrics.
#[derive(Debug, Default)]
struct Counters {
    waiting: AtomicUsize,
    active: AtomicUsize,
}

pub struct Pool {
    pub key: PoolKey,
    login: Mutex<ServerLogin>,
    size: AtomicUsize,
    permits: Arc<Semaphore>,
    // Boxed connections: checking one out or in moves a pointer, and a `PooledServer` (kept
    // by every client, empty between transactions) is pointer-sized.
    // parking_lot: taken twice per transaction, without std's poison bookkeeping.
    #[allow(clippy::vec_box)]
    idle: parking_lot::Mutex<Vec<Box<ServerConn>>>,
    counters: Counters,
    /// Prepared statements PostgreSQL accepted on this pool's servers.
    pub known_statements: Arc<KnownStatements>,
    /// Client session parameters, shared between clients that want the same.
    pub param_sets: SharedSets,
    pub metrics: PoolMetrics,
    min_size: usize,
    /// New connections per second (0 = unlimited), and when the next may start.
    connect_rate: u32,
    next_connect: Mutex<Instant>,
}

/// A server connection checked out of a pool. Dropping it without `release` closes the
/// socket: only a connection known to be clean goes back.
pub struct PooledServer {
    /// Boxed: a client between transactions keeps a pointer-sized empty slot, not a whole
    /// connection's worth of bytes.
    pub conn: Box<ServerConn>,
    slot: Slot,
}

/// One of a pool's `size` slots (a semaphore permit, forgotten while held), from the acquire
/// that took it until its connection goes back or is closed. Dropping it frees the slot, and
/// un-counts its connection if it was counted active (by whoever checked the connection out,
/// `Pool::take_idle` under the idle lock). It keeps the pool alive: a checked-out connection
/// costs one reference count, not one for the pool and one for its semaphore.
struct Slot {
    pool: Arc<Pool>,
    active: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.active {
            self.pool.counters.active.fetch_sub(1, Ordering::Relaxed);
        }
        self.pool.permits.add_permits(1);
    }
}

/// Seconds since `started` (a [`crate::clock::now_micros`] stamp).
fn waited(started: u64) -> f64 {
    crate::clock::seconds_between(started, crate::clock::now_micros())
}

/// Whether an idle connection can serve the next transaction: it goes to `primary`, belongs
/// to `epoch` or a later one, and the server has not closed it.
fn usable(conn: &mut ServerConn, primary: &str, epoch: u64) -> bool {
    conn.epoch >= epoch && *conn.target.node == *primary && !conn.is_closed()
}

impl PooledServer {
    /// Returns a clean, idle connection to the pool for reuse.
    pub fn release(mut self) {
        self.conn.last_used = crate::clock::now_micros();
        self.release_used();
    }

    /// `release` for a connection whose `last_used` is already up to date (the relay sets it
    /// at the ReadyForQuery that ended its transaction).
    pub fn release_used(self) {
        let PooledServer { conn, mut slot } = self;
        if conn.expires <= conn.last_used {
            debug!(server = conn.id, node = %conn.target.node, "server connection reached server_lifetime_ms; closing it");
            tokio::spawn(conn.close());
            return;
        }
        // The connection joins the idle list and leaves the active count under one lock, so
        // a scrape (`Pool::status`) never counts it twice or not at all.
        {
            let mut idle = slot.pool.lock_idle();
            idle.push(conn);
            slot.pool.counters.active.fetch_sub(1, Ordering::Relaxed);
            slot.active = false;
        }
        drop(slot);
    }

    /// Closes the connection (politely, in the background) and frees its slot.
    pub fn discard(self) {
        let PooledServer { conn, slot } = self;
        debug!(server = conn.id, node = %conn.target.node, "closing server connection");
        tokio::spawn(conn.close());
        drop(slot);
    }
}

/// A snapshot of one pool for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    pub user: String,
    pub database: String,
    pub size: usize,
    pub clients_waiting: usize,
    pub servers_active: usize,
    pub servers_idle: usize,
}

impl Pool {
    pub fn new(
        key: PoolKey,
        login: ServerLogin,
        size: usize,
        min_size: usize,
        connect_rate: u32,
    ) -> Pool {
        Pool {
            min_size: min_size.min(size),
            connect_rate,
            next_connect: Mutex::new(Instant::now()),
            metrics: PoolMetrics::new(&key.to_string()),
            key,
            login: Mutex::new(login),
            size: AtomicUsize::new(size),
            permits: Arc::new(Semaphore::new(size)),
            idle: parking_lot::Mutex::new(Vec::new()),
            counters: Counters::default(),
            known_statements: Arc::new(KnownStatements::default()),
            param_sets: SharedSets::default(),
        }
    }

    fn lock_login(&self) -> MutexGuard<'_, ServerLogin> {
        self.login.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reload: new size and login for new server connections; connections in use stay.
    pub fn reconfigure(
        &self,
        size: usize,
        password: Option<String>,
        connect_timeout: Duration,
        tls: crate::config::ServerTlsMode,
    ) {
        {
            let mut login = self.lock_login();
            login.password = password;
            login.connect_timeout = connect_timeout;
            login.tls = tls;
        }
        let old = self.size.swap(size, Ordering::Relaxed);
        if size > old {
            self.permits.add_permits(size - old);
        } else if size < old {
            let shrink = old - size;
            let forgotten = self.permits.forget_permits(shrink);
            let rest = (shrink - forgotten) as u32;
            if rest > 0 {
                // Slots in use are taken away as they come back.
                let permits = self.permits.clone();
                tokio::spawn(async move {
                    if let Ok(p) = permits.acquire_many_owned(rest).await {
                        p.forget();
                    }
                });
            }
        }
        if size != old {
            info!(pool = %self.key, from = old, to = size, "pool resized");
        }
    }

    #[allow(clippy::vec_box)]
    fn lock_idle(&self) -> parking_lot::MutexGuard<'_, Vec<Box<ServerConn>>> {
        self.idle.lock()
    }

    /// Checks out the most recently used idle connection when that needs no waiting at all: a
    /// free slot, a primary, and an idle connection to it from the current epoch. This is the
    /// path of nearly every transaction; anything else goes through `acquire`.
    pub fn try_acquire_now(self: &Arc<Self>, cluster: &ClusterView) -> Option<PooledServer> {
        let slot = self.try_slot()?;
        let conn = {
            let topology = cluster.topology.borrow();
            let primary = topology.primary_name()?;
            let mut idle = self.lock_idle();
            if !idle
                .last_mut()
                .is_some_and(|c| usable(c, primary, topology.epoch))
            {
                return None;
            }
            let conn = idle.pop()?;
            self.counters.active.fetch_add(1, Ordering::Relaxed);
            conn
        };
        self.metrics.pool_wait(0.0);
        Some(self.checked_out(conn, slot))
    }

    /// Checks out a server connection to the current primary, waiting at most `wait` for a
    /// free slot and for a primary to exist. The client counts as waiting until it has the
    /// connection (through opening one, or holding while the primary is away).
    pub async fn acquire(
        self: &Arc<Self>,
        cluster: &ClusterView,
        wait: Duration,
        hold: Duration,
    ) -> Result<PooledServer, PoolError> {
        let started = crate::clock::now_micros();
        // Until `acquire` returns, or the client gives up and this future is dropped.
        // It stops waiting where its connection is counted active (under the idle lock), so
        // `status` never sees the client in both.
        let mut waiting = Some(metrics::Counted::new(&self.counters.waiting));
        // Fast path without a timer when a slot is free.
        let slot = match self.try_slot() {
            Some(slot) => Some(slot),
            // The wait timed out, or the semaphore closed (it never is).
            None => match tokio::time::timeout(wait, self.permits.acquire()).await {
                Ok(Ok(permit)) => Some(self.slot(permit)),
                _ => None,
            },
        };
        let Some(slot) = slot else {
            metrics::pool_acquire_failed(&self.key.to_string(), AcquireFailure::Timeout);
            return Err(PoolError::Timeout {
                pool: self.key.clone(),
                size: self.size.load(Ordering::Relaxed),
                waited_ms: u128::from(crate::clock::now_micros().saturating_sub(started) / 1000),
            });
        };
        // A client that waited for a busy pool nearly always finds an idle connection now.
        // The rest (no primary yet, opening a connection, holding through a failover) is
        // boxed, so the future of every waiting client stays small.
        let idle = {
            let topology = cluster.topology.borrow();
            topology
                .primary_name()
                .and_then(|primary| self.take_idle(primary, topology.epoch, &mut waiting))
        };
        if let Some(conn) = idle {
            self.metrics.pool_wait(waited(started));
            return Ok(self.checked_out(conn, slot));
        }
        Box::pin(self.open_or_hold(cluster, slot, started, hold, &mut waiting)).await
    }

    /// An idle connection to `primary` from `epoch` on, if there is one; stale ones found on
    /// the way are closed. The one taken is counted active, and the client it is for no longer
    /// waiting, under the idle lock, so `status` sees each in exactly one state.
    fn take_idle(
        &self,
        primary: &str,
        epoch: u64,
        waiting: &mut Option<metrics::Counted<'_>>,
    ) -> Option<Box<ServerConn>> {
        loop {
            let conn = {
                let mut idle = self.lock_idle();
                let mut conn = idle.pop()?;
                if usable(&mut conn, primary, epoch) {
                    self.counters.active.fetch_add(1, Ordering::Relaxed);
                    drop(waiting.take());
                    return Some(conn);
                }
                conn
            };
            debug!(server = conn.id, node = %conn.target.node, "discarding stale server connection");
            tokio::spawn(conn.close());
        }
    }

    /// A free slot, if there is one now.
    fn try_slot(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.permits.try_acquire().ok()?;
        Some(self.slot(permit))
    }

    /// The slot a permit of this pool's semaphore stands for.
    fn slot(self: &Arc<Self>, permit: SemaphorePermit<'_>) -> Slot {
        permit.forget();
        Slot {
            pool: self.clone(),
            active: false,
        }
    }

    /// Wraps a connection already counted active, with its slot.
    fn checked_out(&self, conn: Box<ServerConn>, mut slot: Slot) -> PooledServer {
        slot.active = true;
        PooledServer { conn, slot }
    }

    /// `acquire` once a slot is held but no idle connection was at hand: waits for a primary,
    /// takes an idle connection or opens one, holding the client while the primary is away.
    async fn open_or_hold(
        self: &Arc<Self>,
        cluster: &ClusterView,
        slot: Slot,
        started: u64,
        hold: Duration,
        waiting: &mut Option<metrics::Counted<'_>>,
    ) -> Result<PooledServer, PoolError> {
        let hold_until = Instant::now() + hold;
        loop {
            let left = hold_until.saturating_duration_since(Instant::now());
            let Some((target, epoch)) = cluster.wait_for_primary(left).await else {
                metrics::pool_acquire_failed(&self.key.to_string(), AcquireFailure::NoPrimary);
                return Err(PoolError::NoPrimary(hold.as_millis()));
            };
            if let Some(conn) = self.take_idle(&target.node, epoch, waiting) {
                self.metrics.pool_wait(waited(started));
                return Ok(self.checked_out(conn, slot));
            }
            let login = self.lock_login().clone();
            self.pace_connect().await;
            match ServerConn::connect(&target, &login, epoch).await {
                Ok(conn) => {
                    let conn = Box::new(conn);
                    debug!(server = conn.id, node = %target.node, pool = %self.key, "server connection opened");
                    metrics::server_connection_opened(&target.node);
                    self.metrics.pool_wait(waited(started));
                    {
                        let _idle = self.lock_idle();
                        self.counters.active.fetch_add(1, Ordering::Relaxed);
                        drop(waiting.take());
                    }
                    return Ok(self.checked_out(conn, slot));
                }
                // A server shutting down or starting up (57P0x) is a failing primary, not the
                // client's error: hold the client like for a refused connection.
                Err(e @ ServerError::Postgres { .. }) if !e.is_shutdown() => {
                    metrics::pool_acquire_failed(
                        &self.key.to_string(),
                        AcquireFailure::ServerError,
                    );
                    return Err(e.into());
                }
                Err(e) => {
                    // The primary does not answer: a passive signal. Hold the client until the
                    // topology changes (a failover) or the hold ends, then try again.
                    metrics::server_connect_failed(&target.node);
                    warn!(node = %target.node, pool = %self.key, error = %e, "cannot open server connection; holding the client");
                    cluster.report_server_failure();
                    let left = hold_until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        metrics::pool_acquire_failed(
                            &self.key.to_string(),
                            AcquireFailure::NoPrimary,
                        );
                        return Err(PoolError::PrimaryUnreachable {
                            node: target.node.to_string(),
                            waited_ms: hold.as_millis(),
                            error: e,
                        });
                    }
                    cluster
                        .wait_for_change(&target, left.min(Duration::from_millis(500)))
                        .await;
                }
            }
        }
    }

    /// Waits for this pool's next connection slot under `server_connect_rate`.
    async fn pace_connect(&self) {
        if self.connect_rate == 0 {
            return;
        }
        let slot = {
            let mut next = self.next_connect.lock().unwrap_or_else(|p| p.into_inner());
            let slot = (*next).max(Instant::now());
            *next = slot + Duration::from_secs(1) / self.connect_rate;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }

    /// Closes every idle connection to `target`: one of its connections just failed, so the
    /// others are suspect (a killed or crashing primary closes its sockets one process at a
    /// time). The next transaction connects anew, or is held until the topology changes.
    pub fn discard_idle_to(&self, target: &ServerTarget) {
        let suspect: Vec<Box<ServerConn>> = {
            let mut idle = self.lock_idle();
            let (suspect, keep): (Vec<_>, Vec<_>) =
                idle.drain(..).partition(|c| c.target == *target);
            *idle = keep;
            suspect
        };
        for conn in suspect {
            debug!(server = conn.id, node = %conn.target.node, "closing idle server connection after a failure on its node");
            tokio::spawn(conn.close());
        }
    }

    /// Closes idle connections unused for longer than `idle_timeout` or past their lifetime,
    /// keeping `min_pool_size` connections open.
    pub fn close_idle(&self, idle_timeout: Duration) {
        let now = crate::clock::now_micros();
        let idle_timeout = crate::clock::duration_micros(idle_timeout);
        let active = self.counters.active.load(Ordering::Relaxed);
        let expired: Vec<Box<ServerConn>> = {
            let mut idle = self.lock_idle();
            let mut keep_at_least = self.min_size.saturating_sub(active);
            // Most recently used last: keep those.
            idle.sort_by_key(|c| std::cmp::Reverse(c.last_used));
            let (keep, expired): (Vec<_>, Vec<_>) = idle.drain(..).partition(|c| {
                let fresh = now.saturating_sub(c.last_used) < idle_timeout && c.expires > now;
                if fresh || (keep_at_least > 0 && c.expires > now) {
                    keep_at_least = keep_at_least.saturating_sub(1);
                    true
                } else {
                    false
                }
            });
            let mut keep = keep;
            keep.reverse();
            *idle = keep;
            expired
        };
        for conn in expired {
            debug!(server = conn.id, node = %conn.target.node, "closing idle server connection");
            tokio::spawn(conn.close());
        }
    }

    /// Opens server connections until the pool holds `min_pool_size` of them.
    async fn fill_min(&self, cluster: &ClusterView) {
        let Some(target) = cluster.current().primary_target() else {
            return;
        };
        let epoch = cluster.current().epoch;
        loop {
            let have = self.counters.active.load(Ordering::Relaxed) + self.lock_idle().len();
            if have >= self.min_size {
                return;
            }
            let login = self.lock_login().clone();
            self.pace_connect().await;
            match ServerConn::connect(&target, &login, epoch).await {
                Ok(conn) => {
                    metrics::server_connection_opened(&target.node);
                    self.lock_idle().push(Box::new(conn));
                }
                Err(e) => {
                    debug!(pool = %self.key, error = %e, "cannot open a min_pool_size connection");
                    return;
                }
            }
        }
    }

    pub fn status(&self) -> PoolStatus {
        // Read under the idle lock, which check-in and check-out hold while they move a
        // connection between the idle list and the active count.
        let idle = self.lock_idle();
        PoolStatus {
            user: self.key.user.clone(),
            database: self.key.database.clone(),
            size: self.size.load(Ordering::Relaxed),
            clients_waiting: self.counters.waiting.load(Ordering::Relaxed),
            servers_active: self.counters.active.load(Ordering::Relaxed),
            servers_idle: idle.len(),
        }
    }
}

/// All pools of the proxy, created on first use.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    pub fn get_or_create(&self, key: PoolKey, make: impl FnOnce(&PoolKey) -> Pool) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(key)
            .or_insert_with_key(|k| Arc::new(make(k)))
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = pools.values().cloned().collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    /// Background task: closes idle server connections past `idle_timeout` or their lifetime,
    /// and opens connections up to each pool's `min_pool_size`.
    pub async fn run_idle_reaper(self: Arc<Self>, idle_timeout: Duration, cluster: ClusterView) {
        let tick = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            for pool in self.all() {
                pool.close_idle(idle_timeout);
                pool.fill_min(&cluster).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A primary that is known but cannot be reached for the whole hold is, for the client, no
    /// primary within `hold_ms`: 57P03, like no primary at all.
    #[tokio::test]
    async fn a_primary_unreachable_for_the_whole_hold_gives_57p03() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = crate::config::Config::parse(&format!(
            "[[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
             [[nodes]]\nname = \"n0\"\nhost = \"127.0.0.1\"\nport = {port}\n"
        ))
        .expect("config");
        let mut topology = crate::cluster::Topology::initial(&config);
        topology.epoch = 1;
        topology.primary = Some(0);
        topology.reason = None;
        let (_tx, rx) = tokio::sync::watch::channel(topology);
        let cluster = ClusterView::new(rx, Arc::new(tokio::sync::Notify::new()));
        let key = PoolKey {
            user: "app".into(),
            database: "postgres".into(),
        };
        let login = ServerLogin {
            user: "app".into(),
            password: Some("secret".into()),
            database: "postgres".into(),
            tls: crate::config::ServerTlsMode::Disable,
            connect_timeout: Duration::from_millis(200),
            fences: Arc::new(crate::backend::Fences::default()),
            lifetime: Duration::from_secs(3600),
        };
        let pool = Arc::new(Pool::new(key, login, 2, 0, 0));
        let hold = Duration::from_millis(300);
        let started = Instant::now();
        let error = match pool.acquire(&cluster, Duration::from_secs(5), hold).await {
            Ok(_) => panic!("a connection to a closed port"),
            Err(e) => e,
        };
        assert!(started.elapsed() >= hold, "gave up before the hold ended");
        assert!(
            matches!(&error, PoolError::PrimaryUnreachable { node, .. } if node == "n0"),
            "{error:?}"
        );
        let client =
            crate::client_error::ClientError::from_pool(&error, crate::wire::Severity::Error);
        assert_eq!(client.code, "57P03", "{}", client.message);
        assert!(
            client
                .message
                .starts_with("no primary available within 300 ms: n0 is the primary, but"),
            "{}",
            client.message
        );
    }
}
