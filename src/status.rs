//! The command-line side of the admin API: `pgswitch status` and `pgswitch switchover`.
//!
//! A tiny HTTP/1.1 client (hyper's client connection over a tokio `TcpStream`) talks to
//! `admin_listen`; plain `http://` only, as the admin API serves no TLS.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// Where `pgswitch status` looks when neither `--admin` nor `PGSWITCH_ADMIN` is given.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9930";

/// Largest answer accepted from the admin API.
const MAX_ANSWER: usize = 16 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed `http://host:port[/prefix]` admin URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    /// `host:port`, what the TCP connection goes to and the `Host` header says.
    pub authority: String,
    /// Path prefix (no trailing slash), for an admin API behind a path-routing proxy.
    pub prefix: String,
}

impl AdminUrl {
    pub fn parse(url: &str) -> anyhow::Result<AdminUrl> {
        let url = url.trim();
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            bail!("{url}: the admin API speaks plain http (put a TLS proxy in front if needed, and point --admin at it with http:// locally)");
        } else if url.contains("://") {
            bail!("{url}: only http:// admin URLs are supported");
        } else {
            url
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            bail!("{url}: no host in the admin URL");
        }
        let has_port = match authority.rfind(']') {
            Some(close) => authority[close..].contains(':'),
            None => authority.contains(':'),
        };
        let authority = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(AdminUrl {
            authority,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// An answer from the admin API.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
}

impl Answer {
    /// The `error` field of a JSON error answer, or the whole body.
    pub fn error_message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| self.body.trim().to_string())
    }
}

