//! Server connections: connect, TLS, log in, keep track of the server's parameters, reset.
//!
//! Control traffic here (login, `SET`, reset) is parsed with `postgres-protocol`; relayed client
//! traffic never passes through this module's parsers.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::cancel::CancelTarget;
use crate::config::ServerTlsMode;
use crate::params::ParamSet;
use crate::prepared::ServerStatements;
use crate::stream::{self, Stream};

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// Where a server connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTarget {
    pub node: Arc<str>,
    pub host: Arc<str>,
    pub port: u16,
}

/// How pgswitch logs in to PostgreSQL for one pool.
#[derive(Clone)]
pub struct ServerLogin {
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub tls: ServerTlsMode,
    pub connect_timeout: Duration,
    pub fences: Arc<Fences>,
    /// How long a connection lives before it is replaced (jittered per connection).
    pub lifetime: Duration,
}

/// Every open server socket by node address, so a failover can cut all connections to the old
/// primary at once — even to a hung one, whose sockets would otherwise wait for TCP timeouts.
/// Each entry holds a duplicate of the socket's descriptor, so cutting never touches a reused
/// descriptor number.
///
/// Fences also keep, per node, when one of its server connections last finished answering a
/// client: the failover controller's proof that a primary whose diagnosis failed still serves.
#[derive(Default)]
pub struct Fences {
    conns: Mutex<HashMap<u64, (String, u16, OwnedFd)>>,
    answered: Mutex<HashMap<(String, u16), Arc<AtomicU64>>>,
}

/// Removes a connection from `Fences` when it closes.
pub struct FenceGuard {
    id: u64,
    fences: Arc<Fences>,
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        self.fences.lock().remove(&self.id);
    }
}

impl Fences {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (String, u16, OwnedFd)>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(
        self: &Arc<Self>,
        id: u64,
        target: &ServerTarget,
        socket: &impl AsFd,
    ) -> Option<FenceGuard> {
        let dup = socket.as_fd().try_clone_to_owned().ok()?;
        self.lock()
            .insert(id, (target.host.to_string(), target.port, dup));
        Some(FenceGuard {
            id,
            fences: self.clone(),
        })
    }

    /// Where the server connections to `target` record their answers.
    fn answered_slot(&self, target: &ServerTarget) -> Arc<AtomicU64> {
        let mut answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        answered
            .entry((target.host.to_string(), target.port))
            .or_default()
            .clone()
    }

    /// Whether a server connection to `host:port` finished answering a client at or after
    /// `since`.
    pub fn answered_since(&self, host: &str, port: u16, since: Instant) -> bool {
        let answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        answered
            .get(&(host.to_string(), port))
            .is_some_and(|at| at.load(Ordering::Relaxed) >= crate::clock::micros(since))
    }

    /// Shuts down every server socket to `host:port`; the sessions using them see the
    /// connection end at once. Returns how many were cut.
    pub fn cut(&self, host: &str, port: u16) -> usize {
        let conns = self.lock();
        let mut cut = 0;
        for (h, p, fd) in conns.values() {
            if h == host && *p == port {
                let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Both);
                cut += 1;
            }
        }
        cut
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect to node {node} ({addr}): {source}")]
    Connect {
        node: Arc<str>,
        addr: String,
        source: io::Error,
    },
    #[error("timed out after {0:?} connecting to node {1}")]
    Timeout(Duration, Arc<str>),
    #[error("node {0} does not accept TLS (server_tls = require)")]
    TlsRefused(Arc<str>),
    #[error("TLS towards node {0}: {1}")]
    Tls(Arc<str>, String),
    #[error("{message}")]
    Postgres {
        severity: String,
        code: String,
        message: String,
    },
    #[error("node {0} asked for a password, but none is configured for user {1}")]
    NoPassword(Arc<str>, String),
    #[error("node {0} asked for an unsupported authentication method")]
    UnsupportedAuth(Arc<str>),
    #[error("protocol error from node {0}: {1}")]
    Protocol(Arc<str>, String),
    #[error("server connection lost: {0}")]
    Io(#[from] io::Error),
}

impl ServerError {
    /// PostgreSQL refused because it is shutting down or not yet up (SQLSTATE 57P0x).
    pub fn is_shutdown(&self) -> bool {
        matches!(self, ServerError::Postgres { code, .. } if code.starts_with("57P"))
    }

