//! A logged-in client: the server connection it uses and the relay loop between the sockets.
//!
//! The relay frames both byte streams by type + length. Most messages stream through as they
//! arrive (a 100 MB row never sits whole in memory); only the few a pooler must understand are
//! held until complete: ReadyForQuery, ParameterStatus and CommandComplete from the server, and
//! in transaction mode the client messages that name prepared statements. Both directions flow
//! independently inside one task, so a server that writes while the client is still sending
//! (pipelines, COPY with notices) never deadlocks the proxy.
//!
//! Session mode holds one server for the whole session. Transaction mode attaches a server
//! when the client sends something and returns it when the server reports idle ('I') with
//! nothing outstanding.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn};

use crate::backend::{ServerConn, ServerLogin};
use crate::buffers;
use crate::cancel::{CancelForwarded, CancelKey};
use crate::client_error::ClientError;
use crate::clock;
use crate::config::PoolMode;
use crate::frontend::{refuse, LoggedIn, Proxy};
use crate::metrics::{self, AbortOutcome, Direction, Hazard, IdleTimeout};
use crate::params::ParamSet;
use crate::pool::{Pool, PoolKey, PooledServer};
use crate::prepared::{self, BindStart, ClientStatements, Pending, Tracker, Verdict};
use crate::stream::Stream;
use crate::wire::{self, Severity, WireError};

/// Bytes buffered towards one side before the relay stops reading from the other.
const HIGH_WATER: usize = 256 * 1024;
/// How much one read from a client asks for.
const CLIENT_READ: usize = 8 * 1024;
/// How much one read from a server asks for.
const SERVER_READ: usize = 32 * 1024;
/// Rounds of the relay (each reads and writes each socket at most once) in one poll of a
/// session's task before it lets the others run: tokio's task budget, which its own reads
/// spend, is 128 operations.
const RELAY_ROUNDS: u32 = 64;
/// Largest buffer a server connection keeps between clients (transaction mode). The relay's
/// own reads and its high-water mark keep buffers well under it.
const CONN_BUFFER_KEEP: usize = 4 * HIGH_WATER;

/// Session parameters every client keeps across server connections in transaction mode.
const TRACKED_PARAMS: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
    "search_path",
    "default_transaction_read_only",
];

/// A logged-in client with its first server: see `start` and `run`.
pub struct ClientSession(Box<Session>);

/// What to do after an event.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    End,
}

/// Everything a logged-in client keeps, in one allocation. The session's future holds only a
/// pointer to it and the relay's poll; what happens rarely (waiting for a server, a server
/// going away, the client leaving) runs in futures boxed for the occasion. That is what keeps
/// an idle client small.
struct Session {
    proxy: Arc<Proxy>,
    stream: Stream,
    relay: Relay,
    server: Option<PooledServer>,
    statements: ClientStatements,
    cancel: CancelKey,
    id: u64,
    _slot: OwnedSemaphorePermit,
    /// Made at the client's first idle moment while an idle timeout is configured (from the
    /// start, or since a reload set one): clients without carry 8 bytes for it.
    idle: Option<Box<IdleClock>>,
}

/// A client's idle time, for `idle_transaction_timeout_ms` and `client_idle_timeout_ms`.
struct IdleClock {
    /// When the client logged in, its last transaction ended (transaction mode: its server's
    /// last answer), or an event pgswitch handled for it ended. With a server attached, the
    /// later of this and the server's `last_used` (its last ReadyForQuery, stamped by the
    /// relay without a store here).
    since: u64,
    /// Armed while the client is idle.
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl IdleClock {
    /// Idle from now on.
    fn new() -> Box<IdleClock> {
        Box::new(IdleClock {
            since: clock::now_micros(),
            // Set to a real deadline on first use.
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(86_400 * 365))),
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Shutdown's grace period ended with this client still here: say why before the socket
        // closes, as PostgreSQL does at a fast shutdown.
        if self.proxy.closing() {
            let mut buf = BytesMut::new();
            ClientError::shutting_down().encode(&mut buf);
            self.stream.send_last(&buf);
        }
    }
}

impl ClientSession {
    /// Gets a logged-in client its first server and its greeting; `None` if the client got
    /// an error instead, or left.
    pub async fn start(proxy: Arc<Proxy>, login: LoggedIn, id: u64) -> Option<ClientSession> {
        Session::start(proxy, login, id).await.map(ClientSession)
    }

    /// Relays until the client leaves.
    pub async fn run(self) {
        let mut session = self.0;
        // A reload that changes the idle timeouts wakes the session through its cancel slot.
        std::future::poll_fn(|cx| {
            session.cancel.slot.set_waker(cx.waker());
            Poll::Ready(())
        })
        .await;
        loop {
            let s = &mut *session;
            // The two events of every transaction (a server taken without waiting, a server
            // handed back) are handled inside one poll, so the relay knows which sockets it
            // already found unreadable in this poll of the task.
            let end = std::future::poll_fn(|cx| {
                let mut armed = Armed::default();
                loop {
                    let event = match s.relay.poll(
                        cx,
                        &mut s.stream,
                        s.server.as_mut().map(|s| &mut *s.conn),
                        &mut s.statements,
                        &mut armed,
                    ) {
                        Poll::Ready(event) => event,
                        Poll::Pending if !s.proxy.idle_limits.any() => return Poll::Pending,
                        Poll::Pending => RelayEvent::Idle(ready!(s.poll_idle(cx))),
                    };
                    match event {
                        RelayEvent::NeedServer if s.attach_now() => armed.server = false,
                        RelayEvent::ServerIdle if !s.relay.relearn => {
                            s.release_server();
                            armed.server = false;
                        }
                        other => return Poll::Ready(other),
                    }
                }
            })
            .await;
            let flow = match end {
                RelayEvent::NeedServer => Box::pin(s.attach_waiting()).await,
                other => Box::pin(s.on_event(other)).await,
            };
            if let Some(idle) = s.idle.as_deref_mut() {
                // What these events end in (a server released after a read-back, an error
                // answered by pgswitch) is the client's latest activity.
                idle.since = clock::now_micros();
            }
            if flow == Flow::End {
                break;
            }
        }
        drop(session);
        // The task's span names the client.
        debug!("session ended");
        metrics::client_disconnected();
    }
}

impl Session {
    /// Gets the client its first server (its parameters, and the greeting it is owed).
    async fn start(proxy: Arc<Proxy>, login: LoggedIn, id: u64) -> Option<Box<Session>> {
        let LoggedIn {
            mut stream,
            user,
            database,
            params,
            mut leftover,
            slot,
            ..
        } = login;
        let mode = proxy.config().pool_mode;
        let pool = pool_for(&proxy, &user, &database);
        let login_params = ParamSet::new(params);
        let first = Box::pin(attach(&proxy, &pool, &login_params, None));
        let gone = Box::pin(read_until_closed(&mut stream, &mut leftover));
        let attached = tokio::select! {
            r = first => r,
            _ = gone => {
                debug!("client left while waiting for its first server");
                return None;
            }
        };
        let mut server = match attached {
            Ok(s) => s,
            Err(e) => {
                refuse(&mut stream, &e.fatal()).await;
                return None;
            }
        };
        let cancel = proxy.cancels.register();
        let mut wanted = login_params.values().to_vec();
        drop(login_params);
        if mode == PoolMode::Transaction {
            // The first server's values are this client's defaults from now on.
            for name in proxy.relay_settings().tracked.iter().cloned() {
                if !wanted.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
                    if let Some(v) = server.conn.params.get(&name) {
                        wanted.push((name, v.clone()));
                    }
                }
            }
        }
        let wanted = pool.param_sets.share(wanted);
        let mut greeting = BytesMut::new();
        for (name, value) in &server.conn.params {
            wire::parameter_status(&mut greeting, name, value);
        }
        wire::backend_key_data(&mut greeting, cancel.pid, cancel.secret);
        wire::ready_for_query(&mut greeting, b'I');
        greeting.extend_from_slice(&server.conn.pending.split());

        let mut relay = Relay::new(&proxy, mode, wanted, &pool);
        relay.to_client = greeting;
        relay.client_in = leftover;
        let server = match mode {
            PoolMode::Session => {
                relay.lend_buffers(&mut server.conn);
                cancel.slot.set(Some(server.conn.cancel.clone()));
                info!(client = id, server = server.conn.id, node = %server.conn.target.node, "client attached to server");
                Some(server)
            }
            PoolMode::Transaction => {
                server.release();
                None
            }
        };
        Some(Box::new(Session {
            proxy,
            stream,
            relay,
            server,
            statements: ClientStatements::default(),
            cancel,
            id,
            _slot: slot,
            idle: None,
        }))
    }

