//! The admin HTTP API on `admin_listen`: metrics, health, readiness, status, and the changing
//! endpoints (pause, resume, switchover).
//!
//! | endpoint           | answer                                                               |
//! |--------------------|----------------------------------------------------------------------|
//! | `GET /metrics`     | Prometheus text format (state gauges refreshed at each scrape)       |
//! | `GET /health`      | 200 `ok` while the process runs                                      |
//! | `GET /ready`       | 200 when writes can be routed now; 503 with `{"ready":false,"reason"}` |
//! | `GET /status`      | JSON: epoch, primary, nodes, pools, clients (what `pgswitch status` prints) |
//! | `POST /pause`      | hold new transactions (PgBouncer's PAUSE, bounded by `failover.hold_ms`) |
//! | `POST /resume`     | release them                                                         |
//! | `POST /switchover` | `{"to":"n1"}`: planned switchover (503 until failover lands)         |
//!
//! Access control. The reading endpoints (`GET`) are open to whoever reaches `admin_listen`,
//! like PgBouncer's SHOW commands to its stats users: they reveal topology and counters, no
//! secrets. The changing endpoints (`POST`) need `Authorization: Bearer <token>` when a token is
//! set (config key `admin_token`, or the environment variable `PGSWITCH_ADMIN_TOKEN`, which
//! wins; read at start). Without a token they are
//! accepted only from loopback peers: `admin_listen` defaults to `127.0.0.1:9930`, so by default
//! only local processes (or `docker exec`) reach them; binding `admin_listen` to another address
//! without a token keeps the changing endpoints closed to remote peers (403), and a warning is
//! logged at start.
//!
//! Every error is JSON (`{"error": "..."}`) with 400/401/403/404/405/409/413/503; nothing a
//! client sends can panic the server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use crate::cluster::{NodeStatus, Topology};
use crate::config::PoolMode;
use crate::frontend::Proxy;
use crate::metrics;
use crate::pool::PoolStatus;

/// Environment variable holding the bearer token for the changing endpoints.
pub const TOKEN_ENV: &str = "PGSWITCH_ADMIN_TOKEN";

/// Content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Largest request body accepted (only `/switchover` reads one).
const MAX_BODY: usize = 64 * 1024;
/// Most admin connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often histogram samples are folded into buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// What the handlers share.
pub struct Admin {
    proxy: Arc<Proxy>,
    token: Option<String>,
}

impl Admin {
    /// `token`: bearer token for the changing endpoints; `None` = loopback peers only.
    pub fn new(proxy: Arc<Proxy>, token: Option<String>) -> Admin {
        Admin { proxy, token }
    }

    /// The token is `PGSWITCH_ADMIN_TOKEN` when set (so containers can inject it without
    /// writing it into the config file), else the config's `admin_token`; empty = none.
    pub fn from_config(proxy: Arc<Proxy>) -> Admin {
        let token = std::env::var(TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| Some(proxy.config().admin_token.trim().to_string()))
            .filter(|t| !t.is_empty());
        Admin::new(proxy, token)
    }
}

/// Serves the admin API on `listener` until `shutdown` turns true (or its sender is dropped).
pub async fn serve(listener: TcpListener, admin: Admin, mut shutdown: watch::Receiver<bool>) {
    let admin = Arc::new(admin);
    let local = listener.local_addr().ok();
    if admin.token.is_none() && local.is_some_and(|a| !a.ip().to_canonical().is_loopback()) {
        warn!(
            addr = ?local,
            "admin API listens beyond loopback without admin_token: pause/resume/switchover are refused to non-loopback peers"
        );
    }
    metrics::install();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        debug!(%peer, "too many admin connections; closing");
                        continue;
                    };
                    let admin = admin.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        serve_connection(admin, tcp, peer, shutdown).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = upkeep.tick() => metrics::run_upkeep(),
            _ = shutdown.changed() => {
                info!("admin API stopped");
                return;
            }
        }
    }
}