    /// The SQLSTATE a client sees for this failure.
    pub fn sqlstate(&self) -> &str {
        match self {
            ServerError::Postgres { code, .. } => code,
            ServerError::NoPassword(..) | ServerError::UnsupportedAuth(..) => "28000",
            _ => "08006",
        }
    }
}

/// An open, logged-in connection to a PostgreSQL server.
pub struct ServerConn {
    _fence: Option<FenceGuard>,
    pub id: u64,
    pub target: ServerTarget,
    pub stream: Stream,
    /// Where a cancel for this connection goes: its host and BackendKeyData (shared with the
    /// cancel slot of the client using it, so attaching copies no string).
    pub cancel: Arc<CancelTarget>,
    /// When a connection to this node last finished answering a client ([`crate::clock`]),
    /// shared by all of the node's connections (see [`Fences::answered_since`]).
    pub answered: Arc<AtomicU64>,
    /// Values the server reported with ParameterStatus.
    pub params: BTreeMap<String, String>,
    /// Values pgswitch set on this connection that the server does not report.
    pub applied: BTreeMap<String, String>,
    /// Bytes read from the server and not yet handled: after a control exchange, what is owed
    /// to the next client. While a client is attached, this is the relay's read buffer.
    pub pending: BytesMut,
    /// The relay's write buffer towards this server, kept with the connection between clients.
    pub outgoing: BytesMut,
    /// The relay's write buffer towards the client it serves, lent with the connection: a
    /// client whose answer was all written at the end of its transaction hands it back here,
    /// so the next client needs no buffer of its own to answer into.
    pub client_out: BytesMut,
    /// The relay's answer tracker (empty), kept with the connection between clients like the
    /// buffers: its queue's allocation stays here, not with an idle client.
    pub tracker: crate::prepared::Tracker,
    /// `ParamSet::id` of the client parameters this connection was last found to match; 0 once
    /// any parameter changed since.
    pub synced_params: u64,
    /// Transaction mode: the pgswitch-named prepared statements that exist on this server.
    pub statements: ServerStatements,
    pub created: Instant,
    /// When the connection was last used ([`crate::clock::now_micros`]).
    pub last_used: u64,
    /// When this connection is to be replaced (`server_lifetime_ms` ± 10 %), on the same clock.
    pub expires: u64,
    /// Topology epoch the connection was opened in; a connection from an older epoch is closed.
    pub epoch: u64,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}@{}", self.id, self.target.node)
    }
}

impl ServerConn {
    /// Opens a TCP connection, negotiates TLS as configured, and logs in.
    pub async fn connect(
        target: &ServerTarget,
        login: &ServerLogin,
        epoch: u64,
    ) -> Result<ServerConn, ServerError> {
        match tokio::time::timeout(
            login.connect_timeout,
            Self::connect_inner(target, login, epoch),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(ServerError::Timeout(
                login.connect_timeout,
                target.node.clone(),
            )),
        }
    }

    async fn connect_inner(
        target: &ServerTarget,
        login: &ServerLogin,
        epoch: u64,
    ) -> Result<ServerConn, ServerError> {
        let stream =
            dial(&target.host, target.port)
                .await
                .map_err(|source| ServerError::Connect {
                    node: target.node.clone(),
                    addr: match socket_path(&target.host, target.port) {
                        Some(path) => path.display().to_string(),
                        None => format!("{}:{}", target.host, target.port),
                    },
                    source,
                })?;
        let id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        let now = crate::clock::now_micros();
        let fence = login.fences.register(id, target, &stream);
        let stream = match stream {
            Stream::Plain(tcp) => {
                stream::tune_server_socket(&tcp, login.connect_timeout.max(Duration::from_secs(5)));
                negotiate_tls(tcp, target, login.tls).await?
            }
            local => local,
        };
        let mut conn = ServerConn {
            _fence: fence,
            id,
            target: target.clone(),
            stream,
            cancel: Arc::new(CancelTarget {
                host: target.host.clone(),
                port: target.port,
                pid: 0,
                secret: 0,
            }),
            answered: login.fences.answered_slot(target),
            params: BTreeMap::new(),
            applied: BTreeMap::new(),
            pending: BytesMut::new(),
            outgoing: BytesMut::new(),
            client_out: BytesMut::new(),
            tracker: crate::prepared::Tracker::default(),
            synced_params: 0,
            statements: ServerStatements::default(),
            created: Instant::now(),
            last_used: now,
            expires: now.saturating_add(crate::clock::duration_micros(
                login.lifetime.mul_f64(0.9 + 0.2 * rand::random::<f64>()),
            )),
            epoch,
        };
        conn.login(login).await?;
        Ok(conn)
    }