    /// Ready when the client has sat idle past its timeout (`idle_transaction_timeout_ms`
    /// inside a transaction, `client_idle_timeout_ms` outside). The timer is armed lazily: a
    /// later deadline (a newer answer) leaves it as it is, and when it fires early it is moved
    /// to the deadline of now. So a busy client only compares two numbers per poll.
    #[inline(never)]
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<IdleTimeout> {
        let limits = &self.proxy.idle_limits;
        let idle = self.idle.get_or_insert_with(IdleClock::new);
        let relay = &self.relay;
        // A server's last answer counts only from when this client got it: a server that
        // rested in the pool was idle, not the client.
        let since = match &self.server {
            Some(s) => s.conn.last_used.max(idle.since),
            None => idle.since,
        };
        let (kind, limit) = if self.server.is_some() && relay.server_status != b'I' {
            (IdleTimeout::Transaction, &limits.transaction)
        } else {
            (IdleTimeout::Session, &limits.client)
        };
        let limit = limit.load(Ordering::Relaxed);
        if limit == 0
            || relay.client_done
            || !relay.client_in.is_empty()
            || !relay.to_client.is_empty()
            || !relay.server_is_quiet()
        {
            return Poll::Pending;
        }
        let at = tokio::time::Instant::from_std(clock::instant(since.saturating_add(limit)));
        let timer = &mut idle.timer;
        // Earlier than the armed deadline (the other timeout, or the first use), or the armed
        // one passed while the client was busy: move it. Later: let it fire, then move it.
        if at < timer.deadline() || timer.is_elapsed() {
            timer.as_mut().reset(at);
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            if tokio::time::Instant::now() >= at {
                return Poll::Ready(kind);
            }
            timer.as_mut().reset(at);
        }
    }

    /// Nearly every transaction: an idle server that already has the client's parameters,
    /// taken without waiting, timers or allocation. `false`: the caller waits for one.
    fn attach_now(&mut self) -> bool {
        if self.proxy.is_paused() {
            return false;
        }
        let Some(mut server) = self.relay.pool.try_acquire_now(&self.proxy.cluster) else {
            return false;
        };
        if !server.conn.params_match(&self.relay.wanted) {
            // Parameters to set first: a round trip, on the waiting path.
            self.server = Some(server);
            return false;
        }
        self.attached(server);
        true
    }

    /// Waits for a server (or sets the parameters of the one `attach_now` found), while
    /// noticing the client leaving.
    async fn attach_waiting(&mut self) -> Flow {
        let have = self.server.take();
        if have.is_none() && self.proxy.is_paused() {
            let wait = self.proxy.config().hold();
            if !self.proxy.wait_unpaused(wait).await {
                self.relay
                    .fail_in_flight(ClientError::no_server_while_paused());
                return Flow::Continue;
            }
        }
        // Both futures live in this (boxed) future: a wait costs one allocation. Pinned where
        // they are made, so `select!` moves two pointers, not two futures.
        let attached = {
            let next = std::pin::pin!(attach(
                &self.proxy,
                &self.relay.pool,
                &self.relay.wanted,
                have
            ));
            let gone = std::pin::pin!(read_until_closed(
                &mut self.stream,
                &mut self.relay.client_in
            ));
            tokio::select! {
                r = next => Some(r),
                _ = gone => None,
            }
        };
        match attached {
            None => {
                debug!(client = self.id, "client left while waiting for a server");
                Flow::End
            }
            Some(Ok(server)) => {
                self.attached(server);
                Flow::Continue
            }
            Some(Err(e)) => {
                debug!(client = self.id, error = ?e.fatal().message, "no server for the next transaction");
                self.relay.fail_in_flight(e.error());
                Flow::Continue
            }
        }
    }

    fn attached(&mut self, mut server: PooledServer) {
        self.relay.lend_buffers(&mut server.conn);
        self.cancel.slot.set(Some(server.conn.cancel.clone()));
        self.relay.answered = false;
        self.server = Some(server);
    }

    /// Transaction mode: the server finished the client's transaction.
    fn release_server(&mut self) {
        let cancelled = self.cancel.slot.set(None);
        if let Some(mut s) = self.server.take() {
            if let Some(idle) = self.idle.as_deref_mut() {
                idle.since = s.conn.last_used;
            }
            self.relay.return_buffers(&mut s.conn);
            match cancelled {
                // Its last ReadyForQuery (which made it idle) set its last use.
                None => s.release_used(),
                Some(cancelled) => {
                    tokio::spawn(settle_after_cancel(s, cancelled));
                }
            }
        }
        self.relay.shrink_idle_buffers();
    }

    /// Session mode: the client's transaction changed session parameters. They are read back
    /// from its server, so that should the server go away (failover), the session moves to the
    /// new one with them, like its startup parameters and prepared statements.
    async fn read_back_in_place(&mut self) -> Flow {
        self.relay.relearn = false;
        let Some(s) = &mut self.server else {
            return Flow::Continue;
        };
        self.relay.return_buffers(&mut s.conn);
        let names: Vec<String> = self
            .relay
            .wanted
            .values()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let read =
            tokio::time::timeout(Duration::from_secs(10), s.conn.read_session_params(&names)).await;
        self.relay.lend_buffers(&mut s.conn);
        match read {
            Ok(Ok(values)) => {
                self.relay.learned(&values, true);
                Flow::Continue
            }
            // An error of its own (a cancel came in): the server is fine and keeps the values.
            Ok(Err(e @ crate::backend::ServerError::Postgres { .. })) if !e.is_shutdown() => {
                debug!(client = self.id, error = %e, "reading session parameters back failed");
                Flow::Continue
            }
            // The server went away before the values were known: the session cannot be moved
            // to another server with them.
            Ok(Err(e)) => {
                self.server_gone(io::Error::other(e.to_string()), false)
                    .await
            }
            Err(_) => {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    "reading session parameters back timed out",
                );
                self.server_gone(e, false).await
            }
        }
    }

    /// Transaction mode: the server finished a transaction that changed parameters it does
    /// not report (`SET search_path` on PostgreSQL 15, `RESET ALL`, `set_config(…)`). Their
    /// values are read back before the server goes to the next client, so the client keeps
    /// them on its next server and the next client of this one gets its own.
    async fn relearn_and_release(&mut self) -> Flow {
        self.relay.relearn = false;
        let cancelled = self.cancel.slot.set(None);
        let Some(mut s) = self.server.take() else {
            return Flow::Continue;
        };
        self.relay.return_buffers(&mut s.conn);
        let names = self.relay.kept_names();
        let read = async {
            if let Some(cancelled) = cancelled {
                absorb_cancel(&mut s.conn, cancelled).await?;
            }
            s.conn.read_params(&names).await
        };
        let failed = match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(values)) => {
                self.relay.learned(&values, false);
                s.release();
                self.relay.shrink_idle_buffers();
                return Flow::Continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        // The values the transaction set are unknown: going on would run the client's next
        // transactions without them, so it is told and closed instead.
        warn!(client = self.id, server = s.conn.id, error = %failed, "reading session parameters back failed; closing the client");
        s.discard();
        refuse(&mut self.stream, &ClientError::session_parameters_lost()).await;
        Flow::End
    }

    /// Everything but the two events of every transaction.
    async fn on_event(&mut self, end: RelayEvent) -> Flow {
        let id = self.id;
        match end {
            RelayEvent::ServerIdle if self.relay.mode == PoolMode::Session => {
                self.read_back_in_place().await
            }
            RelayEvent::ServerIdle => self.relearn_and_release().await,
            RelayEvent::NeedServer => Flow::Continue,
            RelayEvent::ClientLeft | RelayEvent::ClientGone(_) => {
                if let RelayEvent::ClientGone(e) = &end {
                    debug!(client = id, error = %e, "client connection lost");
                }
                self.give_back_server().await;
                Flow::End
            }
            RelayEvent::ClientProtocol(e) => {
                info!(client = id, error = %e, "closing client after protocol violation");
                self.cancel.slot.set(None);
                if let Some(s) = self.server.take() {
                    cancel_and_discard(s);
                }
                refuse(&mut self.stream, &ClientError::from_wire(&e)).await;
                Flow::End
            }
            RelayEvent::ServerGone(e) => self.server_gone(e, true).await,
            RelayEvent::Idle(kind) => {
                info!(client = id, kind = kind.as_str(), "closing idle client");
                metrics::client_idle_timeout(kind);
                let error = match kind {
                    IdleTimeout::Transaction => ClientError::idle_in_transaction_timeout(),
                    IdleTimeout::Session => ClientError::idle_session_timeout(),
                };
                // Nothing is in flight: the server goes back after a ROLLBACK (or its reset),
                // first, for the clients waiting for it; then the client gets its error.
                self.give_back_server().await;
                refuse(&mut self.stream, &error).await;
                Flow::End
            }
        }
    }

    /// The client is done with its server for good: cancels no longer reach it, and it goes
    /// back to its pool (see `return_server`).
    async fn give_back_server(&mut self) {
        let cancelled = self.cancel.slot.set(None);
        if let Some(s) = self.server.take() {
            return_server(&self.proxy, s, &self.relay, cancelled).await;
        }
    }

    /// The server connection failed. `movable`: pgswitch knows the session's parameters (not
    /// so while it was reading back what the last transaction set).
    async fn server_gone(&mut self, e: io::Error, movable: bool) -> Flow {
        let id = self.id;
        let relay = &mut self.relay;
        let idle_before = relay.client_is_idle();
        self.cancel.slot.set(None);
        let fatal = relay.server_fatal.take();
        // A server that ended the session for the client's own reasons (protocol
        // violation, idle timeouts) is healthy; one shutting down is not.
        let server_failing = fatal.as_deref().is_none_or(|c| c.starts_with("57P"));
        if let Some(s) = self.server.take() {
            if server_failing {
                warn!(client = id, server = s.conn.id, node = %s.conn.target.node, error = %e, fatal = ?fatal, "server connection lost");
                for pool in self.proxy.pools.all() {
                    pool.discard_idle_to(&s.conn.target);
                }
            } else {
                info!(client = id, server = s.conn.id, node = %s.conn.target.node, fatal = ?fatal, "server ended the session");
            }
            s.discard();
        }
        if server_failing {
            self.proxy.cluster.report_server_failure();
        }
        match (relay.mode, server_failing) {
            (PoolMode::Transaction, true) => {
                let in_transaction =
                    relay.awaiting_ready > 0 || relay.unsynced || relay.server_status != b'I';
                let error = if relay.commit_in_flight {
                    metrics::transactions_aborted_by_failover(AbortOutcome::Unknown);
                    ClientError::commit_outcome_unknown()
                } else {
                    if in_transaction {
                        metrics::transactions_aborted_by_failover(AbortOutcome::RolledBack);
                    }
                    ClientError::server_connection_lost(Severity::Error)
                };
                relay.fail_in_flight(error);
                Flow::Continue
            }
            (PoolMode::Session, true) if idle_before && movable => {
                // Not in a transaction: move the session to the new primary with its
                // parameters and prepared statements.
                match reattach(&self.proxy, relay).await {
                    Ok(s) => {
                        info!(client = id, server = s.conn.id, node = %s.conn.target.node, "idle session moved to the new primary");
                        self.attached(s);
                        Flow::Continue
                    }
                    Err(e) => {
                        let _ = self.stream.write_all(&relay.to_client).await;
                        refuse(&mut self.stream, &e).await;
                        Flow::End
                    }
                }
            }
            (PoolMode::Session, true) => {
                let _ = self.stream.write_all(&relay.to_client).await;
                let error = if movable {
                    ClientError::server_connection_lost(Severity::Fatal)
                } else {
                    ClientError::session_parameters_lost()
                };
                refuse(&mut self.stream, &error).await;
                Flow::End
            }
            (_, false) => {
                // The client already has the server's FATAL error.
                let _ = self.stream.write_all(&relay.to_client).await;
                let _ = self.stream.shutdown().await;
                Flow::End
            }
        }
    }
}