async fn serve_connection(
    admin: Arc<Admin>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |req| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(handle(&admin, peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

type Resp = Response<Full<Bytes>>;

/// Routes one request. Never panics; every error is a JSON answer.
pub async fn handle(admin: &Admin, peer: SocketAddr, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let read = method == Method::GET || method == Method::HEAD;
    let response = match path.as_str() {
        "/metrics" | "/health" | "/ready" | "/status" if !read => method_not_allowed("GET, HEAD"),
        "/metrics" => metrics_page(admin),
        "/health" => text(StatusCode::OK, "ok\n"),
        "/ready" => ready(admin),
        "/status" => json(StatusCode::OK, &status_report(&admin.proxy)),
        "/pause" | "/resume" | "/switchover" if method != Method::POST => {
            method_not_allowed("POST")
        }
        "/pause" | "/resume" | "/switchover" => {
            match authorize(admin.token.as_deref(), peer, req.headers()) {
                Some(denied) => denied,
                None => match path.as_str() {
                    "/pause" => {
                        admin.proxy.pause();
                        json(StatusCode::OK, &serde_json::json!({ "paused": true }))
                    }
                    "/resume" => {
                        admin.proxy.resume();
                        json(StatusCode::OK, &serde_json::json!({ "paused": false }))
                    }
                    _ => switchover(admin, req).await,
                },
            }
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    };
    debug!(%peer, %method, %path, status = response.status().as_u16(), "admin request");
    response
}

fn metrics_page(admin: &Admin) -> Resp {
    let topology = admin.proxy.cluster.current();
    let body = metrics::scrape(&admin.proxy, &topology);
    with_type(StatusCode::OK, body.into(), METRICS_CONTENT_TYPE)
}

/// Why writes cannot be routed now, if they cannot. The failover hold and the etcd lease add
/// their reasons here when they land.
pub fn readiness(proxy: &Proxy, topology: &Topology) -> Result<(), String> {
    if proxy.is_paused() {
        return Err("paused by the admin API (POST /resume to resume)".into());
    }
    if topology.holding {
        return Err(format!(
            "holding new transactions: {}",
            topology.reason.as_deref().unwrap_or("failover in progress")
        ));
    }
    if topology.primary.is_none() {
        return Err(format!(
            "no primary: {}",
            topology
                .reason
                .as_deref()
                .unwrap_or("no node is serving writes")
        ));
    }
    Ok(())
}

fn ready(admin: &Admin) -> Resp {
    let topology = admin.proxy.cluster.current();
    match readiness(&admin.proxy, &topology) {
        Ok(()) => json(
            StatusCode::OK,
            &serde_json::json!({
                "ready": true,
                "primary": primary_name(&topology),
                "epoch": topology.epoch,
            }),
        ),
        Err(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "ready": false, "reason": reason }),
        ),
    }
}

fn primary_name(topology: &Topology) -> Option<&str> {
    topology
        .primary
        .and_then(|i| topology.nodes.get(i))
        .map(|n| n.name.as_str())
}

/// `GET /status`: what `pgswitch status` prints.
#[derive(Debug, Serialize)]
pub struct StatusReport<'a> {
    pub version: &'static str,
    pub epoch: u64,
    pub primary: Option<&'a str>,
    pub ready: bool,
    pub ready_reason: Option<String>,
    /// Why there is no primary, or why the last failover did not happen (or was not needed).
    pub reason: Option<&'a str>,
    /// A failover or switchover is running: new transactions wait.
    pub holding: bool,
    pub paused: bool,
    pub pool_mode: PoolMode,
    pub clients: usize,
    pub max_client_connections: usize,
    pub nodes: Vec<NodeReport<'a>>,
    pub pools: Vec<PoolReport>,
}

#[derive(Debug, Serialize)]
pub struct NodeReport<'a> {
    #[serde(flatten)]
    pub node: &'a NodeStatus,
    /// Received WAL behind the primary's current LSN, in bytes (0 for the primary).
    pub lag_bytes: Option<u64>,
    /// Replayed WAL behind the primary's current LSN, in bytes.
    pub replay_lag_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct PoolReport {
    /// `user/database`, as in the metrics' `pool` label.
    pub pool: String,
    #[serde(flatten)]
    pub status: PoolStatus,
    /// Clients holding a server connection of this pool now.
    pub clients_active: usize,
}

fn status_report(proxy: &Proxy) -> serde_json::Value {
    let topology = proxy.cluster.current();
    let ready = readiness(proxy, &topology);
    let report = StatusReport {
        version: env!("CARGO_PKG_VERSION"),
        epoch: topology.epoch,
        primary: primary_name(&topology),
        ready: ready.is_ok(),
        ready_reason: ready.err(),
        reason: topology.reason.as_deref(),
        holding: topology.holding,
        paused: proxy.is_paused(),
        pool_mode: proxy.config().pool_mode,
        clients: proxy.client_count(),
        max_client_connections: proxy.config().max_client_connections,
        nodes: topology
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let (lag_bytes, replay_lag_bytes) = metrics::node_lag(&topology, i);
                NodeReport {
                    node,
                    lag_bytes,
                    replay_lag_bytes,
                }
            })
            .collect(),
        pools: proxy
            .pools
            .all()
            .iter()
            .map(|p| {
                let status = p.status();
                PoolReport {
                    pool: format!("{}/{}", status.user, status.database),
                    clients_active: status.servers_active,
                    status,
                }
            })
            .collect(),
    };
    serde_json::to_value(&report)
        .unwrap_or_else(|e| serde_json::json!({ "error": format!("cannot encode status: {e}") }))
}