    async fn login(&mut self, login: &ServerLogin) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", login.user.as_str()),
                ("database", login.database.as_str()),
            ],
            &mut out,
        )?;
        self.stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let mut scram: Option<ScramSha256> = None;
        loop {
            let message = self.read_message(&mut buf).await?;
            out.clear();
            match message {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let password = self.password(login)?;
                    frontend::password_message(password.as_bytes(), &mut out)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let password = self.password(login)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        login.user.as_bytes(),
                        password.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == "SCRAM-SHA-256";
                    }
                    if !has_scram {
                        return Err(ServerError::UnsupportedAuth(self.target.node.clone()));
                    }
                    let password = self.password(login)?;
                    let client =
                        ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", client.message(), &mut out)?;
                    scram = Some(client);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("unexpected SASL continue"))?;
                    client.update(body.data())?;
                    frontend::sasl_response(client.message(), &mut out)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("unexpected SASL final"))?;
                    client.finish(body.data())?;
                }
                Message::ParameterStatus(body) => {
                    self.param_reported(body.name()?, body.value()?);
                }
                Message::BackendKeyData(body) => {
                    self.cancel = Arc::new(CancelTarget {
                        pid: body.process_id() as u32,
                        secret: body.secret_key() as u32,
                        ..CancelTarget::clone(&self.cancel)
                    });
                }
                Message::ReadyForQuery(_) => {
                    self.pending = buf;
                    return Ok(());
                }
                Message::ErrorResponse(body) => return Err(postgres_error(body.fields())?),
                Message::NoticeResponse(_) => {}
                _ => {
                    return Err(ServerError::UnsupportedAuth(self.target.node.clone()));
                }
            }
            if !out.is_empty() {
                self.stream.write_all(&out).await?;
            }
        }
    }

    fn password<'a>(&self, login: &'a ServerLogin) -> Result<&'a str, ServerError> {
        login
            .password
            .as_deref()
            .ok_or_else(|| ServerError::NoPassword(self.target.node.clone(), login.user.clone()))
    }

    fn protocol(&self, what: &str) -> ServerError {
        ServerError::Protocol(self.target.node.clone(), what.to_string())
    }

    async fn read_message(&mut self, buf: &mut BytesMut) -> Result<Message, ServerError> {
        loop {
            if let Some(message) = Message::parse(buf)? {
                return Ok(message);
            }
            if self.stream.read_buf(buf).await? == 0 {
                return Err(ServerError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }

    /// Runs a control query and waits for ReadyForQuery. ParameterStatus updates are recorded;
    /// the first error, if any, is returned after the server is ready again.
    pub async fn simple_query(&mut self, sql: &str) -> Result<(), ServerError> {
        self.query_rows(sql).await.map(drop)
    }

    /// [`Self::simple_query`] that returns the rows (values as text; `None` for NULL).
    async fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.stream.write_all(&out).await?;
        self.last_used = crate::clock::now_micros();
        let mut rows = Vec::new();
        self.read_rows_until_ready(&mut rows).await?;
        Ok(rows)
    }

    /// Reads the answers to a control request up to ReadyForQuery, recording ParameterStatus
    /// updates; the first error, if any, is returned once the server is ready again.
    async fn read_until_ready(&mut self) -> Result<(), ServerError> {
        self.read_rows_until_ready(&mut Vec::new()).await
    }

    /// [`Self::read_until_ready`] that also keeps the values of each DataRow in `rows` (text;
    /// `None` for NULL).
    async fn read_rows_until_ready(
        &mut self,
        rows: &mut Vec<Vec<Option<String>>>,
    ) -> Result<(), ServerError> {
        let mut buf = std::mem::take(&mut self.pending);
        let mut first_error = None;
        loop {
            match self.read_message(&mut buf).await? {
                Message::ParameterStatus(body) => {
                    self.param_reported(body.name()?, body.value()?);
                }
                Message::DataRow(body) => {
                    let mut values = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(range) = ranges.next()? {
                        values.push(
                            range.map(|r| String::from_utf8_lossy(&body.buffer()[r]).into_owned()),
                        );
                    }
                    rows.push(values);
                }
                Message::ErrorResponse(body) => {
                    let e = postgres_error(body.fields())?;
                    first_error.get_or_insert(e);
                }
                Message::ReadyForQuery(_) => {
                    self.pending = buf;
                    return first_error.map_or(Ok(()), Err);
                }
                _ => {}
            }
        }
    }

    /// Sends complete Parse messages and a Sync, and waits for the server to be ready: the
    /// statements a session had on a server that went away.
    pub async fn prepare_again(&mut self, parses: &[bytes::Bytes]) -> Result<(), ServerError> {
        if parses.is_empty() {
            return Ok(());
        }
        let mut out = BytesMut::new();
        for p in parses {
            out.extend_from_slice(p);
        }
        frontend::sync(&mut out);
        self.stream.write_all(&out).await?;
        self.read_until_ready().await
    }

    /// Makes the server's session parameters match what a client asked for, with one round trip
    /// of `set_config` calls for the values that differ. `set_config` parses a value the way
    /// a startup packet does, so list settings (`search_path = 'a,b'`) keep their meaning. A
    /// value pgswitch set on this connection for an earlier client, which this client did not
    /// ask for, is reset to the server's default (`set_config(name, NULL, …)`): one client's
    /// startup `search_path` or `statement_timeout` never reaches another.
    pub async fn sync_params(&mut self, wanted: &ParamSet) -> Result<(), ServerError> {
        if self.params_match(wanted) {
            return Ok(());
        }
        let mut calls = Vec::new();
        for (name, value) in wanted.values() {
            if self.current_param(name) == Some(value.as_str()) {
                continue;
            }
            calls.push(format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(value)
            ));
        }
        let stale: Vec<String> = self
            .applied
            .keys()
            .filter(|name| wanted.get(name).is_none())
            .cloned()
            .collect();
        for name in &stale {
            calls.push(format!(
                "pg_catalog.set_config({}, NULL, false)",
                quote_literal(name)
            ));
        }
        if !calls.is_empty() {
            self.simple_query(&format!("SELECT {}", calls.join(", ")))
                .await?;
        }
        for name in &stale {
            self.applied.remove(name);
        }
        for (name, value) in wanted.values() {
            if !self.reports(name.as_bytes()) {
                self.applied.insert(name.clone(), value.clone());
            }
        }
        self.synced_params = wanted.id();
        Ok(())
    }

    /// Whether the connection already has every value of `wanted`, and nothing pgswitch set
    /// for another client, without a round trip. A connection that last matched this very set
    /// (nothing changed since) is not compared again.
    pub fn params_match(&mut self, wanted: &ParamSet) -> bool {
        if self.synced_params == wanted.id() {
            return true;
        }
        let all = wanted
            .values()
            .iter()
            .all(|(name, value)| self.current_param(name) == Some(value.as_str()))
            && self.applied.keys().all(|name| wanted.get(name).is_some());
        if all {
            self.synced_params = wanted.id();
        }
        all
    }

    /// The server's current values of the parameters it does not report that pgswitch keeps
    /// for clients: each of `names` (tracked, not reported by this server) and each value
    /// pgswitch set here. One round trip; the values are recorded as what this connection
    /// has, and returned. Used after a client's transaction changed some of them (`SET
    /// search_path`, `RESET ALL`, `set_config(…)`), which no ParameterStatus reports.
    pub async fn read_params(
        &mut self,
        names: &[String],
    ) -> Result<Vec<(String, String)>, ServerError> {
        let mut asked: Vec<String> = names
            .iter()
            .filter(|n| !self.reports(n.as_bytes()))
            .cloned()
            .collect();
        for name in self.applied.keys() {
            if !asked.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                asked.push(name.clone());
            }
        }
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        let columns: Vec<String> = asked
            .iter()
            .map(|n| format!("pg_catalog.current_setting({}, true)", quote_literal(n)))
            .collect();
        let row = self
            .query_rows(&format!("SELECT {}", columns.join(", ")))
            .await?
            .pop()
            .ok_or_else(|| self.protocol("no row for the parameters read back"))?;
        self.synced_params = 0;
        let mut read = Vec::new();
        for (name, value) in asked.into_iter().zip(row) {
            // NULL: a custom parameter no longer defined (RESET ALL of a placeholder).
            let Some(value) = value else {
                self.applied.remove(&name);
                continue;
            };
            self.applied.insert(name.clone(), value.clone());
            read.push((name, value));
        }
        Ok(read)
    }

    /// Session mode: every parameter the session changed on this server (`SET`, a startup
    /// value pgswitch set, `set_config(…)`), its role, and the current value of each of
    /// `names`, so the session can be moved to another server with all of them. One round trip.
    pub async fn read_session_params(
        &mut self,
        names: &[String],
    ) -> Result<Vec<(String, String)>, ServerError> {
        let mut listed: Vec<String> = names.iter().map(|n| quote_literal(n)).collect();
        listed.push(quote_literal("role"));
        let sql = format!(
            "SELECT n, pg_catalog.current_setting(n, true) FROM pg_catalog.unnest(ARRAY[{}]) AS n \
             UNION SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
             WHERE source = 'session'",
            listed.join(", ")
        );
        let rows = self.query_rows(&sql).await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let mut values = row.into_iter();
                Some((values.next()??, values.next()??))
            })
            .collect())
    }

    /// The server reports changes of parameter `name` (any ASCII case) with ParameterStatus.
    pub fn reports(&self, name: &[u8]) -> bool {
        self.params
            .keys()
            .any(|k| k.as_bytes().eq_ignore_ascii_case(name))
    }

    /// pgswitch set parameter `name` (any ASCII case) on this connection, for some client.
    pub fn has_applied(&self, name: &[u8]) -> bool {
        self.applied
            .keys()
            .any(|k| k.as_bytes().eq_ignore_ascii_case(name))
    }

    /// The server reported a new value: the connection no longer provably matches any set.
    pub fn param_reported(&mut self, name: &str, value: &str) {
        self.synced_params = 0;
        match self.params.get_mut(name) {
            Some(v) => {
                v.clear();
                v.push_str(value);
            }
            None => {
                self.params.insert(name.to_string(), value.to_string());
            }
        }
    }

    /// The value a session parameter has on this connection, as far as pgswitch knows.
    fn current_param(&self, name: &str) -> Option<&str> {
        // Exact names first (what the server reports), then any spelling.
        if let Some(v) = self.params.get(name).or_else(|| self.applied.get(name)) {
            return Some(v);
        }
        self.params
            .iter()
            .chain(self.applied.iter())
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Runs the reset query before the connection goes back to the pool.
    pub async fn reset(&mut self, reset_query: &str) -> Result<(), ServerError> {
        self.applied.clear();
        self.synced_params = 0;
        self.statements.clear();
        if reset_query.is_empty() {
            return Ok(());
        }
        self.simple_query(reset_query).await
    }

    /// True when the server closed the connection or sent something unsolicited while idle
    /// (such as a FATAL before a shutdown): such a connection must not be handed out.
    pub fn is_closed(&mut self) -> bool {
        if !self.pending.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        // Known-unreadable sockets answer without a system call or a waker registration.
        if let Some(read) = self.stream.try_read_raw(&mut probe) {
            return !matches!(read, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        }
        let mut read_buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut read_buf)
            .is_ready()
    }

    /// Sends Terminate and closes, best effort.
    pub async fn close(mut self) {
        crate::metrics::server_connection_closed(&self.target.node);
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            let _ = self.stream.write_all(&out).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    target: &ServerTarget,
    mode: ServerTlsMode,
) -> Result<Stream, ServerError> {
    if mode == ServerTlsMode::Disable {
        return Ok(Stream::Plain(tcp));
    }
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await?;
    let answer = tcp.read_u8().await?;
    match (answer, mode) {
        (b'S', _) => {
            let tls_err = |e: String| ServerError::Tls(target.node.clone(), e);
            let connector = stream::server_side_connector().map_err(|e| tls_err(e.to_string()))?;
            let name = stream::server_name(&target.host).map_err(|e| tls_err(e.to_string()))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| tls_err(e.to_string()))?;
            Ok(Stream::Connected(Box::new(tls)))
        }
        (b'N', ServerTlsMode::Prefer) => Ok(Stream::Plain(tcp)),
        (b'N', _) => Err(ServerError::TlsRefused(target.node.clone())),
        _ => Err(ServerError::Protocol(
            target.node.clone(),
            "unexpected answer to SSLRequest".into(),
        )),
    }
}