/// What every relay reads from the configuration, made once per configuration and shared: one
/// pointer in each client's state.
pub struct RelaySettings {
    /// The built-in tracked parameters plus `track_extra_params`.
    pub tracked: Box<[String]>,
    pub max_message: usize,
    /// `prepared_statement_cache_size`.
    pub cache_size: usize,
}

impl RelaySettings {
    pub fn new(config: &crate::config::Config) -> RelaySettings {
        RelaySettings {
            tracked: TRACKED_PARAMS
                .iter()
                .map(|s| s.to_string())
                .chain(config.track_extra_params.iter().cloned())
                .collect(),
            max_message: config.max_message_bytes,
            cache_size: config.prepared_statement_cache_size,
        }
    }
}

/// Why a client could not get a server.
enum AttachError {
    Pool(crate::pool::PoolError),
    Server(crate::backend::ServerError),
}

impl AttachError {
    fn fatal(&self) -> ClientError {
        self.with_severity(Severity::Fatal)
    }

    fn error(&self) -> ClientError {
        self.with_severity(Severity::Error)
    }

    fn with_severity(&self, severity: Severity) -> ClientError {
        match self {
            AttachError::Pool(e) => ClientError::from_pool(e, severity),
            AttachError::Server(e) => ClientError::from_server(e, severity),
        }
    }
}

/// Session mode after the server went away: a new server with the client's parameters and
/// named prepared statements.
async fn reattach(proxy: &Proxy, relay: &Relay) -> Result<PooledServer, ClientError> {
    let mut server = attach(proxy, &relay.pool, &relay.wanted, None)
        .await
        .map_err(|e| e.fatal())?;
    let parses: Vec<bytes::Bytes> = relay
        .session_statements
        .iter()
        .flat_map(|m| m.values().cloned())
        .collect();
    if let Err(e) = server.conn.prepare_again(&parses).await {
        server.discard();
        return Err(ClientError::from_server(&e, Severity::Fatal));
    }
    Ok(server)
}

/// Checks out a server (unless `have` is one already) and gives it the client's session
/// parameters.
async fn attach(
    proxy: &Proxy,
    pool: &Arc<Pool>,
    params: &ParamSet,
    have: Option<PooledServer>,
) -> Result<PooledServer, AttachError> {
    let (wait, hold) = {
        let config = proxy.config();
        (config.pool_timeout(), config.hold())
    };
    let mut server = match have {
        Some(s) => s,
        None => pool
            .acquire(&proxy.cluster, wait, hold)
            .await
            .map_err(|e| {
                warn!(pool = %pool.key, error = %e, "no server for client");
                AttachError::Pool(e)
            })?,
    };
    // Setting parameters is a round trip, and rare: boxed, so the wait for a server stays small.
    if !server.conn.params_match(params) {
        if let Err(e) = Box::pin(server.conn.sync_params(params)).await {
            server.discard();
            return Err(AttachError::Server(e));
        }
    }
    Ok(server)
}

fn pool_for(proxy: &Proxy, user: &str, database: &str) -> Arc<Pool> {
    let config = proxy.config();
    proxy.pools.get_or_create(
        PoolKey {
            user: user.to_string(),
            database: database.to_string(),
        },
        |key| {
            let password = config
                .user(user)
                .and_then(|u| u.server_login_password())
                .map(str::to_string);
            Pool::new(
                key.clone(),
                ServerLogin {
                    user: key.user.clone(),
                    password,
                    database: key.database.clone(),
                    tls: config.server_tls,
                    connect_timeout: config.server_connect_timeout(),
                    fences: proxy.fences.clone(),
                    lifetime: Duration::from_millis(config.server_lifetime_ms),
                },
                config.pool_size_for(user),
                config.min_pool_size,
                config.server_connect_rate,
            )
        },
    )
}

/// A cancel request was forwarded to this server while the client held it. PostgreSQL signals
/// the backend twice (the process, then its process group), and a signal handled after the
/// cancelled query ended cancels the next query the backend reads: another client's, once the
/// server is back in the pool. So the server goes back only after the request was taken and
/// one query of pgswitch's own absorbed what is left of it.
async fn settle_after_cancel(mut server: PooledServer, cancelled: CancelForwarded) {
    match absorb_cancel(&mut server.conn, cancelled).await {
        Ok(()) => server.release(),
        Err(e) => {
            debug!(server = server.conn.id, error = %e, "server failed after a cancel; closing it");
            server.discard();
        }
    }
}

/// Waits (at most 5 s) until PostgreSQL took the cancel request, then runs `SELECT 1`: a late
/// signal cancels that query (57014, expected) instead of the next client's.
async fn absorb_cancel(
    conn: &mut ServerConn,
    cancelled: CancelForwarded,
) -> Result<(), crate::backend::ServerError> {
    let _ = tokio::time::timeout(Duration::from_secs(5), cancelled.delivered()).await;
    match conn.simple_query("SELECT 1").await {
        Err(e) if e.sqlstate() != "57014" => Err(e),
        _ => Ok(()),
    }
}

/// Cancels whatever the server runs, then closes it.
fn cancel_and_discard(server: PooledServer) {
    let target = server.conn.cancel.clone();
    tokio::spawn(async move {
        let _ = crate::backend::send_cancel(&target).await;
    });
    server.discard();
}

/// Puts the server back in its pool if it is provably idle, after the reset query (session
/// mode) or as it is (transaction mode); otherwise cancels what it runs and closes it.
async fn return_server(
    proxy: &Proxy,
    mut server: PooledServer,
    relay: &Relay,
    cancelled: Option<CancelForwarded>,
) {
    if !relay.server_is_quiet() {
        debug!(
            server = server.conn.id,
            "client left mid-query: cancelling and closing the server connection"
        );
        cancel_and_discard(server);
        return;
    }
    let in_transaction = relay.server_status != b'I';
    let session_mode = relay.mode == PoolMode::Session;
    let reset = async {
        if in_transaction {
            server.conn.simple_query("ROLLBACK").await?;
        }
        if session_mode {
            server
                .conn
                .reset(&proxy.config().server_reset_query)
                .await?;
        }
        if let Some(cancelled) = cancelled {
            absorb_cancel(&mut server.conn, cancelled).await?;
        }
        if relay.relearn {
            // What the client changed stays on the server: pgswitch must know it.
            server.conn.read_params(&relay.kept_names()).await?;
        }
        Ok::<(), crate::backend::ServerError>(())
    };
    match tokio::time::timeout(Duration::from_secs(10), reset).await {
        Ok(Ok(())) => server.release(),
        Ok(Err(e)) => {
            debug!(error = %e, "server reset failed; closing it");
            server.discard();
        }
        Err(_) => server.discard(),
    }
}

/// What made the relay stop.
#[derive(Debug)]
enum RelayEvent {
    /// Transaction mode: the client sent something and no server is attached.
    NeedServer,
    /// Transaction mode: the server finished the client's transaction.
    ServerIdle,
    /// The client sent Terminate.
    ClientLeft,
    /// The client's socket closed or failed.
    ClientGone(io::Error),
    /// The client broke the protocol (e.g. a message over the size limit).
    ClientProtocol(WireError),
    /// The server's socket closed or failed.
    ServerGone(io::Error),
    /// The client sat idle past one of its timeouts.
    Idle(IdleTimeout),
}

