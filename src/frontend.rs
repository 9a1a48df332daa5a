//! The client side: listener, TLS, startup packets and client authentication. A client that
//! logs in successfully is handed to a `ClientSession`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, debug_span, info, info_span, warn, Instrument};

use crate::auth::{self, AuthError, AuthMethod, ScramServer, Secret};
use crate::backend::Fences;
use crate::cancel::CancelRegistry;
use crate::client_error::ClientError;
use crate::cluster::ClusterView;
use crate::config::Config;
use crate::failover::SwitchoverHandle;
use crate::metrics::{self, LoginFailure};
use crate::pool::Pools;
use crate::session::ClientSession;
use crate::stream::Stream;
use crate::wire::{self, StartupMessage, StartupPacket, WireError};

/// Largest authentication message a client may send.
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

/// What a reload replaces at once: the configuration and what is derived from it.
pub struct Live {
    pub config: Arc<Config>,
    relay: Arc<crate::session::RelaySettings>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    secrets: HashMap<String, Secret>,
    auth_method: AuthMethod,
}

impl Live {
    /// Parses the users' secrets (deriving SCRAM keys once, not on every login) and loads TLS.
    pub fn new(config: Arc<Config>) -> Result<Live, ReloadError> {
        let tls = match &config.tls {
            Some(t) => Some(crate::stream::server_tls_acceptor(&t.cert, &t.key)?),
            None => None,
        };
        let auth_method = config.auth_method();
        let mut secrets = HashMap::new();
        for user in &config.users {
            if let Some(password) = &user.password {
                let secret = match Secret::parse(&user.name, password)? {
                    Secret::Plain(p) if auth_method == AuthMethod::ScramSha256 => {
                        let salt: [u8; auth::SCRAM_DEFAULT_SALT_LEN] = rand::random();
                        Secret::Scram(auth::ScramVerifier::from_password(
                            &p,
                            &salt,
                            auth::SCRAM_DEFAULT_ITERATIONS,
                        ))
                    }
                    other => other,
                };
                secrets.insert(user.name.clone(), secret);
            }
        }
        Ok(Live {
            relay: Arc::new(crate::session::RelaySettings::new(&config)),
            config,
            tls,
            secrets,
            auth_method,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("tls: {0}")]
    Tls(#[from] crate::stream::TlsError),
    #[error("users: {0}")]
    Auth(#[from] AuthError),
}

/// Everything sessions share.
pub struct Proxy {
    live: std::sync::RwLock<Arc<Live>>,
    /// Every server socket, so a failover can cut those to the old primary.
    pub fences: Arc<Fences>,
    /// Where planned switchovers are requested.
    pub switchover: Option<SwitchoverHandle>,
    pub pools: Arc<Pools>,
    pub cluster: ClusterView,
    pub cancels: Arc<CancelRegistry>,
    client_slots: Arc<Semaphore>,
    max_clients: usize,
    next_client_id: AtomicU64,
    /// PgBouncer's PAUSE: while true, no new transaction gets a server (bounded by hold_ms).
    paused: watch::Sender<bool>,
    /// Shutdown's grace period is over: a session that ends now tells its client why.
    closing: std::sync::atomic::AtomicBool,
    /// The idle timeouts, read by every session while its client is idle: a reload changes
    /// them for clients already connected too.
    pub idle_limits: IdleLimits,
}

/// `idle_transaction_timeout_ms` and `client_idle_timeout_ms`, in microseconds (0: never).
#[derive(Default)]
pub struct IdleLimits {
    pub transaction: AtomicU64,
    pub client: AtomicU64,
}

impl IdleLimits {
    fn set(&self, config: &Config) {
        let ms = |ms: u64| ms.saturating_mul(1_000);
        self.transaction
            .store(ms(config.idle_transaction_timeout_ms), Ordering::Relaxed);
        self.client
            .store(ms(config.client_idle_timeout_ms), Ordering::Relaxed);
    }

    /// Either is set: sessions look at their idle time at all.
    pub fn any(&self) -> bool {
        self.transaction.load(Ordering::Relaxed) | self.client.load(Ordering::Relaxed) != 0
    }
}

impl Proxy {
    pub fn new(
        live: Live,
        cluster: ClusterView,
        fences: Arc<Fences>,
        pools: Arc<Pools>,
        switchover: Option<SwitchoverHandle>,
    ) -> Proxy {
        let max_clients = live.config.max_client_connections;
        let idle_limits = IdleLimits::default();
        idle_limits.set(&live.config);
        Proxy {
            live: std::sync::RwLock::new(Arc::new(live)),
            fences,
            switchover,
            pools,
            cluster,
            cancels: Arc::new(CancelRegistry::default()),
            client_slots: Arc::new(Semaphore::new(max_clients)),
            max_clients,
            next_client_id: AtomicU64::new(1),
            paused: watch::Sender::new(false),
            closing: std::sync::atomic::AtomicBool::new(false),
            idle_limits,
        }
    }

    /// Shutdown's grace period is over: sessions ended from now on send their client FATAL
    /// 57P01 as they close (see `Session`'s `Drop`).
    pub fn close_sessions(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// The configuration in force now (a reload replaces it).
    pub fn config(&self) -> Arc<Config> {
        self.live().config.clone()
    }

    /// What each relay reads from the configuration, including the session parameters each
    /// client keeps across servers.
    pub fn relay_settings(&self) -> Arc<crate::session::RelaySettings> {
        self.live().relay.clone()
    }

    fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts a new configuration in force: users and passwords, pool sizes, timeouts, TLS
    /// certificates. Existing connections are not touched. Returns the changed keys that only
    /// take effect after a restart.
    pub fn reload(&self, live: Live) -> Vec<String> {
        let old = self.config();
        let new = live.config.clone();
        let mut restart = Vec::new();
        let mut differs = |key: &str, a: String, b: String| {
            if a != b {
                restart.push(key.to_string());
            }
        };
        differs("listen", old.listen.clone(), new.listen.clone());
        differs(
            "admin_listen",
            old.admin_listen.clone(),
            new.admin_listen.clone(),
        );
        differs(
            "admin_token",
            old.admin_token.clone(),
            new.admin_token.clone(),
        );
        differs(
            "pool_mode",
            format!("{:?}", old.pool_mode),
            format!("{:?}", new.pool_mode),
        );
        differs(
            "max_client_connections",
            old.max_client_connections.to_string(),
            new.max_client_connections.to_string(),
        );
        differs("workers", old.workers.to_string(), new.workers.to_string());
        differs(
            "nodes",
            format!("{:?}", old.nodes),
            format!("{:?}", new.nodes),
        );
        differs(
            "coordination",
            format!("{:?}", old.coordination),
            format!("{:?}", new.coordination),
        );
        for pool in self.pools.all() {
            let user = pool.key.user.clone();
            let password = new
                .user(&user)
                .and_then(|u| u.server_login_password())
                .map(str::to_string);
            pool.reconfigure(
                new.pool_size_for(&user),
                password,
                new.server_connect_timeout(),
                new.server_tls,
            );
        }
        let idle_changed = (old.idle_transaction_timeout_ms, old.client_idle_timeout_ms)
            != (new.idle_transaction_timeout_ms, new.client_idle_timeout_ms);
        self.idle_limits.set(&live.config);
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
        if idle_changed {
            // Clients idle since before the reload are timed from now, not from their next
            // request.
            self.cancels.wake_all();
        }
        info!(restart_needed = ?restart, "configuration reloaded");
        restart
    }

    /// Holds new transactions until `resume` (the admin API's `POST /pause`).
    pub fn pause(&self) {
        self.paused.send_replace(true);
        info!("paused: new transactions wait for resume");
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
        info!("resumed");
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Waits while paused, at most `limit`; false if still paused afterwards.
    pub async fn wait_unpaused(&self, limit: Duration) -> bool {
        let mut rx = self.paused.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|paused| !paused))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Number of clients logged in or logging in.
    pub fn client_count(&self) -> usize {
        self.max_clients - self.client_slots.available_permits()
    }
}

/// Accepts clients until `shutdown` turns true.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => {
                    let proxy = proxy.clone();
                    let id = proxy.next_client_id.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(handle_client(proxy, tcp, addr, id));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => {
                info!("no longer accepting clients");
                return;
            }
        }
    }
}

/// A client that passed startup and authentication.
pub struct LoggedIn {
    pub stream: Stream,
    pub startup: StartupMessage,
    pub user: String,
    pub database: String,
    /// Session parameters to apply on every server the client uses.
    pub params: Vec<(String, String)>,
    /// Bytes the client already sent after its last authentication message.
    pub leftover: BytesMut,
    pub slot: OwnedSemaphorePermit,
}

/// One client connection's login. A client that logs in gets a task of its own for its
/// session, and this one ends: an idle client keeps only that task (its future a pointer to the
/// session's state and the relay's poll) and the session's one allocation.
async fn handle_client(proxy: Arc<Proxy>, tcp: TcpStream, addr: SocketAddr, id: u64) {
    let Some(session) = Box::pin(log_in(proxy, tcp, addr, id)).await else {
        return;
    };
    tokio::spawn(
        session
            .run()
            .instrument(debug_span!("client", client = id, %addr)),
    );
}

/// Startup, TLS, authentication and the first server: a client ready for its session.
async fn log_in(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    addr: SocketAddr,
    id: u64,
) -> Option<ClientSession> {
    let _ = tcp.set_nodelay(true);
    let slot = proxy.client_slots.clone().try_acquire_owned().ok();
    let login_timeout = proxy.config().client_login_timeout();
    // Login lines carry the client in an info span. The session's span is debug-level: entering
    // a span on every poll of the relay costs more than the relay's own work per transaction,
    // so the session's info and warning lines name the client in their fields instead.
    let span = info_span!("client", client = id, %addr);
    let outcome = tokio::time::timeout(login_timeout, login(&proxy, tcp, slot))
        .instrument(span.clone())
        .await;
    let logged_in = match outcome {
        Err(_) => {
            span.in_scope(|| debug!("login timed out after {login_timeout:?}"));
            metrics::client_login_failed(LoginFailure::Timeout);
            return None;
        }
        Ok(None) => return None,
        Ok(Some(l)) => l,
    };
    span.in_scope(|| info!(user = %logged_in.user, database = %logged_in.database, tls = logged_in.stream.is_tls(), "client logged in"));
    drop(span);
    metrics::client_connected();
    let session = ClientSession::start(proxy, logged_in, id)
        .instrument(debug_span!("client", client = id, %addr))
        .await;
    if session.is_none() {
        metrics::client_disconnected();
    }
    session
}

/// Sends a FATAL error and closes, best effort. Boxed: a rare path that should not make every
/// session's state larger.
pub fn refuse<'a>(
    stream: &'a mut Stream,
    error: &'a ClientError,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        let mut buf = BytesMut::new();
        error.encode(&mut buf);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = stream.write_all(&buf).await;
            let _ = stream.shutdown().await;
        })
        .await;
    })
}