fn postgres_error(
    mut fields: postgres_protocol::message::backend::ErrorFields<'_>,
) -> Result<ServerError, io::Error> {
    let mut severity = String::from("ERROR");
    let mut code = String::from("XX000");
    let mut message = String::new();
    while let Some(field) = fields.next()? {
        match field.type_() {
            b'V' => severity = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    Ok(ServerError::Postgres {
        severity,
        code,
        message,
    })
}

/// Quotes a string literal for SQL with standard_conforming_strings semantics (`E''` is not
/// needed because backslashes are escaped too).
pub fn quote_literal(value: &str) -> String {
    if value.contains('\\') {
        format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

/// The Unix-domain socket a node `host` names, as libpq reads it: a host that is an absolute path
/// is the directory holding PostgreSQL's socket `.s.PGSQL.<port>`.
pub fn socket_path(host: &str, port: u16) -> Option<PathBuf> {
    host.starts_with('/')
        .then(|| PathBuf::from(host).join(format!(".s.PGSQL.{port}")))
}

/// Connects to a node as libpq does: through the socket in a socket directory, or over TCP.
async fn dial(host: &str, port: u16) -> io::Result<Stream> {
    Ok(match socket_path(host, port) {
        Some(path) => Stream::Local(UnixStream::connect(path).await?),
        None => Stream::Plain(TcpStream::connect((host, port)).await?),
    })
}

/// Sends a CancelRequest for a server backend, on a fresh connection as the protocol requires.
pub async fn send_cancel(target: &CancelTarget) -> io::Result<()> {
    let mut socket = tokio::time::timeout(Duration::from_secs(5), dial(&target.host, target.port))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "cancel connect timed out"))??;
    socket
        .write_all(&crate::wire::cancel_request(target.pid, target.secret))
        .await?;
    // The server closes the connection once it has read the request.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
    }

    #[test]
    fn a_node_answered_since_only_after_a_later_answer() {
        let fences = Fences::default();
        let target = ServerTarget {
            node: "n0".into(),
            host: "127.0.0.1".into(),
            port: 5432,
        };
        let before = Instant::now();
        assert!(
            !fences.answered_since("127.0.0.1", 5432, before),
            "never answered"
        );
        let slot = fences.answered_slot(&target);
        assert!(
            Arc::ptr_eq(&slot, &fences.answered_slot(&target)),
            "one slot per node"
        );
        std::thread::sleep(Duration::from_millis(2));
        slot.store(crate::clock::now_micros(), Ordering::Relaxed);
        assert!(fences.answered_since("127.0.0.1", 5432, before));
        assert!(
            !fences.answered_since("127.0.0.1", 5433, before),
            "another node"
        );
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            !fences.answered_since("127.0.0.1", 5432, Instant::now()),
            "no answer after a later start"
        );
    }
}