/// Sockets whose read came back `Pending` in the current poll of the session's task. Pending
/// means tokio registered the task's waker for the socket's readability, and readiness only
/// changes when the I/O driver runs, which is between polls of the task (on any thread, a new
/// event wakes the registered waker and the task is polled again). So within one poll a second
/// read of such a socket would find the same nothing: it is skipped. Made anew for every poll of
/// the task, never kept across polls: between them the waker may have been used up.
///
/// It also counts the relay's rounds in this poll: the relay's reads and writes do not spend
/// tokio's task budget (see `Stream::poll_recv_buf`), so a session with bytes flowing both ways
/// without pause yields after `RELAY_ROUNDS` rounds itself, and other clients get their turn.
#[derive(Debug, Default)]
struct Armed {
    client: bool,
    server: bool,
    rounds: u32,
}

/// One message being streamed through: the bytes still to come (never 0: a message with
/// nothing left is no `Streaming`), and whether they are dropped instead of forwarded (client
/// messages after a failed request, up to Sync). One word: the top bit is the discard flag, so
/// `Option<Streaming>` is 8 bytes in every client's state.
#[derive(Debug, Clone, Copy)]
struct Streaming(std::num::NonZeroUsize);

impl Streaming {
    const DISCARD: usize = 1 << (usize::BITS - 1);

    /// `None` when nothing remains.
    fn new(remaining: usize, discard: bool) -> Option<Streaming> {
        debug_assert!(remaining < Self::DISCARD);
        let flag = if discard { Self::DISCARD } else { 0 };
        std::num::NonZeroUsize::new(remaining).map(|r| Streaming(r | flag))
    }

    fn remaining(self) -> usize {
        self.0.get() & !Self::DISCARD
    }

    fn discard(self) -> bool {
        self.0.get() & Self::DISCARD != 0
    }

    /// After `n` (at most `remaining`) more bytes went through; `None` once none remain.
    fn advanced(self, n: usize) -> Option<Streaming> {
        Streaming::new(self.remaining() - n, self.discard())
    }
}

/// Queries (and Parse texts) up to this size are looked at for session state (hazards, and
/// parameters to read back) when they are whole in the buffer: one vectorised scan, a few
/// instructions per kilobyte. Bigger ones stream through unread.
const STATEMENT_CHECK_MAX: usize = 64 * 1024;

/// Names of statements that may change session parameters, made on first use. Boxed: 8 bytes
/// in every client's state instead of an empty set's 48.
#[allow(clippy::box_collection)]
type ParamStatements = Option<Box<std::collections::HashSet<Vec<u8>>>>;

/// The state of one client↔server relay.
struct Relay {
    mode: PoolMode,
    /// Read from the client, not yet framed.
    client_in: BytesMut,
    /// Framed client bytes, not yet written to the server.
    to_server: BytesMut,
    /// Read from the server, not yet framed.
    server_in: BytesMut,
    /// Framed server bytes (and pgswitch's own answers), not yet written to the client.
    to_client: BytesMut,
    client_msg: Option<Streaming>,
    server_msg: Option<Streaming>,
    /// Length of a client message that is framed only once it is whole (a Parse, Describe or
    /// Close pgswitch rewrites or remembers; a Bind until its statement name): the client is
    /// read past the high-water mark until `client_in` holds it. 0 when none is waited for.
    client_need: usize,
    /// Status byte of the server's last ReadyForQuery.
    server_status: u8,
    /// Requests (Query, Sync, FunctionCall) sent that have no ReadyForQuery back yet.
    awaiting_ready: u32,
    /// The attached server sent a ReadyForQuery since it was attached.
    answered: bool,
    /// A COMMIT (or END) was sent and its answer has not arrived.
    commit_in_flight: bool,
    /// Session mode: the Parse message of each named statement, by name (made on first use).
    /// Boxed: 8 bytes in every client's state instead of an empty map's 48.
    #[allow(clippy::box_collection)]
    session_statements: Option<Box<std::collections::HashMap<String, bytes::Bytes>>>,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The client sent Terminate: stop reading it.
    client_done: bool,
    /// After a failed request, client messages are dropped up to the next Sync, which gets
    /// this error (or only ReadyForQuery, when the error was already sent).
    failing: Option<Box<Option<ClientError>>>,
    /// Transaction mode: answers expected from the server, with pgswitch's own in between.
    tracker: Tracker,
    /// Session parameters this client keeps across servers.
    wanted: Arc<ParamSet>,
    /// The transaction may have changed parameters the server does not report: read them
    /// back before the server goes to another client.
    relearn: bool,
    /// Named statements whose text may change such parameters (a prepared `SET
    /// search_path`): a Bind of one sets `relearn`.
    param_statements: ParamStatements,
    settings: Arc<RelaySettings>,
    /// The client's pool: its statements known to parse, its metrics.
    pool: Arc<Pool>,
    /// SQLSTATE of a FATAL error the server sent before closing.
    server_fatal: Option<Box<str>>,
    /// When the oldest unanswered request was sent ([`clock::now_micros`]; 0: none).
    request_started: u64,
    /// When the current transaction's first request was sent (0: none).
    transaction_started: u64,
    /// Since the last Sync, everything was answered by pgswitch without a server.
    local_batch: bool,
}

impl Relay {
    fn new(proxy: &Proxy, mode: PoolMode, wanted: Arc<ParamSet>, pool: &Arc<Pool>) -> Relay {
        Relay {
            pool: pool.clone(),
            request_started: 0,
            transaction_started: 0,
            local_batch: false,
            server_fatal: None,
            mode,
            client_in: BytesMut::new(),
            to_server: BytesMut::new(),
            server_in: BytesMut::new(),
            to_client: BytesMut::new(),
            client_msg: None,
            server_msg: None,
            client_need: 0,
            server_status: b'I',
            awaiting_ready: 0,
            answered: false,
            commit_in_flight: false,
            session_statements: None,
            unsynced: false,
            client_done: false,
            failing: None,
            tracker: Tracker::default(),
            wanted,
            relearn: false,
            param_statements: None,
            settings: proxy.relay_settings(),
        }
    }

    fn rewrites(&self) -> bool {
        self.mode == PoolMode::Transaction
    }

    /// Everything sent was answered and no message is half-way through either direction.
    fn server_is_quiet(&self) -> bool {
        self.awaiting_ready == 0
            && !self.unsynced
            && self.tracker.is_empty()
            && self.to_server.is_empty()
            && self.server_in.is_empty()
            && self.client_msg.is_none()
            && self.server_msg.is_none()
    }

    /// Gives back the buffers of a client that sits idle between transactions.
    fn shrink_idle_buffers(&mut self) {
        for buf in [
            &mut self.to_server,
            &mut self.server_in,
            &mut self.client_in,
            &mut self.to_client,
        ] {
            buffers::give(buf);
        }
    }

    /// A server was attached: the relay reads and writes it through the connection's own
    /// buffers, which stay with the connection between clients. Whatever the server sent after
    /// its last control exchange is handled like anything else it sends. The client's answers
    /// go into the connection's client buffer too, unless some of pgswitch's own are still
    /// being written.
    fn lend_buffers(&mut self, conn: &mut ServerConn) {
        self.to_server.clear();
        self.server_in.clear();
        std::mem::swap(&mut self.to_server, &mut conn.outgoing);
        std::mem::swap(&mut self.server_in, &mut conn.pending);
        if self.tracker.is_idle() {
            std::mem::swap(&mut self.tracker, &mut conn.tracker);
        }
        if self.to_client.is_empty() {
            buffers::give(&mut self.to_client);
            std::mem::swap(&mut self.to_client, &mut conn.client_out);
        }
    }

    /// The server goes back to its pool, with its buffers (empty: the server is quiet). The
    /// client buffer goes with it when everything in it was written; a slow client keeps its
    /// answer, and the connection gets a buffer again from the next client that has one.
    fn return_buffers(&mut self, conn: &mut ServerConn) {
        std::mem::swap(&mut self.to_server, &mut conn.outgoing);
        std::mem::swap(&mut self.server_in, &mut conn.pending);
        if self.to_client.is_empty() {
            std::mem::swap(&mut self.to_client, &mut conn.client_out);
        }
        if self.tracker.is_idle() {
            std::mem::swap(&mut self.tracker, &mut conn.tracker);
        }
        // A buffer that grew for one big message (a Parse of megabytes is held whole) is
        // freed rather than kept by an idle connection.
        for buf in [&mut conn.outgoing, &mut conn.pending, &mut conn.client_out] {
            if buf.capacity() > CONN_BUFFER_KEEP && buf.is_empty() {
                *buf = BytesMut::new();
            }
        }
    }

    /// The server went away or none could be had: answer what the client is waiting for with
    /// `error`, drop what was not sent, and keep the client connection.
    fn fail_in_flight(&mut self, error: ClientError) {
        self.to_server.clear();
        self.server_in.clear();
        self.server_msg = None;
        self.tracker.clear();
        self.server_status = b'I';
        self.commit_in_flight = false;
        let mut error = Some(error);
        if self.awaiting_ready > 0 {
            if let Some(e) = error.take() {
                e.encode(&mut self.to_client);
            }
            for _ in 0..self.awaiting_ready {
                wire::ready_for_query(&mut self.to_client, b'I');
            }
            self.awaiting_ready = 0;
        }
        if let Some(m) = self.client_msg {
            self.client_msg = Streaming::new(m.remaining(), true);
        }
        // The rest of the client's batch (up to its Sync) is dropped and answered there.
        if self.unsynced || !self.client_in.is_empty() || self.client_msg.is_some() {
            self.failing = Some(Box::new(error));
        }
        self.unsynced = false;
    }

