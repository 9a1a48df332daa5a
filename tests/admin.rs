//! The admin HTTP API, `/metrics` (checked by promtool and scraped by a real Prometheus server)
//! and the `pgswitch status` / `switchover` commands, against a real PostgreSQL cluster.
//! Every wait is bounded.

mod common;
#[path = "common/panic_watch.rs"]
mod panic_watch;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{within, TestEnv};
use hyper::{Method, StatusCode};
use pgswitch::admin::METRICS_CONTENT_TYPE;
use pgswitch::harness::ClusterSpec;
use pgswitch::metrics::sample;
use pgswitch::status::{request, AdminUrl, Answer};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const STEP: Duration = Duration::from_secs(30);

/// A cluster (primary + `standbys`) with pgswitch in front, its admin API on a port the OS picks.
async fn env(standbys: usize) -> TestEnv {
    env_with(standbys, |_| {}).await
}

/// `env`, with the config changed further by `tweak`.
async fn env_with(standbys: usize, tweak: impl FnOnce(&mut pgswitch::config::Config)) -> TestEnv {
    panic_watch::install();
    TestEnv::start(
        ClusterSpec {
            standbys,
            ..ClusterSpec::default()
        },
        |c| {
            c.admin_listen = "127.0.0.1:0".into();
            tweak(c);
        },
    )
    .await
}

