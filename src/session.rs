//! A logged-in client: its server connection and the relay loop between the two sockets.
//!
//! The relay knows sockets and message boundaries (type + length), not message layouts: bytes
//! read from one side are scanned for boundaries and written to the other side as they are.
//! Both directions flow independently inside one task, so a server that writes while the
//! client is still sending (pipelines, COPY with notices) never deadlocks the proxy.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio_util::io::{poll_read_buf, poll_write_buf};
use tracing::{debug, info, warn};

use crate::cancel::{CancelKey, CancelTarget};
use crate::client_error::ClientError;
use crate::frontend::{refuse, LoggedIn, Proxy};
use crate::pool::{Pool, PoolKey, PooledServer};
use crate::backend::ServerLogin;
use crate::stream::Stream;
use crate::wire::{self, Scanner, Severity, Step, WireError};

/// Bytes buffered towards one side before the relay stops reading from the other.
const HIGH_WATER: usize = 256 * 1024;
/// How much one read asks for.
const READ_CHUNK: usize = 32 * 1024;

pub struct ClientSession;

impl ClientSession {
    /// Runs a session in session pooling mode until the client leaves.
    pub async fn run(proxy: Arc<Proxy>, login: LoggedIn, id: u64, addr: SocketAddr) {
        let LoggedIn {
            mut stream,
            user,
            database,
            params,
            leftover,
            slot: _slot,
            ..
        } = login;
        let pool = pool_for(&proxy, &user, &database);
        let wait = proxy.config.pool_timeout();
        let mut server = match pool.acquire(&proxy.cluster, wait).await {
            Ok(s) => s,
            Err(e) => {
                warn!(pool = %pool.key, error = %e, "no server for client");
                refuse(&mut stream, &ClientError::from_pool(&e, Severity::Fatal)).await;
                return;
            }
        };
        if let Err(e) = server.conn.sync_params(&params).await {
            refuse(&mut stream, &ClientError::from_server(&e, Severity::Fatal)).await;
            server.discard();
            return;
        }
        let cancel = proxy.cancels.register();
        cancel.slot.set(Some(cancel_target(&server)));
        info!(server = server.conn.id, node = %server.conn.target.node, "client attached to server");

        let mut greeting = BytesMut::new();
        for (name, value) in &server.conn.params {
            wire::parameter_status(&mut greeting, name, value);
        }
        wire::backend_key_data(&mut greeting, cancel.pid, cancel.secret);
        wire::ready_for_query(&mut greeting, b'I');
        greeting.extend_from_slice(&server.conn.pending.split());
        let mut relay = Relay::new(proxy.config.max_message_bytes);
        relay.to_client = greeting;
        relay.to_server = leftover;
        if let Err(e) = relay.scan_client(0) {
            finish_protocol_error(&mut stream, server, &cancel, e).await;
            return;
        }

        let end = std::future::poll_fn(|cx| relay.poll(cx, &mut stream, &mut server.conn.stream)).await;
        cancel.slot.set(None);
        debug!(?end, client = id, %addr, "session ending");
        match end {
            RelayEnd::ClientLeft => {
                return_server(&proxy, server, &relay).await;
            }
            RelayEnd::ClientGone(e) => {
                debug!(error = %e, "client connection lost");
                return_server(&proxy, server, &relay).await;
            }
            RelayEnd::ClientProtocol(e) => {
                finish_protocol_error(&mut stream, server, &cancel, e).await;
            }
            RelayEnd::ServerGone(e) => {
                warn!(server = server.conn.id, node = %server.conn.target.node, error = %e, "server connection lost");
                proxy.cluster.report_server_failure();
                server.discard();
                // Whatever the server already sent goes out before the error.
                let _ = stream.write_all(&relay.to_client).await;
                refuse(&mut stream, &ClientError::server_connection_lost(Severity::Fatal)).await;
            }
        }
    }
}

fn pool_for(proxy: &Proxy, user: &str, database: &str) -> Arc<Pool> {
    let config = &proxy.config;
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
                },
                config.pool_size_for(user),
            )
        },
    )
}

fn cancel_target(server: &PooledServer) -> CancelTarget {
    CancelTarget {
        host: server.conn.target.host.clone(),
        port: server.conn.target.port,
        pid: server.conn.backend_pid,
        secret: server.conn.backend_secret,
    }
}

async fn finish_protocol_error(stream: &mut Stream, server: PooledServer, cancel: &CancelKey, e: WireError) {
    info!(error = %e, "closing client after protocol violation");
    cancel.slot.set(None);
    cancel_and_discard(server);
    refuse(stream, &ClientError::from_wire(&e)).await;
}

/// Cancels whatever the server runs, then closes it.
fn cancel_and_discard(server: PooledServer) {
    let target = cancel_target(&server);
    tokio::spawn(async move {
        let _ = crate::backend::send_cancel(&target.host, target.port, target.pid, target.secret).await;
    });
    server.discard();
}

/// Puts the server back in its pool if it is provably idle, after the reset query; otherwise
/// cancels what it is running and closes it.
async fn return_server(proxy: &Proxy, mut server: PooledServer, relay: &Relay) {
    if !relay.server_is_idle() {
        debug!(server = server.conn.id, "client left mid-query: cancelling and closing the server connection");
        cancel_and_discard(server);
        return;
    }
    let reset = async {
        if relay.server_status != b'I' {
            server.conn.simple_query("ROLLBACK").await?;
        }
        server.conn.reset(&proxy.config.server_reset_query).await
    };
    match tokio::time::timeout(Duration::from_secs(5), reset).await {
        Ok(Ok(())) => server.release(),
        Ok(Err(e)) => {
            debug!(error = %e, "server reset failed; closing it");
            server.discard();
        }
        Err(_) => server.discard(),
    }
}