    /// Frames client bytes: forwards, rewrites, or (while failing) drops them.
    fn process_client(
        &mut self,
        mut server: Option<&mut ServerConn>,
        statements: &mut ClientStatements,
    ) -> Result<bool, WireError> {
        let mut progress = false;
        let need_before = std::mem::take(&mut self.client_need);
        loop {
            if let Some(m) = self.client_msg {
                let n = m.remaining().min(self.client_in.len());
                if n == 0 {
                    break;
                }
                if !m.discard() {
                    self.to_server.extend_from_slice(&self.client_in[..n]);
                }
                self.client_in.advance(n);
                self.client_msg = m.advanced(n);
                progress = true;
                continue;
            }
            if self.client_in.len() < 5 {
                break;
            }
            let tag = self.client_in[0];
            let len = u32::from_be_bytes([
                self.client_in[1],
                self.client_in[2],
                self.client_in[3],
                self.client_in[4],
            ]);
            if len < 4 {
                return Err(WireError::BadLength(len));
            }
            let body = (len - 4) as usize;
            if body > self.settings.max_message {
                return Err(WireError::TooLong {
                    len: body,
                    max: self.settings.max_message,
                });
            }
            if tag == b'X' {
                self.client_in.clear();
                self.client_done = true;
                return Ok(true);
            }
            if let Some(pending_error) = &mut self.failing {
                if matches!(tag, b'S' | b'Q') {
                    if let Some(e) = pending_error.take() {
                        e.encode(&mut self.to_client);
                    }
                    wire::ready_for_query(&mut self.to_client, b'I');
                    self.failing = None;
                }
                self.client_in.advance(5);
                self.client_msg = Streaming::new(body, true);
                progress = true;
                continue;
            }
            let Some(conn) = server.as_deref_mut() else {
                // Transaction mode between transactions: answer what needs no server, and let
                // the caller attach one for the rest.
                if self.answer_locally(tag, body, statements) {
                    progress = true;
                    continue;
                }
                break;
            };
            if tag == b'Q' && body < STATEMENT_CHECK_MAX && self.client_in.len() < 5 + body {
                // A query small enough to be looked at (session state, COMMIT) is read whole
                // before any of it goes on, also when the socket gave it in pieces.
                self.wait_for_whole(5 + body);
                break;
            }
            self.local_batch = false;
            if matches!(tag, b'Q' | b'F' | b'S') && self.awaiting_ready == 0 {
                let now = clock::now_micros();
                self.request_started = now;
                if self.transaction_started == 0 {
                    self.transaction_started = now;
                }
            }
            match tag {
                b'Q' | b'F' => self.awaiting_ready += 1,
                b'S' => {
                    self.awaiting_ready += 1;
                    self.unsynced = false;
                }
                b'P' | b'B' | b'D' | b'E' | b'C' => self.unsynced = true,
                _ => {}
            }
            if tag == b'B' {
                if let Some(named) = &self.param_statements {
                    let stmt = prepared::bind_statement(&self.client_in);
                    self.relearn |= stmt.is_some_and(|s| named.contains(s));
                }
            }
            if !self.rewrites() && matches!(tag, b'P' | b'C') && body < 1 << 20 {
                // Session mode: remember named statements, to restore them on the next server
                // should this one go away (failover).
                if self.client_in.len() < 5 + body {
                    self.wait_for_whole(5 + body);
                    break;
                }
                let msg = self.client_in.split_to(5 + body).freeze();
                if tag == b'P' && body < STATEMENT_CHECK_MAX {
                    let changes = |query: &[u8]| changes_params(query, false);
                    self.relearn |=
                        note_param_statement(&mut self.param_statements, &msg[5..], changes);
                }
                self.remember_statement(&msg);
                self.to_server.extend_from_slice(&msg);
                progress = true;
                continue;
            }
            let mut rewritable = self.rewrites() && matches!(tag, b'P' | b'B' | b'D' | b'C');
            if rewritable && tag == b'B' && self.client_in.len() < 5 + body {
                // A Bind streams once its statement name is here (its parameter values can be
                // any size).
                match prepared::rewrite_bind_start(
                    &self.client_in,
                    statements,
                    &mut conn.statements,
                    self.settings.cache_size,
                    &mut self.to_server,
                    &mut self.tracker,
                ) {
                    BindStart::Incomplete => {
                        // Its names are not here yet: read on (no room reserved for values).
                        self.client_need = 5 + body;
                        break;
                    }
                    BindStart::AsIs => rewritable = false,
                    BindStart::Rewritten(head) => {
                        if self.server_msg.is_none() {
                            self.tracker.drain_injects(&mut self.to_client);
                        }
                        self.client_in.advance(head);
                        self.client_msg = Streaming::new(5 + body - head, false);
                        progress = true;
                        continue;
                    }
                }
            }
            if rewritable {
                if self.client_in.len() < 5 + body {
                    self.wait_for_whole(5 + body);
                    break;
                }
                let msg = &self.client_in[..5 + body];
                if tag == b'P' && body < STATEMENT_CHECK_MAX {
                    let changes = |query: &[u8]| {
                        note_hazards(query, false, &self.settings.tracked, &self.wanted, conn)
                    };
                    self.relearn |=
                        note_param_statement(&mut self.param_statements, &msg[5..], changes);
                }
                if prepared::rewrite_client_message(
                    msg,
                    statements,
                    &mut conn.statements,
                    self.settings.cache_size,
                    &mut self.to_server,
                    &mut self.tracker,
                ) {
                    if self.server_msg.is_none() {
                        self.tracker.drain_injects(&mut self.to_client);
                    }
                } else {
                    self.to_server.extend_from_slice(msg);
                    self.tracker.push(Pending::Reply {
                        request: tag,
                        parse_of: None,
                    });
                }
                self.client_in.advance(5 + body);
                progress = true;
                continue;
            }
            if tag == b'Q' && body < STATEMENT_CHECK_MAX && self.client_in.len() >= 5 + body {
                let query = &self.client_in[5..5 + body];
                self.commit_in_flight |= is_commit(query);
                // A simple query may hold several statements.
                self.relearn |= if self.rewrites() {
                    note_hazards(query, true, &self.settings.tracked, &self.wanted, conn)
                } else {
                    changes_params(query, true)
                };
            }
            if self.rewrites() && prepared::is_tracked_request(tag) {
                self.tracker.push(Pending::Reply {
                    request: tag,
                    parse_of: None,
                });
            }
            // The whole message when it is here, otherwise its start; the rest streams.
            let here = self.client_in.len().min(5 + body);
            self.to_server.extend_from_slice(&self.client_in[..here]);
            self.client_in.advance(here);
            self.client_msg = Streaming::new(5 + body - here, false);
            progress = true;
        }
        // A message now waited for whole lifts the high-water mark that stopped the client's
        // reads (its start may have been read while the client waited for a server): that is
        // progress, or nothing would read the client again.
        if !self.client_may_read(need_before) && self.client_may_read(self.client_need) {
            progress = true;
        }
        Ok(progress)
    }

    /// Whether `client_in` leaves room to read the client, while a message of length `need` is
    /// waited for whole (0: none): the high-water mark, or that length when it is larger.
    fn client_may_read(&self, need: usize) -> bool {
        self.client_in.len() < HIGH_WATER.max(need)
    }

    /// The client message at the start of `client_in` is framed only when whole: let the client
    /// be read until it is here. Room is made as its bytes arrive (the buffer doubles), not
    /// for the length its header claims.
    fn wait_for_whole(&mut self, len: usize) {
        self.client_in
            .reserve((len - self.client_in.len()).min(HIGH_WATER));
        self.client_need = len;
    }

    /// Between transactions, a Parse of a statement the pool knows, a Close of a statement
    /// name, and the Sync or Flush ending such a batch need no server.
    fn answer_locally(&mut self, tag: u8, body: usize, statements: &mut ClientStatements) -> bool {
        if !self.rewrites() || self.awaiting_ready > 0 || !self.tracker.is_empty() {
            return false;
        }
        match tag {
            b'P' | b'C' => {
                if self.client_in.len() < 5 + body {
                    return false;
                }
                let msg = &self.client_in[..5 + body];
                let done = if tag == b'P' {
                    statements.parse_locally(msg, &self.pool.known_statements)
                } else {
                    statements.close_locally(msg)
                };
                if !done {
                    return false;
                }
                if tag == b'P' && body < STATEMENT_CHECK_MAX {
                    // Nothing runs yet, but each Bind of a statement that may change
                    // parameters must read them back, as for a Parse sent to a server.
                    let changes = |query: &[u8]| changes_params(query, false);
                    note_param_statement(&mut self.param_statements, &msg[5..], changes);
                }
                self.client_in.advance(5 + body);
                self.to_client.extend_from_slice(&[
                    if tag == b'P' { b'1' } else { b'3' },
                    0,
                    0,
                    0,
                    4,
                ]);
                self.local_batch = true;
                true
            }
            b'H' if self.local_batch && body == 0 => {
                self.client_in.advance(5);
                true
            }
            b'S' if self.local_batch && body == 0 => {
                self.client_in.advance(5);
                wire::ready_for_query(&mut self.to_client, self.server_status);
                self.local_batch = false;
                true
            }
            _ => false,
        }
    }