fn url(addr: SocketAddr) -> AdminUrl {
    AdminUrl::parse(&format!("http://{addr}")).unwrap_or_else(|e| panic!("{e:#}"))
}

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Answer {
    let what = format!("{method} {path}");
    within(
        &what,
        STEP,
        request(
            &url(addr),
            method,
            path,
            body.map(str::to_string),
            token,
            STEP,
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    call(addr, Method::GET, path, None, None).await
}

async fn post(addr: SocketAddr, path: &str, body: Option<&str>) -> Answer {
    call(addr, Method::POST, path, body, None).await
}

fn json(answer: &Answer) -> Value {
    serde_json::from_str(&answer.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", answer.body))
}

fn assert_status(answer: &Answer, want: StatusCode) {
    assert_eq!(answer.status, want, "body: {}", answer.body);
}

/// An error answer: the wanted status and a JSON `error` containing `needle`.
fn assert_error(answer: &Answer, want: StatusCode, needle: &str) {
    assert_status(answer, want);
    let error = json(answer)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains(needle),
        "error {error:?} does not contain {needle:?}"
    );
}

/// Polls `path` until `done` accepts the answer, up to 30 s.
async fn wait_for(
    addr: SocketAddr,
    path: &str,
    what: &str,
    done: impl Fn(&Answer) -> bool,
) -> Answer {
    let deadline = Instant::now() + STEP;
    loop {
        let answer = get(addr, path).await;
        if done(&answer) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: GET {path} never got there; last answer {} {}",
            answer.status,
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn must_sample(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Runs the pgswitch binary with `args` (and extra environment) to completion.
async fn pgswitch(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let what = format!("pgswitch {}", args.join(" "));
    within(
        &what,
        STEP,
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgswitch"));
            cmd.args(&args)
                .env_remove("PGSWITCH_ADMIN")
                .env_remove("PGSWITCH_ADMIN_TOKEN")
                .stdin(Stdio::null());
            for (k, v) in envs {
                cmd.env(k, v);
            }
            cmd.output()
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"))
    .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A raw request, for what a well-behaved client never sends.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    within("raw request", STEP, async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(bytes).await.expect("write");
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_status_pause_resume_and_errors() {
    let env = env(2).await;
    let admin = env.proxy.admin_addr;
    assert!(admin.ip().is_loopback() && admin.port() != 0, "{admin}");

    let health = get(admin, "/health").await;
    assert_status(&health, StatusCode::OK);
    assert_eq!(health.body, "ok\n");

    let ready = wait_for(admin, "/ready", "ready with a primary", |a| {
        a.status == StatusCode::OK
    })
    .await;
    assert_eq!(json(&ready)["primary"], "n0");

    let status = json(&get(admin, "/status").await);
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{status}");
    let primaries: Vec<&Value> = nodes.iter().filter(|n| n["role"] == "primary").collect();
    assert_eq!(primaries.len(), 1, "{status}");
    assert_eq!(primaries[0]["name"], "n0");
    assert_eq!(primaries[0]["lag_bytes"], 0);
    assert_eq!(status["primary"], "n0");
    assert_eq!(status["ready"], true);
    assert_eq!(status["paused"], false);
    assert_eq!(status["pool_mode"], "session");
    assert!(status["epoch"].is_u64(), "{status}");
    for n in nodes {
        assert_eq!(n["healthy"], true, "{status}");
        assert!(n["timeline"].is_u64() && n["lsn"].is_string(), "{status}");
    }
    let standby = nodes.iter().find(|n| n["name"] == "n1").expect("n1");
    assert_eq!(standby["role"], "standby");
    assert!(standby["lag_bytes"].is_u64(), "{status}");

    // A client through the proxy shows up in the pools.
    let client = env.connect().await;
    within("query", STEP, client.simple_query("SELECT 1"))
        .await
        .expect("SELECT 1");
    let status = json(&get(admin, "/status").await);
    let pool = &status["pools"][0];
    assert_eq!(pool["pool"], "app/postgres", "{status}");
    assert_eq!(pool["clients_active"], 1, "{status}");
    assert_eq!(pool["servers_active"], 1, "{status}");
    assert_eq!(status["clients"], 1, "{status}");

    // Pause: /ready turns 503 with the reason; resume turns it back.
    let paused = post(admin, "/pause", None).await;
    assert_status(&paused, StatusCode::OK);
    assert_eq!(json(&paused)["paused"], true);
    let ready = get(admin, "/ready").await;
    assert_status(&ready, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&ready)["ready"], false);
    assert!(
        json(&ready)["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("paused"),
        "{}",
        ready.body
    );
    assert_eq!(json(&get(admin, "/status").await)["paused"], true);
    let metrics = get(admin, "/metrics").await.body;
    assert_eq!(must_sample(&metrics, "pgswitch_paused"), 1.0);
    assert_status(&post(admin, "/resume", None).await, StatusCode::OK);
    assert_status(&get(admin, "/ready").await, StatusCode::OK);
    within("query after resume", STEP, client.simple_query("SELECT 2"))
        .await
        .expect("SELECT 2 after resume");

    // Switchover: validated for real, then refused until failover lands.
    let sw = |body: &'static str| post(admin, "/switchover", Some(body));
    assert_error(
        &sw(r#"{"to":"n9"}"#).await,
        StatusCode::BAD_REQUEST,
        "unknown node \"n9\"",
    );
    assert_error(
        &sw(r#"{"to":"n0"}"#).await,
        StatusCode::CONFLICT,
        "already the primary",
    );
    assert_error(
        &sw("not json").await,
        StatusCode::BAD_REQUEST,
        "expected a JSON body",
    );
    assert_error(
        &sw(r#"{"to":"n1","force":1}"#).await,
        StatusCode::BAD_REQUEST,
        "unknown field",
    );
    // A real switchover: n1 becomes the primary.
    let done = sw(r#"{"to":"n1"}"#).await;
    assert_status(&done, StatusCode::OK);
    assert!(
        json(&done)["result"]
            .as_str()
            .unwrap_or_default()
            .contains("switched over from n0 to n1"),
        "{}",
        done.body
    );
    let big = format!(r#"{{"to":"{}"}}"#, "x".repeat(100_000));
    let answer = call(admin, Method::POST, "/switchover", Some(&big), None).await;
    assert_error(&answer, StatusCode::PAYLOAD_TOO_LARGE, "request body over");

    // Wrong paths and methods.
    assert_error(
        &get(admin, "/nope").await,
        StatusCode::NOT_FOUND,
        "no such endpoint",
    );
    let wrong = get(admin, "/pause").await;
    assert_error(&wrong, StatusCode::METHOD_NOT_ALLOWED, "use POST");
    assert_error(
        &post(admin, "/status", None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "use GET",
    );
    assert_error(
        &call(admin, Method::DELETE, "/metrics", None, None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "GET",
    );
    assert!(!env.proxy.proxy.is_paused(), "GET /pause must not pause");

    // Garbage on the socket gets a 400, and the server keeps serving.
    let answer = raw(admin, b"\x16\x03\x01garbage\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let answer = raw(
        admin,
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"),
        "{answer:?}"
    );

    drop(client);
    panic_watch::assert_no_proxy_panics();

    // The admin API stops with the proxy.
    let TestEnv { proxy, cluster } = env;
    within("shutdown", STEP, proxy.shutdown()).await;
    let refused = tokio::net::TcpStream::connect(admin).await;
    assert!(refused.is_err(), "admin port still accepts after shutdown");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_changing_endpoints_and_the_cli_sends_it() {
    let env = env_with(1, |c| c.admin_token = "s3cret-token".into()).await;
    let addr = env.proxy.admin_addr;

    let denied = call(addr, Method::POST, "/pause", None, None).await;
    assert_error(&denied, StatusCode::UNAUTHORIZED, "Bearer");
    let denied = call(addr, Method::POST, "/pause", None, Some("wrong")).await;
    assert_error(&denied, StatusCode::UNAUTHORIZED, "Bearer");
    assert!(!env.proxy.proxy.is_paused());
    assert_status(
        &call(addr, Method::POST, "/pause", None, Some("s3cret-token")).await,
        StatusCode::OK,
    );
    assert!(env.proxy.proxy.is_paused());
    assert_status(
        &call(addr, Method::POST, "/resume", None, Some("s3cret-token")).await,
        StatusCode::OK,
    );
    assert!(!env.proxy.proxy.is_paused());
    // Reading stays open.
    assert_status(&get(addr, "/status").await, StatusCode::OK);

    // The CLI: a refused switchover exits 1 with the server's reason; the token comes from the
    // environment.
    let admin_url = format!("http://{addr}");
    let out = pgswitch(&["switchover", "--to", "n1", "--admin", &admin_url], &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("Bearer"),
        "{stderr}"
    );
    let out = pgswitch(
        &["switchover", "--to", "n1", "--admin", &admin_url],
        &[("PGSWITCH_ADMIN_TOKEN", "s3cret-token")],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("done"), "{stderr}");
    let out = pgswitch(
        &["switchover", "--to", "nx", "--admin", &admin_url],
        &[("PGSWITCH_ADMIN_TOKEN", "s3cret-token")],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unknown node \"nx\""), "{stderr}");
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_prints_the_cluster() {
    let env = env(2).await;
    let admin_url = format!("http://{}", env.proxy.admin_addr);
    let client = env.connect().await;
    within("query", STEP, client.simple_query("SELECT 1"))
        .await
        .expect("SELECT 1");

    let out = pgswitch(&["status", "--admin", &admin_url], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    assert!(stdout.starts_with("epoch "), "{stdout}");
    assert!(stdout.contains("primary n0  ready yes"), "{stdout}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let n0 = row("n0");
    assert_eq!(n0[2..5], ["primary", "*", "up"], "{stdout}");
    for standby in ["n1", "n2"] {
        let r = row(standby);
        assert_eq!(r[2..4], ["standby", "up"], "{stdout}");
    }
    let header = stdout
        .lines()
        .find(|l| l.starts_with("NODE"))
        .expect("node header");
    for column in ["ROLE", "HEALTH", "TL", "LSN", "LAG_BYTES", "LATENCY_MS"] {
        assert!(header.contains(column), "{header}");
    }
    let pool = row("app/postgres");
    assert_eq!(pool[1..], ["20", "1", "0", "1", "0"], "{stdout}");

    // --json, and the admin URL from PGSWITCH_ADMIN.
    let out = pgswitch(&["status", "--json"], &[("PGSWITCH_ADMIN", &admin_url)]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(status["nodes"].as_array().map(Vec::len), Some(3));
    assert_eq!(status["primary"], "n0");

    // Nobody listening: a clear error and exit 1.
    let port = pgswitch::harness::free_port().expect("free port");
    let out = pgswitch(
        &["status", "--admin", &format!("http://127.0.0.1:{port}")],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach the admin API"), "{stderr}");
    drop(client);
}

/// Pipes a scrape through `promtool check metrics`.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}): install it with `apt-get install -y prometheus` \
             (Debian's prometheus package ships promtool)"
        ),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics found problems:\n{report}\n--- scrape ---\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_workload_and_pass_promtool() {
    let env = env(2).await;
    let admin = env.proxy.admin_addr;

    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(env.connect().await);
    }
    for (i, c) in clients.iter().enumerate() {
        for q in 0..5 {
            within("query", STEP, c.simple_query(&format!("SELECT {i} + {q}")))
                .await
                .expect("query");
        }
    }
    let during = get(admin, "/metrics").await;
    assert_status(&during, StatusCode::OK);
    assert_eq!(during_content_type(admin).await, METRICS_CONTENT_TYPE);
    let text = &during.body;
    assert!(text.contains("# HELP pgswitch_node_up "), "{text}");
    assert!(text.contains("# TYPE pgswitch_epoch gauge"), "{text}");
    assert_eq!(must_sample(text, "pgswitch_node_up{node=\"n0\"}"), 1.0);
    assert_eq!(must_sample(text, "pgswitch_node_up{node=\"n2\"}"), 1.0);
    assert_eq!(
        must_sample(text, "pgswitch_node_role{node=\"n0\",role=\"primary\"}"),
        1.0
    );
    assert_eq!(
        must_sample(text, "pgswitch_node_role{node=\"n1\",role=\"standby\"}"),
        1.0
    );
    assert_eq!(
        must_sample(text, "pgswitch_node_role{node=\"n1\",role=\"primary\"}"),
        0.0
    );
    assert_eq!(
        must_sample(text, "pgswitch_node_replication_lag_bytes{node=\"n0\"}"),
        0.0
    );
    assert!(must_sample(text, "pgswitch_node_replication_lag_bytes{node=\"n1\"}") >= 0.0);
    assert!(must_sample(text, "pgswitch_node_timeline{node=\"n0\"}") >= 1.0);
    assert!(must_sample(text, "pgswitch_node_diagnosis_latency_seconds{node=\"n0\"}") > 0.0);
    assert_eq!(must_sample(text, "pgswitch_primary_available"), 1.0);
    let epoch = json(&get(admin, "/status").await)["epoch"]
        .as_f64()
        .expect("epoch");
    assert_eq!(must_sample(text, "pgswitch_epoch"), epoch);
    assert_eq!(must_sample(text, "pgswitch_paused"), 0.0);
    assert_eq!(
        must_sample(text, "pgswitch_client_connections{state=\"active\"}"),
        3.0
    );
    assert_eq!(
        must_sample(
            text,
            "pgswitch_pool_server_connections{pool=\"app/postgres\",state=\"active\"}"
        ),
        3.0
    );
    assert_eq!(
        must_sample(text, "pgswitch_pool_size{pool=\"app/postgres\"}"),
        20.0
    );
    assert_eq!(
        must_sample(text, "pgswitch_server_connections{state=\"active\"}"),
        3.0
    );
    assert_eq!(
        must_sample(
            text,
            "pgswitch_failovers_total{mode=\"automatic\",result=\"success\"}"
        ),
        0.0
    );
    assert_eq!(must_sample(text, "pgswitch_clients_held"), 0.0);
    assert!(text.contains("pgswitch_build_info{version=\""), "{text}");
    promtool_check(text);

    // Session mode: servers go back idle as clients leave.
    drop(clients);
    let after = wait_for(admin, "/metrics", "servers idle after clients left", |a| {
        sample(
            &a.body,
            "pgswitch_pool_server_connections{pool=\"app/postgres\",state=\"idle\"}",
        ) == Some(3.0)
    })
    .await;
    assert_eq!(
        must_sample(&after.body, "pgswitch_client_connections{state=\"active\"}"),
        0.0
    );
    promtool_check(&after.body);
    panic_watch::assert_no_proxy_panics();
}

async fn during_content_type(admin: SocketAddr) -> String {
    let answer = raw(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    answer
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_node_metrics_follow_a_primary_crash() {
    // Failover off: the primary stays gone until it is started again.
    let env = env_with(1, |c| c.failover.enabled = false).await;
    let admin = env.proxy.admin_addr;
    wait_for(admin, "/ready", "ready", |a| a.status == StatusCode::OK).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(env.connect().await);
    }
    let n0 = env.cluster.node("n0").expect("n0");
    n0.stop_immediate().expect("stop n0");
    let ready = wait_for(admin, "/ready", "not ready without a primary", |a| {
        a.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(
        json(&ready)["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no primary"),
        "{}",
        ready.body
    );
    let text = get(admin, "/metrics").await.body;
    assert_eq!(must_sample(&text, "pgswitch_node_up{node=\"n0\"}"), 0.0);
    assert_eq!(
        must_sample(&text, "pgswitch_node_role{node=\"n0\",role=\"unknown\"}"),
        1.0
    );
    assert_eq!(must_sample(&text, "pgswitch_node_up{node=\"n1\"}"), 1.0);
    assert_eq!(must_sample(&text, "pgswitch_primary_available"), 0.0);
    assert!(must_sample(&text, "pgswitch_node_consecutive_failures{node=\"n0\"}") >= 1.0);
    promtool_check(&text);
    let status = json(&get(admin, "/status").await);
    assert_eq!(status["primary"], Value::Null);
    assert_eq!(status["ready"], false);

    // Queries sent now are held, and counted, until a primary is back (hold_ms: 30 s).
    let queries: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(async move {
                let rows = c.simple_query(&format!("SELECT {i}")).await;
                (c, rows.map(|r| r.len()))
            })
        })
        .collect();
    wait_for(admin, "/metrics", "three clients held", |a| {
        sample(&a.body, "pgswitch_clients_held") == Some(3.0)
    })
    .await;

    // It comes back: ready again, and the held queries are answered.
    n0.start().expect("start n0");
    wait_for(admin, "/ready", "ready after the primary is back", |a| {
        a.status == StatusCode::OK
    })
    .await;
    for q in queries {
        let (_client, rows) = within("held query", STEP, q).await.expect("task");
        rows.expect("a held query is answered once the primary is back");
    }
    let text = get(admin, "/metrics").await.body;
    assert_eq!(must_sample(&text, "pgswitch_clients_held"), 0.0);
    panic_watch::assert_no_proxy_panics();
}

/// A Prometheus server, killed (by its PID) when dropped.
struct PrometheusServer {
    child: Child,
    dir: PathBuf,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_prometheus(dir: &Path, target: SocketAddr, port: u16) -> PrometheusServer {
    std::fs::create_dir_all(dir).expect("prometheus dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: pgswitch\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run prometheus ({e}): install it with `apt-get install -y prometheus`")
        });
    PrometheusServer {
        child,
        dir: dir.to_path_buf(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_pgswitch() {
    let env = env(1).await;
    let admin = env.proxy.admin_addr;
    let client = env.connect().await;
    within("query", STEP, client.simple_query("SELECT 1"))
        .await
        .expect("SELECT 1");

    let port = pgswitch::harness::free_port().expect("free port");
    let dir = std::env::temp_dir().join(format!(
        "pgswitch-prometheus-{}-{}",
        std::process::id(),
        port
    ));
    let mut server = start_prometheus(&dir, admin, port);
    let prom: SocketAddr = ([127, 0, 0, 1], port).into();

    // Wait for a scrape that carries pgswitch's series; Prometheus starts in a few seconds.
    let deadline = Instant::now() + Duration::from_secs(90);
    let query = "/api/v1/query?query=pgswitch_node_up";
    let result = loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
            panic!("prometheus exited ({status}):\n{log}");
        }
        let answer = request(&url(prom), Method::GET, query, None, None, STEP).await;
        if let Ok(answer) = answer {
            if answer.status == StatusCode::OK {
                let v: Value = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
                let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
                if !result.is_empty() {
                    break result;
                }
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
            panic!("prometheus never had pgswitch_node_up; log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let n0 = result
        .iter()
        .find(|r| r["metric"]["node"] == "n0")
        .unwrap_or_else(|| panic!("no n0 series: {result:?}"));
    assert_eq!(n0["metric"]["job"], "pgswitch");
    assert_eq!(n0["value"][1], "1", "{n0}");

    // The target is healthy in Prometheus's eyes, and the pool series is there too.
    let up = request(
        &url(prom),
        Method::GET,
        "/api/v1/query?query=up%7Bjob%3D%22pgswitch%22%7D",
        None,
        None,
        STEP,
    )
    .await
    .expect("query up");
    let up: Value = serde_json::from_str(&up.body).expect("json");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let pools = request(
        &url(prom),
        Method::GET,
        "/api/v1/query?query=pgswitch_pool_size",
        None,
        None,
        STEP,
    )
    .await
    .expect("query pool size");
    let pools: Value = serde_json::from_str(&pools.body).expect("json");
    assert_eq!(
        pools["data"]["result"][0]["metric"]["pool"], "app/postgres",
        "{pools}"
    );

    let pid = server.child.id();
    drop(server);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "prometheus (pid {pid}) still running"
    );
    drop(client);
}

/// `pgswitch_session_state_hazards_total{kind}` of one scrape, by kind.
async fn hazards(admin: SocketAddr) -> Vec<(&'static str, f64)> {
    let text = get(admin, "/metrics").await.body;
    ["prepare", "listen", "advisory_lock", "temp_table", "set"]
        .into_iter()
        .map(|kind| {
            let series = format!("pgswitch_session_state_hazards_total{{kind=\"{kind}\"}}");
            (kind, sample(&text, &series).unwrap_or(0.0))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_hazards_are_counted_from_simple_queries_and_parses() {
    // Transaction mode; no other test of this file sends such statements.
    let env = env_with(0, |c| c.pool_mode = pgswitch::config::PoolMode::Transaction).await;
    let admin = env.proxy.admin_addr;
    let before = hazards(admin).await;
    let client = env.connect().await;
    // Simple queries.
    for sql in [
        "SET application_name = 'hazards'", // tracked and reported: follows the client
        "SET TimeZone = 'UTC'",             // the same
        "SET search_path = public",         // tracked, read back after the transaction: none
        "SET work_mem = '8MB'",             // set
        "SET SESSION ROLE NONE",            // set
        "LISTEN hazards",                   // listen
        "PREPARE hz AS SELECT 1",           // prepare
        "BEGIN; CREATE TEMP TABLE hz_t (a int); COMMIT", // temp_table, the second statement
        "DROP TABLE IF EXISTS hz_t",
        "SELECT pg_advisory_xact_lock(7)", // transaction-scoped: none
        "SET LOCAL work_mem = '8MB'",      // none
    ] {
        within(sql, STEP, client.simple_query(sql))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // The same kinds through the extended protocol (Parse, Bind, Execute), as drivers send
    // them when a query has parameters.
    let locked: bool = within(
        "lock",
        STEP,
        client.query_one("SELECT pg_try_advisory_lock($1)", &[&42i64]),
    )
    .await
    .expect("advisory lock")
    .get(0);
    assert!(locked);
    within(
        "unlock",
        STEP,
        client.query_one("SELECT pg_advisory_unlock($1)", &[&42i64]),
    )
    .await
    .expect("unlock");
    for sql in [
        "SET statement_timeout = 5000", // set
        "SET DateStyle = 'ISO, DMY'",   // tracked and reported: none
        "LISTEN hazards_extended",      // listen
    ] {
        within(sql, STEP, client.execute(sql, &[]))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let after = hazards(admin).await;
    let counted: Vec<(&str, f64)> = before
        .iter()
        .zip(&after)
        .map(|((kind, b), (_, a))| (*kind, a - b))
        .collect();
    assert_eq!(
        counted,
        vec![
            ("prepare", 1.0),
            ("listen", 2.0),
            ("advisory_lock", 1.0),
            ("temp_table", 1.0),
            ("set", 3.0),
        ]
    );
    panic_watch::assert_no_proxy_panics();
}

/// `pgswitch run` (the binary), killed by its PID when dropped.
struct RunningBinary {
    child: Child,
}

impl Drop for RunningBinary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_clients_then_tells_those_left_57p01() {
    common::init_logging();
    let cluster = tokio::task::spawn_blocking(|| {
        pgswitch::harness::PgCluster::start(&ClusterSpec {
            standbys: 0,
            ..ClusterSpec::default()
        })
    })
    .await
    .expect("cluster task")
    .unwrap_or_else(|e| panic!("cannot start the PostgreSQL cluster: {e:#}"));
    let port = pgswitch::harness::free_port().expect("free port");
    let admin = pgswitch::harness::free_port().expect("free port");
    let text = format!(
        "shutdown_timeout_ms = 1500\n{}",
        pgswitch::demo::demo_config(&cluster, port, admin)
            .replace("pool_mode = \"session\"", "pool_mode = \"transaction\"")
    );
    let path = cluster.dir.join("pgswitch-binary.toml");
    std::fs::write(&path, text).expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("PGSWITCH_ADMIN")
        .stdin(Stdio::null())
        .spawn()
        .expect("start pgswitch");
    let mut binary = RunningBinary { child };
    let dsn = format!("host=127.0.0.1 port={port} user=app password=secret dbname=postgres");
    let started = Instant::now();
    let (client, connection) = loop {
        match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
            Ok(c) => break c,
            Err(e) if started.elapsed() < STEP => {
                assert!(
                    binary.child.try_wait().expect("try_wait").is_none(),
                    "pgswitch exited: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("pgswitch never answered: {e}"),
        }
    };
    let connection = tokio::spawn(connection);
    within("SELECT 1", STEP, client.simple_query("SELECT 1"))
        .await
        .expect("SELECT 1 through the binary");

    // SIGTERM: no new clients, the idle one keeps its connection through the grace period...
    let pid = binary.child.id() as libc::pid_t;
    // SAFETY: kill(2) on the PID of the child this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
    let signalled = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    within(
        "SELECT during the grace period",
        STEP,
        client.simple_query("SELECT 2"),
    )
    .await
    .expect("a session still works during shutdown_timeout_ms");

    // ...then is told why it is closed, and the process exits cleanly.
    let ended = within("the session's end", STEP, connection)
        .await
        .expect("connection task");
    let waited = signalled.elapsed();
    let error = ended.expect_err("the connection ends with an error");
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {error:?}"));
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert_eq!(db.message(), "pgswitch is shutting down", "{db:?}");
    assert!(
        waited >= Duration::from_millis(1000),
        "closed after {waited:?}, before shutdown_timeout_ms"
    );
    let status = within(
        "pgswitch exits",
        STEP,
        tokio::task::spawn_blocking(move || binary.child.wait()),
    )
    .await
    .expect("wait task")
    .expect("wait");
    assert!(status.success(), "{status}");
    drop(cluster);
}