/// Why a relay stopped.
#[derive(Debug)]
enum RelayEnd {
    /// The client sent Terminate.
    ClientLeft,
    /// The client's socket closed or failed.
    ClientGone(io::Error),
    /// The client broke the protocol (e.g. a message over the size limit).
    ClientProtocol(WireError),
    /// The server's socket closed or failed.
    ServerGone(io::Error),
}

/// The state of one client↔server byte relay.
struct Relay {
    /// Read from the client, not yet written to the server.
    to_server: BytesMut,
    /// Read from the server, not yet written to the client.
    to_client: BytesMut,
    client_scan: Scanner,
    server_scan: Scanner,
    /// Status byte of the server's last ReadyForQuery.
    server_status: u8,
    /// Requests (Query, Sync, FunctionCall) sent that have no ReadyForQuery back yet.
    awaiting_ready: usize,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The client sent Terminate: stop reading it.
    client_done: bool,
    /// A partial message went to the server that will never be completed.
    server_dirty: bool,
    max_message: usize,
}

impl Relay {
    fn new(max_message: usize) -> Relay {
        Relay {
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            client_scan: Scanner::new(),
            server_scan: Scanner::new(),
            server_status: b'I',
            awaiting_ready: 0,
            unsynced: false,
            client_done: false,
            server_dirty: false,
            max_message,
        }
    }

    /// The server has answered everything and sits between transactions or in one.
    fn server_is_idle(&self) -> bool {
        self.awaiting_ready == 0
            && !self.unsynced
            && !self.server_dirty
            && self.to_server.is_empty()
            && self.server_scan.at_boundary()
            && self.client_scan.at_boundary()
    }

    /// Scans client bytes from `from` to the end of `to_server`: counts requests, stops at
    /// Terminate (which never reaches a pooled server), enforces the size limit.
    fn scan_client(&mut self, from: usize) -> Result<(), WireError> {
        let mut pos = 0;
        let mut cut = None;
        {
            let chunk = &self.to_server[from..];
            while let Some(step) = self.client_scan.step(chunk, &mut pos, self.max_message)? {
                if let Step::Header { tag, at, .. } = step {
                    match tag {
                        b'Q' | b'F' => self.awaiting_ready += 1,
                        b'S' => {
                            self.awaiting_ready += 1;
                            self.unsynced = false;
                        }
                        b'X' => {
                            match at {
                                Some(at) => cut = Some(from + at),
                                None => {
                                    self.server_dirty = true;
                                    cut = Some(from);
                                }
                            }
                            break;
                        }
                        b'H' => {}
                        b'P' | b'B' | b'D' | b'E' | b'C' => self.unsynced = true,
                        _ => {}
                    }
                }
            }
        }
        if let Some(cut) = cut {
            self.to_server.truncate(cut);
            self.client_done = true;
        }
        Ok(())
    }

    /// Scans server bytes from `from`: follows ReadyForQuery.
    fn scan_server(&mut self, from: usize) -> Result<(), WireError> {
        let mut pos = 0;
        let chunk = &self.to_client[from..];
        while let Some(step) = self.server_scan.step(chunk, &mut pos, usize::MAX)? {
            if let Step::End { tag: b'Z', end } = step {
                self.server_status = chunk[end - 1];
                self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Moves bytes both ways until one side ends.
    fn poll(&mut self, cx: &mut Context<'_>, client: &mut Stream, server: &mut Stream) -> Poll<RelayEnd> {
        loop {
            let mut progress = false;
            while !self.to_server.is_empty() {
                match poll_write_buf(Pin::new(&mut *server), cx, &mut self.to_server) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(RelayEnd::ServerGone(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ServerGone(e)),
                    Poll::Pending => break,
                }
            }
            while !self.to_client.is_empty() {
                match poll_write_buf(Pin::new(&mut *client), cx, &mut self.to_client) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(RelayEnd::ClientGone(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ClientGone(e)),
                    Poll::Pending => break,
                }
            }
            if self.client_done && self.to_server.is_empty() {
                return Poll::Ready(RelayEnd::ClientLeft);
            }
            if !self.client_done && self.to_server.len() < HIGH_WATER {
                match poll_read_more(&mut self.to_server, client, cx) {
                    Poll::Ready(Ok((_, 0))) => return Poll::Ready(RelayEnd::ClientGone(io::ErrorKind::UnexpectedEof.into())),
                    Poll::Ready(Ok((from, _))) => {
                        if let Err(e) = self.scan_client(from) {
                            return Poll::Ready(RelayEnd::ClientProtocol(e));
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ClientGone(e)),
                    Poll::Pending => {}
                }
            }
            if self.to_client.len() < HIGH_WATER {
                match poll_read_more(&mut self.to_client, server, cx) {
                    Poll::Ready(Ok((_, 0))) => return Poll::Ready(RelayEnd::ServerGone(io::ErrorKind::UnexpectedEof.into())),
                    Poll::Ready(Ok((from, _))) => {
                        if let Err(e) = self.scan_server(from) {
                            return Poll::Ready(RelayEnd::ServerGone(io::Error::new(io::ErrorKind::InvalidData, e)));
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ServerGone(e)),
                    Poll::Pending => {}
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

/// Reads into the end of `buf`; returns where the new bytes start and how many arrived.
fn poll_read_more(buf: &mut BytesMut, io: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<(usize, usize)>> {
    let from = buf.len();
    buf.reserve(READ_CHUNK);
    let n = ready!(poll_read_buf(Pin::new(io), cx, buf))?;
    Poll::Ready(Ok((from, n)))
}