    /// Frames server bytes: follows ReadyForQuery and ParameterStatus, drops answers to
    /// requests pgswitch added, and puts pgswitch's own answers in place.
    fn process_server(
        &mut self,
        conn: &mut ServerConn,
        statements: &mut ClientStatements,
    ) -> Result<bool, WireError> {
        let mut progress = false;
        // `server_in[..run]` holds whole messages that go to the client as they are: they are
        // copied in one piece when something else has to happen, or at the end.
        let mut run = 0;
        loop {
            if let Some(m) = self.server_msg {
                let n = m.remaining().min(self.server_in.len());
                if n == 0 {
                    break;
                }
                self.to_client.extend_from_slice(&self.server_in[..n]);
                self.server_in.advance(n);
                self.server_msg = m.advanced(n);
                if self.server_msg.is_none() {
                    self.tracker.drain_injects(&mut self.to_client);
                }
                progress = true;
                continue;
            }
            let rest = &self.server_in[run..];
            if rest.len() < 5 {
                break;
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
            if len < 4 {
                return Err(WireError::BadLength(len));
            }
            let body = (len - 4) as usize;
            let complete = rest.len() >= 5 + body;
            let inspected = matches!(tag, b'Z' | b'S' | b'1' | b'3')
                || (tag == b'C' && body < 1024)
                || (tag == b'E' && body < 8192);
            if !complete {
                self.flush_run(&mut run);
                if inspected {
                    self.server_in.reserve(5 + body - self.server_in.len());
                    break;
                }
            }
            let mut verdict = if self.rewrites() {
                self.tracker.on_server_message(tag, &mut conn.statements)
            } else {
                Verdict::Forward
            };
            progress = true;
            if !complete {
                // Too big to wait for (rows, COPY data): streamed through as it arrives.
                self.to_client.extend_from_slice(&self.server_in[..5]);
                self.server_in.advance(5);
                if body > 0 {
                    self.server_msg = Streaming::new(body, false);
                } else {
                    self.tracker.drain_injects(&mut self.to_client);
                }
                continue;
            }
            let msg = run..run + 5 + body;
            match tag {
                b'Z' if body == 1 => {
                    self.server_status = self.server_in[run + 5];
                    self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
                    self.answered = true;
                    if self.awaiting_ready == 0 {
                        self.commit_in_flight = false;
                        let now = clock::now_micros();
                        conn.last_used = now;
                        // The failover controller's evidence that this node serves.
                        conn.answered.store(now, Ordering::Relaxed);
                        self.record_latencies(now);
                    }
                }
                b'S' => {
                    let body = self.server_in[run + 5..msg.end].to_vec();
                    self.track_parameter(conn, &body);
                }
                b'E' => {
                    if let Some(code) = fatal_code(&self.server_in[run + 5..msg.end]) {
                        // A server going away (shutdown, crash, failover)
                        // is not the client's end: pgswitch answers for it (08006, or a move to the new primary).
                        if code.starts_with("57P") {
                            verdict = Verdict::Drop;
                        }
                        self.server_fatal = Some(code.into_boxed_str());
                    }
                }
                b'C' => {
                    let command = &self.server_in[run + 5..msg.end];
                    if command.starts_with(b"DISCARD ALL") || command.starts_with(b"DEALLOCATE ALL")
                    {
                        conn.statements.clear();
                        statements.clear();
                        self.session_statements = None;
                    }
                }
                _ => {}
            }
            let forward = verdict == Verdict::Forward;
            if forward {
                run = msg.end;
            }
            if !forward || self.tracker.has_injects() {
                self.flush_run(&mut run);
                if !forward {
                    self.server_in.advance(msg.len());
                }
                self.tracker.drain_injects(&mut self.to_client);
            }
        }
        self.flush_run(&mut run);
        Ok(progress)
    }

    /// Copies the whole messages at the start of `server_in` that go to the client as they are.
    #[inline]
    fn flush_run(&mut self, run: &mut usize) {
        if *run > 0 {
            self.to_client.extend_from_slice(&self.server_in[..*run]);
            self.server_in.advance(*run);
            *run = 0;
        }
    }

    /// A ParameterStatus from the server: the server's value changed, and if it is one the
    /// client keeps, the client's wanted value too.
    /// Session mode: keeps the Parse of every named statement the client has, forgets closed
    /// ones.
    fn remember_statement(&mut self, msg: &bytes::Bytes) {
        let Some(body) = msg.get(5..) else { return };
        let name_of = |b: &[u8]| {
            b.iter()
                .position(|&c| c == 0)
                .map(|n| String::from_utf8_lossy(&b[..n]).into_owned())
        };
        match msg.first() {
            Some(b'P') => {
                if let Some(name) = name_of(body).filter(|n| !n.is_empty()) {
                    self.session_statements
                        .get_or_insert_with(Default::default)
                        .insert(name, msg.clone());
                }
            }
            Some(b'C') if body.first() == Some(&b'S') => {
                if let Some(name) = name_of(&body[1..]) {
                    if let Some(m) = &mut self.session_statements {
                        m.remove(&name);
                    }
                }
            }
            _ => {}
        }
    }

    /// The client sits between requests: nothing sent is unanswered, nothing half-sent.
    fn client_is_idle(&self) -> bool {
        self.server_status == b'I' && self.server_is_quiet() && self.client_in.is_empty()
    }

    fn track_parameter(&mut self, conn: &mut ServerConn, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            return;
        };
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            return;
        };
        conn.param_reported(name, value);
        if self.keeps(name.as_bytes()) && self.wanted.get(name) != Some(value) {
            self.wanted = Arc::new(self.wanted.with(name, value));
        }
    }

    /// The client keeps this parameter across servers: it is tracked, or the client gave it
    /// at startup.
    fn keeps(&self, name: &[u8]) -> bool {
        keeps(&self.settings.tracked, &self.wanted, name)
    }

    /// The names of the parameters this client keeps (the tracked ones and its own).
    fn kept_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.settings.tracked.to_vec();
        for (name, _) in self.wanted.values() {
            if !is_tracked(&self.settings.tracked, name.as_bytes()) {
                names.push(name.clone());
            }
        }
        names
    }

    /// Values read back from the server after the client's transaction: those the client
    /// keeps (`all` of them in session mode) are its values from now on.
    fn learned(&mut self, values: &[(String, String)], all: bool) {
        for (name, value) in values {
            if (all || self.keeps(name.as_bytes())) && self.wanted.get(name) != Some(value.as_str())
            {
                self.wanted = Arc::new(self.wanted.with(name, value));
            }
        }
    }

    /// The client's requests are all answered: the query (and, when the server is idle again,
    /// the transaction) took from its first request until now.
    fn record_latencies(&mut self, now: u64) {
        let query = std::mem::take(&mut self.request_started);
        if query == 0 {
            return;
        }
        self.pool
            .metrics
            .query_finished(clock::seconds_between(query, now));
        if self.server_status == b'I' {
            let transaction = std::mem::take(&mut self.transaction_started);
            if transaction != 0 {
                self.pool
                    .metrics
                    .transaction_finished(clock::seconds_between(transaction, now));
                metrics::transaction_completed(now);
            }
        }
    }

    /// Writes what is queued for the client, as far as its socket takes it now; the event if
    /// the client is gone.
    fn write_client(&mut self, cx: &mut Context<'_>, client: &mut Stream) -> Option<RelayEvent> {
        while !self.to_client.is_empty() {
            match client.poll_send_buf(cx, &mut self.to_client) {
                Poll::Ready(Ok(0)) => {
                    return Some(RelayEvent::ClientGone(io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Some(RelayEvent::ClientGone(e)),
                Poll::Pending => break,
            }
        }
        None
    }

    /// Moves bytes both ways until something needs the session's attention.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Stream,
        mut server: Option<&mut ServerConn>,
        statements: &mut ClientStatements,
        armed: &mut Armed,
    ) -> Poll<RelayEvent> {
        loop {
            armed.rounds += 1;
            if armed.rounds > RELAY_ROUNDS {
                // Polled again at once, after the other tasks that are ready.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // Progress is what was read or framed: writing comes first in each round, so the
            // reads after it already see the room it made, and a round that only wrote needs no
            // other.
            let mut progress = false;
            if let Some(conn) = server.as_deref_mut() {
                while !self.to_server.is_empty() {
                    match conn.stream.poll_send_buf(cx, &mut self.to_server) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(RelayEvent::ServerGone(
                                io::ErrorKind::WriteZero.into(),
                            ))
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(RelayEvent::ServerGone(e)),
                        Poll::Pending => break,
                    }
                }
            }
            if let Some(gone) = self.write_client(cx, client) {
                return Poll::Ready(gone);
            }
            if self.client_done && self.to_server.is_empty() {
                return Poll::Ready(RelayEvent::ClientLeft);
            }
            if !self.client_done
                && !armed.client
                && self.to_server.len() < HIGH_WATER
                && self.client_may_read(self.client_need)
            {
                // An idle client costs no buffer: free what it used, and wait for
                // readability before allocating again.
                if server.is_none() && self.client_in.is_empty() && self.to_client.is_empty() {
                    self.shrink_idle_buffers();
                }
                // A client without a buffer (between transactions) takes one only once its
                // socket is readable; while it is not, no system call is made.
                let readable = if self.client_in.capacity() > 0 || client.read_ready_now() {
                    Poll::Ready(Ok(()))
                } else {
                    client.poll_read_ready(cx)
                };
                let read = match readable {
                    Poll::Ready(Ok(())) => {
                        if self.client_in.capacity() == 0 {
                            self.client_in = buffers::take();
                        }
                        read_more(&mut self.client_in, CLIENT_READ, client, cx)
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                };
                match read {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(RelayEvent::ClientGone(
                            io::ErrorKind::UnexpectedEof.into(),
                        ))
                    }
                    Poll::Ready(Ok(n)) => {
                        metrics::bytes_relayed(Direction::ClientToServer, n as u64);
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEvent::ClientGone(e)),
                    Poll::Pending => armed.client = true,
                }
            }
            match self.process_client(server.as_deref_mut(), statements) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(RelayEvent::ClientProtocol(e)),
            }
            if self.client_done && self.to_server.is_empty() {
                return Poll::Ready(RelayEvent::ClientLeft);
            }
            let Some(conn) = server.as_deref_mut() else {
                if !self.client_in.is_empty() && self.failing.is_none() && self.client_msg.is_none()
                {
                    return Poll::Ready(RelayEvent::NeedServer);
                }
                if !progress {
                    return Poll::Pending;
                }
                continue;
            };
            if !armed.server && self.to_client.len() < HIGH_WATER {
                match read_more(&mut self.server_in, SERVER_READ, &mut conn.stream, cx) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(RelayEvent::ServerGone(
                            io::ErrorKind::UnexpectedEof.into(),
                        ))
                    }
                    Poll::Ready(Ok(n)) => {
                        metrics::bytes_relayed(Direction::ServerToClient, n as u64);
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEvent::ServerGone(e)),
                    Poll::Pending => armed.server = true,
                }
            }
            if self.to_client.capacity() == 0 && !self.server_in.is_empty() {
                self.to_client = buffers::take();
            }
            match self.process_server(conn, statements) {
                Ok(p) => {
                    progress |= p;
                    for name in self.tracker.confirmed.drain(..) {
                        self.pool.known_statements.insert(name);
                    }
                }
                Err(e) => {
                    return Poll::Ready(RelayEvent::ServerGone(io::Error::new(
                        io::ErrorKind::InvalidData,
                        e,
                    )))
                }
            }
            if (self.mode == PoolMode::Transaction || self.relearn)
                && self.answered
                && self.server_status == b'I'
                && self.server_is_quiet()
            {
                // Hand the server back as soon as its answer is framed; the client still gets it.
                // Written first when the client takes it at once (nearly always): the client
                // buffer then goes back with the server, and the write was due anyway.
                if let Some(gone) = self.write_client(cx, client) {
                    return Poll::Ready(gone);
                }
                return Poll::Ready(RelayEvent::ServerIdle);
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

/// Buffers what a client sends while it waits for a server, and returns once it closes: a
/// client that gives up does not keep its place in the queue.
async fn read_until_closed(stream: &mut Stream, buf: &mut BytesMut) {
    loop {
        if buf.len() >= HIGH_WATER {
            std::future::pending::<()>().await;
        }
        buf.reserve(CLIENT_READ);
        match tokio::io::AsyncReadExt::read_buf(stream, buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Reads into the end of `buf`, with room for at least a quarter of `chunk`: how many bytes
/// arrived (0 = end of stream).
#[inline]
fn read_more(
    buf: &mut BytesMut,
    chunk: usize,
    io: &mut Stream,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < chunk / 4 {
        buf.reserve(chunk);
    }
    io.poll_recv_buf(cx, buf)
}

/// The SQLSTATE of an ErrorResponse body whose severity is FATAL or PANIC.
fn fatal_code(body: &[u8]) -> Option<String> {
    let mut fatal = false;
    let mut code = None;
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'V' | b'S', v)) if v == b"FATAL" || v == b"PANIC" => fatal = true,
            Some((b'C', c)) => code = std::str::from_utf8(c).ok().map(str::to_string),
            _ => {}
        }
    }
    if fatal {
        code
    } else {
        None
    }
}

/// Looks at the text of a Parse (`body`): true when `changes` says it may change parameters
/// that must be read back; a named statement that does is remembered in `named`, so that each
/// Bind of it reads them back too.
fn note_param_statement(
    named: &mut ParamStatements,
    body: &[u8],
    changes: impl FnOnce(&[u8]) -> bool,
) -> bool {
    let Some((name, query)) = prepared::parse_name_and_query(body) else {
        return false;
    };
    if !changes(query) {
        return false;
    }
    if !name.is_empty() {
        named
            .get_or_insert_with(Default::default)
            .insert(name.to_vec());
    }
    true
}

/// Session mode: whether a query (`several` statements) or the text of a Parse may change
/// session parameters (`SET`, `RESET`, `DISCARD ALL`, `set_config(…)`): the session's values
/// are then read back when its transaction ends, to go with it to a new primary.
fn changes_params(query: &[u8], several: bool) -> bool {
    session_state_hazards(query, several, |_| ParamKind::ReadBack, |_| {})
}

/// A client keeps parameter `name` across servers: it is tracked, or the client gave it at
/// startup (or pgswitch has learned its value since).
fn keeps(tracked: &[String], wanted: &ParamSet, name: &[u8]) -> bool {
    is_tracked(tracked, name) || wanted.has(name)
}

/// `name` is one of the tracked parameters, in any ASCII case.
fn is_tracked(tracked: &[String], name: &[u8]) -> bool {
    tracked
        .iter()
        .any(|t| t.as_bytes().eq_ignore_ascii_case(name))
}

/// Counts (and logs at debug level) the statements of a transaction-mode query, simple
/// (`several` statements) or the text of a Parse, that create session state the client's
/// next server will not have. True when the query may change parameters the client keeps
/// that the server does not report: pgswitch reads them back after the transaction.
fn note_hazards(
    query: &[u8],
    several: bool,
    tracked: &[String],
    wanted: &ParamSet,
    conn: &ServerConn,
) -> bool {
    let kind = |name: &[u8]| match (keeps(tracked, wanted, name), conn.reports(name)) {
        (true, true) => ParamKind::Reported,
        (true, false) => ParamKind::ReadBack,
        (false, _) if conn.has_applied(name) => ParamKind::Applied,
        (false, _) => ParamKind::Lost,
    };
    session_state_hazards(query, several, kind, |hazard| {
        debug!(
            kind = hazard.as_str(),
            "session state in transaction mode does not follow the client to its next server"
        );
        metrics::session_state_hazard(hazard);
    })
}

/// How a change of a session parameter reaches the client's next server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamKind {
    /// The client keeps it and the server reports its changes (ParameterStatus).
    Reported,
    /// The client keeps it, the server does not report it: read back after the transaction.
    ReadBack,
    /// The client does not keep it (a hazard), but pgswitch set it on this server for some
    /// client: read back so pgswitch knows what the server has.
    Applied,
    /// The client does not keep it: a hazard.
    Lost,
}