/// Reads startup packets until a StartupMessage, handling SSL/GSS requests and cancels.
/// Returns `None` when the connection is done (cancel, refused, or gone).
async fn login(
    proxy: &Proxy,
    tcp: TcpStream,
    slot: Option<OwnedSemaphorePermit>,
) -> Option<LoggedIn> {
    let mut stream = Stream::Plain(tcp);
    let mut buf = BytesMut::with_capacity(256);
    let startup = loop {
        let packet = match read_startup(&mut stream, &mut buf).await {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => {
                debug!(error = %e, "bad startup packet");
                metrics::client_login_failed(LoginFailure::Protocol);
                refuse(&mut stream, &ClientError::from_wire(&e)).await;
                return None;
            }
        };
        match packet {
            StartupPacket::SslRequest => {
                if !buf.is_empty() {
                    // Bytes sent before the TLS handshake could be injected by a man in the middle.
                    refuse(
                        &mut stream,
                        &ClientError::protocol_violation(
                            "received unencrypted data after SSL request",
                        ),
                    )
                    .await;
                    return None;
                }
                let live = proxy.live();
                match (&stream, &live.tls) {
                    (Stream::Plain(_), Some(acceptor)) => {
                        let Stream::Plain(mut tcp) = stream else {
                            return None;
                        };
                        tcp.write_all(b"S").await.ok()?;
                        match acceptor.accept(tcp).await {
                            Ok(tls) => stream = Stream::Accepted(Box::new(tls)),
                            Err(e) => {
                                debug!(error = %e, "TLS handshake failed");
                                metrics::client_login_failed(LoginFailure::Tls);
                                return None;
                            }
                        }
                    }
                    (Stream::Plain(_), None) => stream.write_all(b"N").await.ok()?,
                    _ => {
                        refuse(
                            &mut stream,
                            &ClientError::protocol_violation(
                                "SSL request on an encrypted connection",
                            ),
                        )
                        .await;
                        return None;
                    }
                }
            }
            StartupPacket::GssEncRequest => stream.write_all(b"N").await.ok()?,
            StartupPacket::Cancel { pid, secret } => {
                proxy.cancels.cancel(pid, secret).await;
                return None;
            }
            StartupPacket::Startup(m) => break m,
        }
    };
    if startup.minor > 0 || !startup.protocol_options.is_empty() {
        let mut out = BytesMut::new();
        wire::negotiate_protocol_version(&mut out, 0, &startup.protocol_options);
        stream.write_all(&out).await.ok()?;
    }
    let (user, database, params) = match session_params(&startup) {
        Ok(p) => p,
        Err(e) => {
            refuse(&mut stream, &e).await;
            return None;
        }
    };
    match authenticate(proxy, &mut stream, &mut buf, &user).await {
        Ok(()) => {}
        Err(Some(e)) => {
            info!(user = %user, code = %e.code, "authentication failed: {}", e.message);
            metrics::client_login_failed(if e.code.starts_with("28") {
                LoginFailure::Auth
            } else {
                LoginFailure::Protocol
            });
            refuse(&mut stream, &e).await;
            return None;
        }
        Err(None) => return None,
    }
    let Some(slot) = slot else {
        warn!(user = %user, "refusing client: max_client_connections reached");
        metrics::client_login_failed(LoginFailure::TooManyClients);
        refuse(&mut stream, &ClientError::too_many_clients()).await;
        return None;
    };
    let mut out = BytesMut::new();
    wire::authentication_ok(&mut out);
    stream.write_all(&out).await.ok()?;
    Some(LoggedIn {
        stream,
        startup,
        user,
        database,
        params,
        leftover: buf,
        slot,
    })
}