/// Checks the bearer token, or that the peer is local when no token is configured; returns the
/// refusal to send, if any.
fn authorize(token: Option<&str>, peer: SocketAddr, headers: &HeaderMap) -> Option<Resp> {
    match token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            match given {
                Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => None,
                _ => {
                    let mut resp = error(
                        StatusCode::UNAUTHORIZED,
                        "this endpoint needs Authorization: Bearer <token> (admin_token / PGSWITCH_ADMIN_TOKEN)",
                    );
                    resp.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    Some(resp)
                }
            }
        }
        None if peer.ip().to_canonical().is_loopback() => None,
        None => Some(error(
            StatusCode::FORBIDDEN,
            "changing endpoints are open to loopback peers only unless admin_token (or PGSWITCH_ADMIN_TOKEN) is set",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /switchover` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    pub to: String,
}

/// Validates a switchover request against the current topology: the target must be a known
/// node that is not already the primary.
pub fn validate_switchover(
    topology: &Topology,
    request: &SwitchoverRequest,
) -> Result<(), (StatusCode, String)> {
    let Some(index) = topology.nodes.iter().position(|n| n.name == request.to) else {
        let known: Vec<&str> = topology.nodes.iter().map(|n| n.name.as_str()).collect();
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "unknown node \"{}\" (nodes: {})",
                request.to,
                known.join(", ")
            ),
        ));
    };
    if topology.primary == Some(index) {
        return Err((
            StatusCode::CONFLICT,
            format!("{} is already the primary", request.to),
        ));
    }
    Ok(())
}

async fn switchover(admin: &Admin, req: Request<Incoming>) -> Resp {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return if e.is::<http_body_util::LengthLimitError>() {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over {MAX_BODY} bytes"),
                )
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
            };
        }
    };
    let request: SwitchoverRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected a JSON body like {{\"to\":\"n1\"}}: {e}"),
            )
        }
    };
    let topology = admin.proxy.cluster.current();
    if let Err((status, message)) = validate_switchover(&topology, &request) {
        return error(status, message);
    }
    let Some(handle) = admin.proxy.switchover.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "switchover is not available: no failover controller runs",
        );
    };
    info!(to = %request.to, "switchover requested through the admin API");
    match handle.switchover(&request.to).await {
        Ok(message) => json(
            StatusCode::OK,
            &serde_json::json!({ "result": message, "primary": request.to }),
        ),
        Err(message) => error(StatusCode::CONFLICT, message),
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            with_type(status, body.into(), "application/json")
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the answer: {e}\n"),
        ),
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    json(status, &serde_json::json!({ "error": message.into() }))
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

fn text(status: StatusCode, body: &str) -> Resp {
    with_type(
        status,
        Bytes::copy_from_slice(body.as_bytes()),
        "text/plain; charset=utf-8",
    )
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Resp {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Diagnosis, Role};

    fn topology() -> Topology {
        let node = |name: &str, role| NodeStatus {
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            diagnosis: Diagnosis {
                role,
                timeline: Some(1),
                lsn: None,
                replay_lsn: None,
                ..Diagnosis::default()
            },
            healthy: true,
            latency_ms: None,
            consecutive_failures: 0,
            last_error: None,
            ..NodeStatus::unknown(name, "127.0.0.1", 5432)
        };
        Topology {
            epoch: 1,
            primary: Some(0),
            holding: false,
            reason: None,
            nodes: vec![node("n0", Role::Primary), node("n1", Role::Standby)],
        }
    }

    #[test]
    fn switchover_requests_are_validated() {
        let t = topology();
        let req = |to: &str| SwitchoverRequest { to: to.into() };
        assert!(validate_switchover(&t, &req("n1")).is_ok());
        let (status, message) = validate_switchover(&t, &req("n9"))
            .err()
            .unwrap_or((StatusCode::OK, String::new()));
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            message.contains("unknown node \"n9\"") && message.contains("n0, n1"),
            "{message}"
        );
        let (status, _) = validate_switchover(&t, &req("n0"))
            .err()
            .unwrap_or((StatusCode::OK, String::new()));
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(serde_json::from_str::<SwitchoverRequest>(r#"{"to":"n1","x":1}"#).is_err());
        assert!(serde_json::from_str::<SwitchoverRequest>(r#"{"too":"n1"}"#).is_err());
    }

    #[test]
    fn changing_endpoints_need_the_token_or_a_loopback_peer() {
        let local: SocketAddr = ([127, 0, 0, 1], 5000).into();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap_or(local);
        let remote: SocketAddr = ([10, 1, 2, 3], 5000).into();
        let none = HeaderMap::new();
        let mut good = HeaderMap::new();
        good.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0k"),
        );
        let mut bad = HeaderMap::new();
        bad.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0kk"),
        );
        let status = |r: Option<Resp>| r.map(|r| r.status());
        // No token: loopback peers only.
        assert_eq!(status(authorize(None, local, &none)), None);
        assert_eq!(status(authorize(None, mapped, &none)), None);
        assert_eq!(
            status(authorize(None, remote, &none)),
            Some(StatusCode::FORBIDDEN)
        );
        // A token: everyone must show it, local peers too.
        assert_eq!(status(authorize(Some("t0k"), remote, &good)), None);
        assert_eq!(
            status(authorize(Some("t0k"), local, &none)),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            status(authorize(Some("t0k"), remote, &bad)),
            Some(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn tokens_compare_in_constant_time() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