/// Session state a query creates that transaction pooling cannot carry to the client's next
/// server (see the README's list of transaction-mode caveats), each passed to `found`;
/// `kind(name)` says how a change of parameter `name` follows the client. Returns whether a
/// statement may change a parameter that must be read back ([`ParamKind::ReadBack`],
/// [`ParamKind::Applied`], `RESET ALL`, `DISCARD ALL`, a `set_config(…)` call). With
/// `several`, each statement start after a `;` is looked at too (a `;` inside a string literal
/// splits as well: cheaper than lexing every query, and harmless for a metric). A function
/// call is looked for once in the whole text. This runs on every simple query and every
/// Parse: a few prefix comparisons and one vectorised scan.
fn session_state_hazards(
    query: &[u8],
    several: bool,
    kind: impl Fn(&[u8]) -> ParamKind,
    mut found: impl FnMut(Hazard),
) -> bool {
    let mut read_back = false;
    let mut statement = |text: &[u8]| {
        let (hazard, read) = statement_effect(trim_start(text), &kind);
        if let Some(hazard) = hazard {
            found(hazard);
        }
        read_back |= read;
    };
    statement(query);
    // One scan finds both the statement ends and the calls.
    let mut locked = false;
    let mut sets = false;
    for at in memchr::memchr2_iter(b';', b'(', query) {
        if query[at] == b';' {
            if several {
                statement(&query[at + 1..]);
            }
        } else {
            let before = trim_end(&query[..at]);
            locked = locked || calls_advisory_lock(before);
            sets = sets || ends_with_word(before, b"set_config");
        }
    }
    if locked {
        found(Hazard::AdvisoryLock);
    }
    read_back || sets
}

/// `before` (the text up to a `(`) ends with the name of a session advisory lock function,
/// in any ASCII case.
fn calls_advisory_lock(before: &[u8]) -> bool {
    const FUNCTIONS: [&[u8]; 4] = [
        b"pg_advisory_lock",
        b"pg_try_advisory_lock",
        b"pg_advisory_lock_shared",
        b"pg_try_advisory_lock_shared",
    ];
    FUNCTIONS.iter().any(|f| ends_with_word(before, f))
}