async fn read_startup(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<Option<StartupPacket>, WireError> {
    loop {
        if let Some((packet, len)) = wire::parse_startup(buf)? {
            let _ = buf.split_to(len);
            return Ok(Some(packet));
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// User, database, and the settings to apply on server connections.
type SessionParams = (String, String, Vec<(String, String)>);

/// The user, database, and the parameters to set on server connections, from the startup
/// message: `options` is unpacked into its `-c name=value` settings.
fn session_params(startup: &StartupMessage) -> Result<SessionParams, ClientError> {
    let user = match startup.param("user") {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => return Err(ClientError::no_user_name()),
    };
    let database = match startup.param("database") {
        Some(d) if !d.is_empty() => d.to_string(),
        _ => user.clone(),
    };
    let mut params = Vec::new();
    for (name, value) in &startup.params {
        match name.as_str() {
            "user" | "database" => {}
            "replication" => {
                if !matches!(value.as_str(), "false" | "off" | "no" | "0") {
                    return Err(ClientError::replication_not_supported());
                }
            }
            "options" => params.extend(parse_options(value)?),
            _ => {
                if !valid_guc_name(name) {
                    return Err(ClientError::unsupported_startup_parameter(name));
                }
                params.push((name.clone(), value.clone()));
            }
        }
    }
    Ok((user, database, params))
}

fn valid_guc_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Parses libpq's `options` (`-c name=value`, `--name=value`, backslash escapes).
fn parse_options(options: &str) -> Result<Vec<(String, String)>, ClientError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut iter = words.into_iter();
    while let Some(w) = iter.next() {
        let setting = if w == "-c" {
            iter.next().ok_or_else(|| {
                ClientError::unsupported_startup_parameter("options (-c without a setting)")
            })?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(ClientError::unsupported_startup_parameter(&format!(
                "options ({w})"
            )));
        };
        let (name, value) = setting.split_once('=').ok_or_else(|| {
            ClientError::unsupported_startup_parameter(&format!("options ({setting})"))
        })?;
        let name = name.replace('-', "_");
        if !valid_guc_name(&name) {
            return Err(ClientError::unsupported_startup_parameter(&format!(
                "options ({name})"
            )));
        }
        out.push((name, value.to_string()));
    }
    Ok(out)
}

/// Runs the configured authentication exchange. `Err(None)` means the client went away (psql
/// does that to prompt for a password); `Err(Some(e))` is an error to send.
async fn authenticate(
    proxy: &Proxy,
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
) -> Result<(), Option<ClientError>> {
    let live = proxy.live();
    let secret = live.secrets.get(user);
    let known = live.config.user(user).is_some();
    let secret = if known { secret } else { None };
    let failed = || Some(ClientError::password_failed(user));
    let mut out = BytesMut::new();
    match live.auth_method {
        AuthMethod::Trust => {
            if !known {
                return Err(failed());
            }
            Ok(())
        }
        AuthMethod::Password => {
            wire::authentication_cleartext(&mut out);
            stream.write_all(&out).await.map_err(|_| None)?;
            let body = read_password_message(stream, buf).await?;
            let response = wire::parse_password_message(&body)
                .map_err(|e| Some(ClientError::from_wire(&e)))?;
            auth::verify_cleartext(user, secret, response).map_err(|e| auth_error(e, user))
        }
        AuthMethod::Md5 => {
            let salt = auth::md5_salt();
            wire::authentication_md5(&mut out, salt);
            stream.write_all(&out).await.map_err(|_| None)?;
            let body = read_password_message(stream, buf).await?;
            let response = wire::parse_password_message(&body)
                .map_err(|e| Some(ClientError::from_wire(&e)))?;
            auth::verify_md5(user, secret, salt, response).map_err(|e| auth_error(e, user))
        }
        AuthMethod::ScramSha256 => {
            let mut scram = ScramServer::new(user, secret);
            wire::authentication_sasl(&mut out, ScramServer::mechanisms());
            stream.write_all(&out).await.map_err(|_| None)?;
            let body = read_password_message(stream, buf).await?;
            let initial = wire::parse_sasl_initial_response(&body)
                .map_err(|e| Some(ClientError::from_wire(&e)))?;
            let server_first = scram
                .client_first(initial.mechanism, initial.data)
                .map_err(|e| auth_error(e, user))?;
            out.clear();
            wire::authentication_sasl_continue(&mut out, &server_first);
            stream.write_all(&out).await.map_err(|_| None)?;
            let body = read_password_message(stream, buf).await?;
            let server_final = scram.client_final(&body).map_err(|e| auth_error(e, user))?;
            out.clear();
            wire::authentication_sasl_final(&mut out, &server_final);
            stream.write_all(&out).await.map_err(|_| None)?;
            Ok(())
        }
    }
}

fn auth_error(e: AuthError, user: &str) -> Option<ClientError> {
    match e {
        AuthError::Protocol(message) => Some(ClientError::protocol_violation(message)),
        AuthError::Failed => Some(ClientError::password_failed(user)),
        AuthError::MethodUnavailable(why) => {
            warn!(user = %user, "cannot authenticate: {why}");
            Some(ClientError::password_failed(user))
        }
    }
}

/// Reads one 'p' message during authentication.
async fn read_password_message(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<BytesMut, Option<ClientError>> {
    loop {
        match wire::take_message(buf, MAX_AUTH_MESSAGE) {
            Ok(Some((b'p', body))) => return Ok(body),
            Ok(Some((tag, _))) => {
                return Err(Some(ClientError::protocol_violation(format!(
                    "expected password response, got message type {}",
                    tag as char
                ))))
            }
            Ok(None) => {}
            Err(e) => return Err(Some(ClientError::from_wire(&e))),
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_unpacked_into_settings() {
        let got =
            parse_options("-c statement_timeout=5s --search-path=a,b -cwork_mem=4MB -c x.y=a\\ b")
                .expect("valid options");
        assert_eq!(
            got,
            vec![
                ("statement_timeout".to_string(), "5s".to_string()),
                ("search_path".to_string(), "a,b".to_string()),
                ("work_mem".to_string(), "4MB".to_string()),
                ("x.y".to_string(), "a b".to_string()),
            ]
        );
    }

    #[test]
    fn unsupported_options_are_refused() {
        assert!(parse_options("-d 5").is_err());
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c noequals").is_err());
    }
}