/// Sends one request to the admin API and reads the whole answer, within `limit`.
pub async fn request(
    url: &AdminUrl,
    method: Method,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
    limit: Duration,
) -> anyhow::Result<Answer> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&url.authority))
        .await
        .map_err(|_| anyhow!("cannot reach the admin API at {}: no answer within {CONNECT_TIMEOUT:?}", url.authority))?
        .with_context(|| format!("cannot reach the admin API at {} (is pgswitch running? see admin_listen, --admin, PGSWITCH_ADMIN)", url.authority))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP handshake with the admin API")?;
    let driver = tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("{}{}", url.prefix, path))
        .header(header::HOST, url.authority.as_str())
        .header(
            header::USER_AGENT,
            concat!("pgswitch/", env!("CARGO_PKG_VERSION")),
        );
    if body.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .context("PGSWITCH_ADMIN_TOKEN holds characters not allowed in an HTTP header")?;
        builder = builder.header(header::AUTHORIZATION, value);
    }
    let req = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .context("building the request")?;
    let exchange = async {
        let resp = sender
            .send_request(req)
            .await
            .context("sending the request")?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the answer: {e}"))?
            .to_bytes();
        Ok::<_, anyhow::Error>(Answer {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    };
    let result = tokio::time::timeout(limit, exchange).await;
    driver.abort();
    result.map_err(|_| anyhow!("the admin API did not answer within {limit:?}"))?
}

fn token_from_env() -> Option<String> {
    std::env::var(crate::admin::TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// `pgswitch status`: prints the cluster as a table, or the raw JSON with `json`.
pub async fn run_status(admin: &str, json: bool) -> anyhow::Result<()> {
    let url = AdminUrl::parse(admin)?;
    let answer = request(
        &url,
        Method::GET,
        "/status",
        None,
        None,
        Duration::from_secs(10),
    )
    .await?;
    if !answer.status.is_success() {
        bail!(
            "GET /status answered {}: {}",
            answer.status,
            answer.error_message()
        );
    }
    if json {
        println!("{}", answer.body.trim_end());
        return Ok(());
    }
    let status: Status = serde_json::from_str(&answer.body).with_context(|| {
        format!(
            "GET /status answered something that is not a status: {}",
            answer.body.trim()
        )
    })?;
    print!("{}", render_table(&status));
    Ok(())
}

/// `pgswitch healthcheck` (hidden; the container's HEALTHCHECK): succeeds when `GET /health`
/// answers 200 within 3 s. Needs nothing in the image but pgswitch itself.
pub async fn run_healthcheck(admin: &str) -> anyhow::Result<()> {
    let url = AdminUrl::parse(admin)?;
    let answer = request(
        &url,
        Method::GET,
        "/health",
        None,
        None,
        Duration::from_secs(3),
    )
    .await?;
    if !answer.status.is_success() {
        bail!(
            "GET /health answered {}: {}",
            answer.status,
            answer.error_message()
        );
    }
    Ok(())
}

/// `pgswitch switchover --to NODE`: asks for a planned switchover and prints the answer.
/// Errors (any non-2xx answer) make the command exit with 1.
pub async fn run_switchover(admin: &str, to: &str) -> anyhow::Result<()> {
    let url = AdminUrl::parse(admin)?;
    let body = serde_json::json!({ "to": to }).to_string();
    let token = token_from_env();
    eprintln!(
        "switchover to {to}: asking pgswitch at {}...",
        url.authority
    );
    let started = Instant::now();
    let call = request(
        &url,
        Method::POST,
        "/switchover",
        Some(body),
        token.as_deref(),
        Duration::from_secs(600),
    );
    tokio::pin!(call);
    // A switchover waits for the candidate to catch up: show that it is still going.
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(2),
        Duration::from_secs(2),
    );
    let answer = loop {
        tokio::select! {
            answer = &mut call => break answer?,
            _ = ticker.tick() => {
                eprintln!("switchover to {to}: in progress ({} s)", started.elapsed().as_secs());
            }
        }
    };
    if !answer.status.is_success() {
        bail!(
            "switchover to {to} refused ({}): {}",
            answer.status,
            answer.error_message()
        );
    }
    println!("{}", answer.body.trim_end());
    eprintln!(
        "switchover to {to}: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `GET /status`, as the CLI reads it: every field optional, so a newer or older server still
/// prints.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    pub version: String,
    pub epoch: u64,
    pub primary: Option<String>,
    pub ready: bool,
    pub ready_reason: Option<String>,
    /// Why there is no primary, or why a failover did not happen.
    pub reason: Option<String>,
    pub paused: bool,
    pub pool_mode: String,
    pub clients: u64,
    pub max_client_connections: u64,
    pub nodes: Vec<NodeRow>,
    pub pools: Vec<PoolRow>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct NodeRow {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub role: String,
    pub healthy: bool,
    pub timeline: Option<u32>,
    pub lsn: Option<String>,
    pub replay_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub replay_lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub latency_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// A former primary kept out of service until it rejoins as a standby.
    pub quarantined: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PoolRow {
    pub pool: String,
    pub user: String,
    pub database: String,
    pub size: u64,
    pub clients_active: u64,
    pub clients_waiting: u64,
    pub servers_active: u64,
    pub servers_idle: u64,
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Lays out rows under headers, columns separated by two spaces.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// The human-readable form of `GET /status`.
pub fn render_table(s: &Status) -> String {
    let mut out = String::new();
    let ready = if s.ready {
        "yes".to_string()
    } else {
        format!(
            "NO ({})",
            s.ready_reason.as_deref().unwrap_or("unknown reason")
        )
    };
    let _ = writeln!(
        out,
        "epoch {}  primary {}  ready {}{}",
        s.epoch,
        s.primary.as_deref().unwrap_or("NONE"),
        ready,
        if s.paused { "  PAUSED" } else { "" }
    );
    let _ = writeln!(
        out,
        "pool_mode {}  clients {}/{}  pgswitch {}",
        s.pool_mode, s.clients, s.max_client_connections, s.version
    );
    if let Some(reason) = &s.reason {
        let _ = writeln!(out, "reason: {reason}");
    }
    out.push('\n');
    let nodes: Vec<Vec<String>> = s
        .nodes
        .iter()
        .map(|n| {
            let health = if n.healthy {
                "up".to_string()
            } else if n.consecutive_failures > 0 {
                format!("DOWN x{}", n.consecutive_failures)
            } else {
                "DOWN".to_string()
            };
            let role = if s.primary.as_deref() == Some(n.name.as_str()) {
                format!("{} *", n.role)
            } else if n.quarantined {
                format!("{} QUARANTINED", n.role)
            } else {
                n.role.clone()
            };
            vec![
                n.name.clone(),
                format!("{}:{}", n.host, n.port),
                role,
                health,
                opt(&n.timeline),
                opt(&n.lsn),
                opt(&n.replay_lsn),
                opt(&n.lag_bytes),
                opt(&n.replay_lag_bytes),
                n.lag_seconds
                    .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
                n.latency_ms
                    .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
                n.last_error
                    .as_deref()
                    .map(|e| e.lines().next().unwrap_or_default().to_string())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "NODE",
            "ADDRESS",
            "ROLE",
            "HEALTH",
            "TL",
            "LSN",
            "REPLAY_LSN",
            "LAG_BYTES",
            "REPLAY_LAG_BYTES",
            "LAG_S",
            "LATENCY_MS",
            "ERROR",
        ],
        &nodes,
    ));
    out.push('\n');
    if s.pools.is_empty() {
        out.push_str("no pools yet (a pool opens with its first client)\n");
    } else {
        let pools: Vec<Vec<String>> = s
            .pools
            .iter()
            .map(|p| {
                let name = if p.pool.is_empty() {
                    format!("{}/{}", p.user, p.database)
                } else {
                    p.pool.clone()
                };
                vec![
                    name,
                    p.size.to_string(),
                    p.clients_active.to_string(),
                    p.clients_waiting.to_string(),
                    p.servers_active.to_string(),
                    p.servers_idle.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "POOL (user/db)",
                "SIZE",
                "CL_ACTIVE",
                "CL_WAITING",
                "SV_ACTIVE",
                "SV_IDLE",
            ],
            &pools,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_parse() {
        let u = |s| AdminUrl::parse(s).map_err(|e| e.to_string());
        assert_eq!(
            u("http://127.0.0.1:9930"),
            Ok(AdminUrl {
                authority: "127.0.0.1:9930".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            u("localhost:9930/"),
            Ok(AdminUrl {
                authority: "localhost:9930".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            u("http://[::1]/pgswitch/"),
            Ok(AdminUrl {
                authority: "[::1]:80".into(),
                prefix: "/pgswitch".into()
            })
        );
        assert_eq!(
            u("http://[::1]:9930"),
            Ok(AdminUrl {
                authority: "[::1]:9930".into(),
                prefix: String::new()
            })
        );
        assert!(u("https://x:1").is_err_and(|e| e.contains("plain http")));
        assert!(u("ftp://x").is_err());
        assert!(u("http:///x").is_err());
    }

    #[test]
    fn status_renders_as_a_table() {
        let text = r#"{"version":"0.1.0","epoch":2,"primary":"n0","ready":true,"paused":false,
            "pool_mode":"session","clients":1,"max_client_connections":100,
            "nodes":[{"name":"n0","host":"127.0.0.1","port":5432,"role":"primary","healthy":true,
                      "timeline":1,"lsn":"0/3000148","lag_bytes":0,"latency_ms":1.25},
                     {"name":"n1","host":"127.0.0.1","port":5433,"role":"unknown","healthy":false,
                      "consecutive_failures":3,"last_error":"connection refused\nmore"},
                     {"name":"n2","host":"127.0.0.1","port":5434,"role":"primary","healthy":true,
                      "timeline":1,"quarantined":true}],
            "pools":[{"pool":"app/postgres","user":"app","database":"postgres","size":20,
                      "clients_active":1,"clients_waiting":0,"servers_active":1,"servers_idle":2}],
            "future_field":true}"#;
        let status: Status = serde_json::from_str(text).unwrap_or_default();
        let out = render_table(&status);
        assert!(out.starts_with("epoch 2  primary n0  ready yes\n"), "{out}");
        assert!(out.contains("clients 1/100"), "{out}");
        let n0 = out
            .lines()
            .find(|l| l.starts_with("n0 "))
            .unwrap_or_default();
        assert!(
            n0.contains("primary *") && n0.contains("0/3000148") && n0.contains("1.2"),
            "{out}"
        );
        let n1 = out
            .lines()
            .find(|l| l.starts_with("n1 "))
            .unwrap_or_default();
        assert!(
            n1.contains("DOWN x3") && n1.ends_with("connection refused"),
            "{out}"
        );
        let n2 = out
            .lines()
            .find(|l| l.starts_with("n2 "))
            .unwrap_or_default();
        assert!(n2.contains("primary QUARANTINED  up"), "{out}");
        assert!(
            out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["app/postgres", "20", "1", "0", "1", "2"]),
            "{out}"
        );
    }

    #[test]
    fn not_ready_and_empty_pools_are_said() {
        let status = Status {
            ready: false,
            ready_reason: Some("no primary".into()),
            paused: true,
            ..Status::default()
        };
        let out = render_table(&status);
        assert!(
            out.contains("primary NONE  ready NO (no primary)  PAUSED"),
            "{out}"
        );
        assert!(out.contains("no pools yet"), "{out}");
    }
}