/// `text` ends with `suffix`, ignoring ASCII case.
fn ends_with_word(text: &[u8], suffix: &[u8]) -> bool {
    text.len() >= suffix.len() && text[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// What a statement (leading space removed) does by what it starts with: the hazard it
/// creates, and whether it may change a parameter that must be read back.
fn statement_effect(text: &[u8], kind: impl Fn(&[u8]) -> ParamKind) -> (Option<Hazard>, bool) {
    // Nearly every statement starts with none of these: one comparison of the first letter.
    match text.first().map(u8::to_ascii_lowercase) {
        Some(b'p') if starts_with_word(text, b"prepare ") => (Some(Hazard::Prepare), false),
        Some(b'l') if starts_with_word(text, b"listen ") => (Some(Hazard::Listen), false),
        Some(b'c') if starts_with_word(text, b"create temp") => (Some(Hazard::TempTable), false),
        Some(b's') => match set_target(text).map(kind) {
            Some(ParamKind::Reported) | None => (None, false),
            Some(ParamKind::ReadBack) => (None, true),
            Some(ParamKind::Applied) => (Some(Hazard::Set), true),
            Some(ParamKind::Lost) => (Some(Hazard::Set), false),
        },
        Some(b'r') => match reset_target(text) {
            Some(name) => {
                let all = name.eq_ignore_ascii_case(b"all");
                let read = all || matches!(kind(name), ParamKind::ReadBack | ParamKind::Applied);
                (None, read)
            }
            None => (None, false),
        },
        Some(b'd') => (None, starts_with_word(text, b"discard all")),
        _ => (None, false),
    }
}

/// The parameter (or `ALL`) a `RESET name` resets, quotes removed.
fn reset_target(text: &[u8]) -> Option<&[u8]> {
    if !(starts_with_word(text, b"reset") && text.get(5).is_some_and(u8::is_ascii_whitespace)) {
        return None;
    }
    parameter_name(trim_start(&text[5..]))
}

/// The parameter a session-wide `SET [SESSION] name …` changes (quotes removed), or None for
/// anything else, `SET LOCAL` and `SET TRANSACTION` included.
fn set_target(text: &[u8]) -> Option<&[u8]> {
    if !(starts_with_word(text, b"set") && text.get(3).is_some_and(u8::is_ascii_whitespace)) {
        return None;
    }
    let rest = trim_start(&text[3..]);
    let first = &rest[..word_end(rest)];
    if first.eq_ignore_ascii_case(b"local") || first.eq_ignore_ascii_case(b"transaction") {
        return None;
    }
    let rest = if first.eq_ignore_ascii_case(b"session") {
        trim_start(&rest[first.len()..])
    } else {
        rest
    };
    parameter_name(rest)
}

/// The parameter name `text` starts with: a double-quoted one without its quotes, or a word
/// (letters, digits, `_`, `.`, `$`).
fn parameter_name(text: &[u8]) -> Option<&[u8]> {
    if let Some(quoted) = text.strip_prefix(b"\"") {
        return quoted
            .iter()
            .position(|&b| b == b'"')
            .map(|end| &quoted[..end]);
    }
    let name = &text[..word_end(text)];
    (!name.is_empty()).then_some(name)
}

/// Where the word `text` starts with ends: letters, digits, `_`, `.`, `$`.
fn word_end(text: &[u8]) -> usize {
    text.iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'$')))
        .unwrap_or(text.len())
}

fn trim_start(text: &[u8]) -> &[u8] {
    let skip = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    &text[skip..]
}

fn trim_end(text: &[u8]) -> &[u8] {
    let keep = text
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |at| at + 1);
    &text[..keep]
}

/// `text` starts with `prefix`, ignoring ASCII case.
fn starts_with_word(text: &[u8], prefix: &[u8]) -> bool {
    text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// A simple query that ends a transaction with COMMIT (or END).
fn is_commit(query: &[u8]) -> bool {
    let text = trim_start(query);
    starts_with_word(text, b"commit") || starts_with_word(text, b"end")
}
#[cfg(test)]
mod tests {
    use super::*;

    /// An idle client keeps a `Session` (and a pointer-sized empty server slot): these sizes
    /// are most of what an idle client costs (`benches/idle_memory.py` measures the whole).
    #[test]
    fn an_idle_client_stays_small() {
        use std::mem::size_of;
        assert!(
            size_of::<PooledServer>() <= 64,
            "{}",
            size_of::<PooledServer>()
        );
        // 448 bytes is one of jemalloc's size classes.
        assert!(size_of::<Relay>() <= 304, "{}", size_of::<Relay>());
        assert!(size_of::<Session>() <= 448, "{}", size_of::<Session>());
    }

    #[test]
    fn hazards_are_found_in_any_case_and_spacing() {
        // Reported and kept here: TimeZone and application_name; kept, not reported:
        // search_path; set by pgswitch for another client: statement_timeout.
        let kind = |name: &[u8]| {
            let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
            if is(b"timezone") || is(b"application_name") {
                ParamKind::Reported
            } else if is(b"search_path") {
                ParamKind::ReadBack
            } else if is(b"statement_timeout") {
                ParamKind::Applied
            } else {
                ParamKind::Lost
            }
        };
        let effect = |q: &[u8], several: bool| {
            let mut found = Vec::new();
            let read_back = session_state_hazards(q, several, kind, |h| found.push(h));
            (found, read_back)
        };
        let all = |q: &[u8], several: bool| effect(q, several).0;
        let read_back = |q: &[u8]| effect(q, true).1;
        let hazard = |q: &[u8]| {
            let found = all(q, false);
            assert!(found.len() <= 1, "{found:?}");
            found.first().copied()
        };
        assert_eq!(hazard(b"  PREPARE x AS select 1"), Some(Hazard::Prepare));
        assert_eq!(hazard(b"listen ch"), Some(Hazard::Listen));
        assert_eq!(
            hazard(b"select PG_ADVISORY_LOCK(1)"),
            Some(Hazard::AdvisoryLock)
        );
        assert_eq!(
            hazard(b"SELECT pg_advisory_lock_shared($1)"),
            Some(Hazard::AdvisoryLock)
        );
        assert_eq!(hazard(b"select pg_advisory_xact_lock(1)"), None);
        assert_eq!(
            hazard(b"CREATE TEMPORARY TABLE t (a int)"),
            Some(Hazard::TempTable)
        );
        assert_eq!(hazard(b"SET search_path = a"), None);
        assert_eq!(hazard(b"SET statement_timeout = 1"), Some(Hazard::Set));
        assert_eq!(hazard(b"set\tSESSION work_mem TO '8MB'"), Some(Hazard::Set));
        assert_eq!(hazard(b"SET ROLE other"), Some(Hazard::Set));
        assert_eq!(
            hazard(b"SET SESSION AUTHORIZATION other"),
            Some(Hazard::Set)
        );
        assert_eq!(hazard(b"SET TimeZone = 'UTC'"), None);
        assert_eq!(hazard(b"set session \"timezone\" to 'UTC'"), None);
        assert_eq!(hazard(b"SET application_name='x'"), None);
        assert_eq!(hazard(b"set local search_path = a"), None);
        assert_eq!(hazard(b"SET TRANSACTION READ ONLY"), None);
        assert_eq!(hazard(b"settings"), None);
        assert_eq!(hazard(b"select 1"), None);
        assert_eq!(hazard(b""), None);
        assert_eq!(set_target(b"SET  x.y = 1"), Some(&b"x.y"[..]));
        assert_eq!(set_target(b"SET"), None);
        // Several statements: each start is looked at, an advisory lock once per query.
        assert_eq!(
            all(
                b"BEGIN; LISTEN a;SET work_mem = 1; select pg_advisory_lock(1);COMMIT;",
                true
            ),
            [Hazard::Listen, Hazard::Set, Hazard::AdvisoryLock]
        );
        assert_eq!(
            all(b"SELECT 1; LISTEN a", false),
            [],
            "a Parse holds one statement"
        );
        assert_eq!(all(b"SELECT abalance FROM t WHERE aid = 1;", true), []);
        // What is read back after the transaction.
        for q in [
            &b"SET search_path = a"[..],
            b"set session \"SEARCH_PATH\" to a",
            b"BEGIN; SET search_path TO a; COMMIT",
            b"SET statement_timeout = 5",
            b"RESET search_path",
            b"reset\tall",
            b"DISCARD ALL",
            b"SELECT pg_catalog.set_config('search_path', $1, false)",
            b"select SET_CONFIG ('x', 'y', false)",
        ] {
            assert!(read_back(q), "{}", String::from_utf8_lossy(q));
        }
        for q in [
            &b"SET TimeZone = 'UTC'"[..],
            b"SET work_mem = 1",
            b"SET LOCAL search_path = a",
            b"RESET work_mem",
            b"resetting",
            b"SELECT current_setting('search_path')",
            b"DISCARD PLANS",
            b"select 1",
        ] {
            assert!(!read_back(q), "{}", String::from_utf8_lossy(q));
        }
        assert_eq!(reset_target(b"RESET \"x.y\""), Some(&b"x.y"[..]));
    }

    #[test]
    fn commit_is_recognised() {
        assert!(is_commit(b"COMMIT"));
        assert!(is_commit(b"  end;"));
        assert!(!is_commit(b"select 'commit'"));
        assert!(!is_commit(b"com"));
    }
}
