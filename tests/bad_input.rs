//! Bad input at the proxy's client port, spoken as raw bytes over TCP: malformed startup
//! packets, garbage, oversized messages, silent clients, clients that vanish mid-query.
//! Each gets a clear `08P01` (or a clean close), the proxy never panics, and a client connected
//! at the same time keeps working.

mod common;
#[path = "common/panic_watch.rs"]
mod panic_watch;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{on_primary, simple_value, wait_on_primary, within, TestEnv, PASSWORD, USER};
use pgswitch::config::{Config, PoolMode, UserConfig};
use pgswitch::harness::ClusterSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};

const PROTOCOL_3_0: u32 = 196_608;
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// How long the proxy may take to answer or close.
const ANSWER: Duration = Duration::from_secs(5);
const STEP: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------------------------

/// A primary-only cluster (with an extra role `other`) and a session-mode pgswitch.
async fn env(tweak: impl FnOnce(&mut Config)) -> TestEnv {
    panic_watch::install();
    TestEnv::start(
        ClusterSpec {
            standbys: 0,
            users: vec![
                (USER.to_string(), PASSWORD.to_string()),
                ("other".to_string(), "other-secret".to_string()),
            ],
            ..ClusterSpec::default()
        },
        |c| {
            c.pool_mode = PoolMode::Session;
            c.users.push(UserConfig {
                name: "other".into(),
                password: Some("other-secret".into()),
                server_password: None,
                pool_size: None,
            });
            tweak(c);
        },
    )
    .await
}

/// A well-behaved client of user `other` (its own pool), connected for the whole test.
async fn bystander(env: &TestEnv) -> Client {
    let dsn = env.dsn("other", "other-secret");
    let (client, connection) = within(
        "bystander connects",
        STEP,
        tokio_postgres::connect(&dsn, NoTls),
    )
    .await
    .expect("bystander connects");
    tokio::spawn(connection);
    client
}

/// The bystander still answers, and a brand-new client can still log in.
async fn others_still_work(env: &TestEnv, bystander: &Client, after: &str) {
    assert_eq!(
        simple_value(bystander, "SELECT 'bystander ok'").await,
        "bystander ok",
        "the bystander after {after}"
    );
    let dsn = env.dsn("other", "other-secret");
    let (fresh, connection) = within("fresh client", STEP, tokio_postgres::connect(&dsn, NoTls))
        .await
        .unwrap_or_else(|e| panic!("a new client after {after}: {e:?}"));
    let task = tokio::spawn(connection);
    assert_eq!(simple_value(&fresh, "SELECT 'fresh ok'").await, "fresh ok");
    drop(fresh);
    let _ = within("fresh client closes", STEP, task).await;
}

/// Waits (bounded) until pgswitch counts exactly `n` clients: bad connections give their
/// client slot back.
async fn clients_settle_at(env: &TestEnv, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let count = env.proxy.proxy.client_count();
        if count == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pgswitch still counts {count} clients, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A raw client connection that reads backend messages.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// What the proxy did with a connection.
#[derive(Debug)]
enum Read {
    Message(u8, Vec<u8>),
    /// EOF (or a reset) at a message boundary.
    Closed,
}

impl Raw {
    async fn connect(port: u16) -> Raw {
        let tcp = within("tcp connect", STEP, TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("tcp connect to pgswitch");
        tcp.set_nodelay(true).ok();
        Raw {
            tcp,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("send", STEP, self.tcp.write_all(bytes))
            .await
            .expect("send to pgswitch");
    }

    /// Next backend message, or `Closed`, within `limit`.
    async fn read(&mut self, limit: Duration) -> Result<Read, String> {
        let deadline = Instant::now() + limit;
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len < 4 {
                    return Err(format!("backend message with invalid length {len}"));
                }
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    let body = self.buf[5..1 + len].to_vec();
                    self.buf.drain(..1 + len);
                    return Ok(Read::Message(tag, body));
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.tcp.read(&mut chunk)).await {
                Err(_) => return Err(format!("neither a message nor a close within {limit:?}")),
                Ok(Ok(0)) | Ok(Err(_)) if self.buf.is_empty() => return Ok(Read::Closed),
                Ok(Ok(0)) => {
                    return Err(format!(
                        "connection closed inside a message: {:?}",
                        self.buf
                    ))
                }
                Ok(Err(e)) => return Err(format!("read error inside a message: {e}")),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until the connection closes; returns every ErrorResponse seen (as field maps).
    /// Fails on any other message (except NoticeResponse) and if the close does not come.
    async fn errors_until_close(&mut self, limit: Duration) -> Vec<HashMap<char, String>> {
        let mut errors = Vec::new();
        loop {
            match self.read(limit).await {
                Ok(Read::Closed) => return errors,
                Ok(Read::Message(b'E', body)) => errors.push(error_fields(&body)),
                Ok(Read::Message(b'N', _)) => {}
                Ok(Read::Message(tag, body)) => {
                    panic!(
                        "expected an error and a close, got message {:?} {body:?}",
                        tag as char
                    )
                }
                Err(e) => panic!("expected an error and a close: {e}; errors so far: {errors:?}"),
            }
        }
    }

    /// Logs in with trust authentication; returns once ReadyForQuery arrives.
    async fn login(&mut self, params: &[(&str, &str)]) {
        self.send(&startup_packet(PROTOCOL_3_0, params)).await;
        self.until_ready("login").await;
    }

    /// Reads until ReadyForQuery; fails on an error. Returns the transaction status and the
    /// messages before it.
    async fn until_ready(&mut self, what: &str) -> (u8, Vec<(u8, Vec<u8>)>) {
        let mut seen = Vec::new();
        loop {
            match self.read(STEP).await {
                Ok(Read::Message(b'Z', body)) => return (body[0], seen),
                Ok(Read::Message(b'E', body)) => panic!("{what}: error {:?}", error_fields(&body)),
                Ok(Read::Message(tag, body)) => seen.push((tag, body)),
                Ok(Read::Closed) => panic!("{what}: connection closed"),
                Err(e) => panic!("{what}: {e}"),
            }
        }
    }
}

fn error_fields(body: &[u8]) -> HashMap<char, String> {
    let mut fields = HashMap::new();
    let mut rest = body;
    while let Some((&code, after)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = after.iter().position(|&b| b == 0).unwrap_or(after.len());
        fields.insert(
            code as char,
            String::from_utf8_lossy(&after[..end]).to_string(),
        );
        rest = after.get(end + 1..).unwrap_or(&[]);
    }
    fields
}

/// Sends `bytes` on a fresh connection; expects one ErrorResponse with `code` (or, when `code`
/// is `None`, nothing at all) and a close. Returns the error message, if any.
async fn expect_refused(port: u16, what: &str, bytes: &[u8], code: Option<&str>) -> Option<String> {
    let mut raw = Raw::connect(port).await;
    raw.send(bytes).await;
    let errors = raw.errors_until_close(ANSWER).await;
    match (code, errors.as_slice()) {
        (None, []) => None,
        (Some(code), [e]) => {
            assert_eq!(e.get(&'C').map(String::as_str), Some(code), "{what}: {e:?}");
            assert!(
                matches!(e.get(&'S').map(String::as_str), Some("FATAL")),
                "{what}: {e:?}"
            );
            let message = e.get(&'M').cloned().unwrap_or_default();
            println!("{what}: {code} {message}");
            Some(message)
        }
        (want, got) => panic!("{what}: expected {want:?}, got errors {got:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_get_08p01_and_other_clients_are_undisturbed() {
    let env = env(|_| {}).await;
    let port = env.port();
    let bystander = bystander(&env).await;

    let fixed: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("length 3", 3u32.to_be_bytes().to_vec(), Some("08P01")),
        ("length 0", 0u32.to_be_bytes().to_vec(), Some("08P01")),
        ("length -1", u32::MAX.to_be_bytes().to_vec(), Some("08P01")),
        (
            "length 100000",
            {
                let mut b = 100_000u32.to_be_bytes().to_vec();
                b.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
                b.extend_from_slice(b"user\0app\0");
                b
            },
            Some("08P01"),
        ),
        (
            "protocol 9.9",
            {
                let mut b = 8u32.to_be_bytes().to_vec();
                b.extend_from_slice(&((9u32 << 16) | 9).to_be_bytes());
                b
            },
            Some("08P01"),
        ),
        (
            "protocol 2.0",
            startup_packet(2 << 16, &[("user", "app")]),
            Some("08P01"),
        ),
        (
            "HTTP request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            Some("08P01"),
        ),
        (
            "startup without the final terminator",
            {
                let mut b = startup_packet(PROTOCOL_3_0, &[("user", "app")]);
                b.pop();
                let len = (b.len() as u32).to_be_bytes();
                b[..4].copy_from_slice(&len);
                b
            },
            Some("08P01"),
        ),
        (
            "startup with a parameter but no value",
            {
                let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
                body.extend_from_slice(b"user\0");
                let mut b = ((body.len() + 4) as u32).to_be_bytes().to_vec();
                b.extend_from_slice(&body);
                b
            },
            Some("08P01"),
        ),
        (
            "startup with invalid UTF-8",
            {
                let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
                body.extend_from_slice(b"user\0app\0application_name\0\xff\xfe\0\0");
                let mut b = ((body.len() + 4) as u32).to_be_bytes().to_vec();
                b.extend_from_slice(&body);
                b
            },
            Some("08P01"),
        ),
        (
            "cancel request of 12 bytes",
            {
                let mut b = 12u32.to_be_bytes().to_vec();
                b.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
                b.extend_from_slice(&1u32.to_be_bytes());
                b
            },
            Some("08P01"),
        ),
        (
            "SSL request of 12 bytes",
            {
                let mut b = 12u32.to_be_bytes().to_vec();
                b.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
                b.extend_from_slice(&0u32.to_be_bytes());
                b
            },
            Some("08P01"),
        ),
        (
            "startup without a user",
            startup_packet(PROTOCOL_3_0, &[("database", "postgres")]),
            Some("28000"),
        ),
        (
            "replication startup",
            startup_packet(PROTOCOL_3_0, &[("user", "app"), ("replication", "true")]),
            Some("08P01"),
        ),
    ];
    let mut cases: Vec<(String, Vec<u8>, Option<&str>)> = fixed
        .into_iter()
        .map(|(what, bytes, code)| (what.to_string(), bytes, code))
        .collect();
    for seed in 1..=8u64 {
        let mut bytes = noise(seed, 200);
        // A plausible length in half of them, so the garbage reaches the body parser.
        if seed % 2 == 0 {
            bytes[..4].copy_from_slice(&200u32.to_be_bytes());
        }
        cases.push((format!("garbage #{seed}"), bytes, Some("08P01")));
    }

    for (what, bytes, code) in &cases {
        expect_refused(port, what, bytes, *code).await;
        others_still_work(&env, &bystander, what).await;
    }

    // A truncated startup packet followed by EOF: a clean close, nothing to say.
    let mut raw = Raw::connect(port).await;
    raw.send(&startup_packet(PROTOCOL_3_0, &[("user", "app")])[..10])
        .await;
    raw.tcp.shutdown().await.ok();
    let errors = raw.errors_until_close(ANSWER).await;
    assert!(errors.is_empty(), "truncated startup then EOF: {errors:?}");

    // A CancelRequest with keys nobody holds: closed, and nobody's query is cancelled.
    let sleeper = tokio::spawn({
        let dsn = env.dsn("other", "other-secret");
        async move {
            let (client, connection) = tokio_postgres::connect(&dsn, NoTls).await?;
            tokio::spawn(connection);
            client.simple_query("SELECT pg_sleep(1)").await.map(|_| ())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for pid in [0u32, 1, 12345, u32::MAX] {
        let mut packet = 16u32.to_be_bytes().to_vec();
        packet.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        packet.extend_from_slice(&pid.to_be_bytes());
        packet.extend_from_slice(&pid.wrapping_mul(7).to_be_bytes());
        expect_refused(port, "bogus cancel request", &packet, None).await;
    }
    within("sleeper", STEP, sleeper)
        .await
        .expect("sleeper task")
        .expect("a bogus CancelRequest must not cancel anyone's query");

    others_still_work(&env, &bystander, "all malformed startups").await;
    clients_settle_at(&env, 1).await;
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_protocol_version_is_negotiated_down_to_3_0() {
    let env = env(|c| c.auth_type = "trust".into()).await;
    let mut raw = Raw::connect(env.port()).await;
    raw.send(&startup_packet(
        PROTOCOL_3_0 | 2,
        &[
            ("user", USER),
            ("database", "postgres"),
            ("_pq_.some_option", "on"),
        ],
    ))
    .await;
    let (status, seen) = raw.until_ready("startup 3.2").await;
    assert_eq!(status, b'I');
    let (tag, body) = &seen[0];
    assert_eq!(*tag, b'v', "NegotiateProtocolVersion comes first: {seen:?}");
    assert_eq!(
        &body[..4],
        &PROTOCOL_3_0.to_be_bytes(),
        "newest minor version 0"
    );
    assert_eq!(&body[4..8], &1u32.to_be_bytes(), "one unsupported option");
    assert_eq!(&body[8..], b"_pq_.some_option\0");
    raw.send(&query("SELECT 1")).await;
    let (_, seen) = raw.until_ready("SELECT 1").await;
    assert!(seen.iter().any(|(t, _)| *t == b'D'), "a data row: {seen:?}");
    raw.send(&message(b'X', &[])).await;
    assert!(raw.errors_until_close(ANSWER).await.is_empty());
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gss_encryption_and_ssl_requests_are_declined_and_the_login_continues() {
    let env = env(|c| c.auth_type = "trust".into()).await;
    let mut raw = Raw::connect(env.port()).await;
    for code in [GSSENC_REQUEST_CODE, SSL_REQUEST_CODE] {
        let mut request = 8u32.to_be_bytes().to_vec();
        request.extend_from_slice(&code.to_be_bytes());
        raw.send(&request).await;
        let mut answer = [0u8; 1];
        within("answer", ANSWER, raw.tcp.read_exact(&mut answer))
            .await
            .expect("answer");
        assert_eq!(
            &answer, b"N",
            "request {code} is declined without TLS configured"
        );
    }
    raw.login(&[("user", USER), ("database", "postgres")]).await;
    raw.send(&query("SELECT 'plain'")).await;
    let (_, seen) = raw.until_ready("query").await;
    assert!(
        seen.iter()
            .any(|(t, b)| *t == b'D' && b.ends_with(b"plain")),
        "{seen:?}"
    );
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_longer_than_max_message_bytes_gets_08p01_and_a_close() {
    let env = env(|c| {
        c.auth_type = "trust".into();
        c.max_message_bytes = 1024;
    })
    .await;
    let port = env.port();
    let bystander = bystander(&env).await;

    // Just under the limit: fine.
    let mut raw = Raw::connect(port).await;
    raw.login(&[
        ("user", USER),
        ("database", "postgres"),
        ("application_name", "too_long"),
    ])
    .await;
    let sql = format!("SELECT length('{}')", "x".repeat(900));
    raw.send(&query(&sql)).await;
    let (_, seen) = raw.until_ready("query under the limit").await;
    assert!(
        seen.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"900")),
        "{seen:?}"
    );

    // 4096 bytes: refused and closed.
    let sql = format!("SELECT '{}'", "x".repeat(4096));
    raw.send(&query(&sql)).await;
    let errors = raw.errors_until_close(ANSWER).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0].get(&'C').map(String::as_str),
        Some("08P01"),
        "{errors:?}"
    );
    println!("4096-byte Query: {:?}", errors[0].get(&'M'));
    // Its server connection is closed, not leaked.
    wait_on_primary(
        &env,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'too_long'",
        "0",
        Duration::from_secs(5),
    )
    .await;
    others_still_work(&env, &bystander, "an oversized message").await;

    // Only the header arrived so far: the length alone is enough to refuse.
    let mut raw = Raw::connect(port).await;
    raw.login(&[("user", USER), ("database", "postgres")]).await;
    let mut header = vec![b'Q'];
    header.extend_from_slice(&1_000_000u32.to_be_bytes());
    raw.send(&header).await;
    let errors = raw.errors_until_close(ANSWER).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0].get(&'C').map(String::as_str),
        Some("08P01"),
        "{errors:?}"
    );
    others_still_work(&env, &bystander, "an oversized message header").await;

    // A message length below 4 is a protocol violation too.
    let mut raw = Raw::connect(port).await;
    raw.login(&[("user", USER), ("database", "postgres")]).await;
    raw.send(&[b'Q', 0, 0, 0, 2]).await;
    let errors = raw.errors_until_close(ANSWER).await;
    assert!(!errors.is_empty(), "length 2 must be refused");
    assert_eq!(
        errors[0].get(&'C').map(String::as_str),
        Some("08P01"),
        "{errors:?}"
    );
    others_still_work(&env, &bystander, "a message of length 2").await;

    // An unknown message type after login: PostgreSQL's own 08P01 comes through, then a close.
    let mut raw = Raw::connect(port).await;
    raw.login(&[("user", USER), ("database", "postgres")]).await;
    raw.send(&message(0x01, b"junk")).await;
    let errors = raw.errors_until_close(ANSWER).await;
    assert!(
        !errors.is_empty(),
        "an unknown message type must be refused"
    );
    assert_eq!(
        errors[0].get(&'C').map(String::as_str),
        Some("08P01"),
        "{errors:?}"
    );
    println!("unknown message type after login: {errors:?}");
    others_still_work(&env, &bystander, "an unknown message type").await;

    // Garbage after login.
    for seed in 1..=4u64 {
        let mut raw = Raw::connect(port).await;
        raw.login(&[("user", USER), ("database", "postgres")]).await;
        raw.send(&noise(seed * 31, 300)).await;
        let errors = raw.errors_until_close(ANSWER).await;
        assert!(
            !errors.is_empty(),
            "garbage #{seed} after login must be refused"
        );
        assert_eq!(
            errors[0].get(&'C').map(String::as_str),
            Some("08P01"),
            "garbage #{seed}: {errors:?}"
        );
        others_still_work(&env, &bystander, "garbage after login").await;
    }
    clients_settle_at(&env, 1).await;
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_closed_after_the_login_timeout() {
    let env = env(|c| c.client_login_timeout_ms = 2000).await;
    let port = env.port();
    let bystander = bystander(&env).await;

    let stalls: Vec<(&str, Vec<u8>)> = vec![
        ("nothing at all", Vec::new()),
        ("half a length word", vec![0, 0]),
        (
            "half a startup packet",
            startup_packet(PROTOCOL_3_0, &[("user", USER)])[..12].to_vec(),
        ),
        ("an SSL request, then nothing", {
            let mut b = 8u32.to_be_bytes().to_vec();
            b.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
            b
        }),
        (
            "a startup message, then no SCRAM response",
            startup_packet(PROTOCOL_3_0, &[("user", USER), ("database", "postgres")]),
        ),
    ];
    for (what, bytes) in &stalls {
        let mut raw = Raw::connect(port).await;
        let started = Instant::now();
        raw.send(bytes).await;
        if what.starts_with("an SSL") {
            let mut b = [0u8; 1];
            let n = within("SSL answer", ANSWER, raw.tcp.read(&mut b))
                .await
                .expect("SSL answer");
            assert_eq!(&b[..n], b"N", "no TLS configured: 'N'");
        }
        // Whatever the proxy answers before closing (the SASL request) is skipped.
        let closed = loop {
            match raw.read(ANSWER).await {
                Ok(Read::Closed) => break started.elapsed(),
                Ok(Read::Message(b'R', _)) => {}
                Ok(Read::Message(b'E', body)) => {
                    let e = error_fields(&body);
                    println!("{what}: error before close: {e:?}");
                }
                other => panic!("{what}: expected a close, got {other:?}"),
            }
        };
        println!("{what}: closed after {closed:?}");
        assert!(
            closed >= Duration::from_millis(1900),
            "{what}: closed too early ({closed:?})"
        );
        assert!(
            closed < Duration::from_secs(6),
            "{what}: closed too late ({closed:?})"
        );
        others_still_work(&env, &bystander, what).await;
    }

    // Several silent clients at once do not block a real one.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(Raw::connect(port).await);
    }
    let started = Instant::now();
    others_still_work(&env, &bystander, "20 silent clients").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(silent);
    clients_settle_at(&env, 1).await;
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_query_frees_its_server_backend_and_pool_slot() {
    let env = env(|c| {
        c.auth_type = "trust".into();
        c.default_pool_size = 1;
        c.pool_timeout_ms = 5_000;
        // The bystander's user keeps room for the bystander and a fresh client.
        for u in c.users.iter_mut().filter(|u| u.name == "other") {
            u.pool_size = Some(5);
        }
    })
    .await;
    let port = env.port();
    let bystander = bystander(&env).await;
    let login = [
        ("user", USER),
        ("database", "postgres"),
        ("application_name", "vanisher"),
    ];
    let app_backends = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'";

    // Mid-query.
    let mut raw = Raw::connect(port).await;
    raw.login(&login).await;
    raw.send(&query("SELECT pg_sleep(30)")).await;
    wait_on_primary(
        &env,
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'",
        "1",
        Duration::from_secs(10),
    )
    .await;
    drop(raw);
    let gone = wait_on_primary(
        &env,
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
        "0",
        Duration::from_secs(5),
    )
    .await;
    println!("the server backend of a client gone mid-query ended after {gone:?}");
    slot_is_free(&env, "a client gone mid-query").await;
    others_still_work(&env, &bystander, "a client gone mid-query").await;

    // Inside an open transaction, between queries: rolled back, slot reused.
    on_primary(
        &env,
        "CREATE TABLE mid_t (v int); GRANT ALL ON mid_t TO app",
    )
    .await;
    let mut raw = Raw::connect(port).await;
    raw.login(&login).await;
    raw.send(&query("BEGIN; INSERT INTO mid_t VALUES (1)"))
        .await;
    let (status, _) = raw.until_ready("begin + insert").await;
    assert_eq!(status, b'T');
    drop(raw);
    slot_is_free(&env, "a client gone inside a transaction").await;
    assert_eq!(
        on_primary(&env, "SELECT count(*) FROM mid_t").await,
        "0",
        "the open transaction is rolled back"
    );
    wait_on_primary(
        &env,
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
        "0",
        Duration::from_secs(5),
    )
    .await;

    // Inside a failed transaction.
    let mut raw = Raw::connect(port).await;
    raw.login(&login).await;
    raw.send(&query("BEGIN; INSERT INTO mid_t VALUES (2)"))
        .await;
    raw.until_ready("begin + insert").await;
    raw.send(&query("SELECT 1/0")).await;
    let status = loop {
        match raw.read(ANSWER).await {
            Ok(Read::Message(b'Z', body)) => break body[0],
            Ok(Read::Message(..)) => {}
            other => panic!("1/0 in a transaction: {other:?}"),
        }
    };
    assert_eq!(status, b'E');
    drop(raw);
    slot_is_free(&env, "a client gone inside a failed transaction").await;
    assert_eq!(on_primary(&env, "SELECT count(*) FROM mid_t").await, "0");

    // Halfway through sending a message.
    let mut raw = Raw::connect(port).await;
    raw.login(&login).await;
    let q = query("SELECT 'never completed'");
    raw.send(&q[..q.len() / 2]).await;
    drop(raw);
    slot_is_free(&env, "a client gone mid-message").await;

    // In the middle of COPY FROM STDIN.
    let mut raw = Raw::connect(port).await;
    raw.login(&login).await;
    raw.send(&query("COPY mid_t FROM STDIN")).await;
    match raw.read(ANSWER).await {
        Ok(Read::Message(b'G', _)) => {}
        other => panic!("expected CopyInResponse, got {other:?}"),
    }
    raw.send(&message(b'd', b"1\n2\n3\n")).await;
    drop(raw);
    slot_is_free(&env, "a client gone mid-COPY").await;
    assert_eq!(
        on_primary(&env, "SELECT count(*) FROM mid_t").await,
        "0",
        "the COPY is aborted"
    );

    // While a large result streams towards it, unread.
    let mut raw = Raw::connect(port).await;
    raw.login(&login).await;
    raw.send(&query(
        "SELECT repeat('x', 1024*1024) FROM generate_series(1, 200)",
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(raw);
    slot_is_free(&env, "a client gone while a big result streams").await;

    // Nothing leaked: at most the one pooled server connection of `app` remains.
    let backends: usize = on_primary(&env, app_backends).await.parse().expect("count");
    assert!(backends <= 1, "{backends} server backends for a pool of 1");
    others_still_work(&env, &bystander, "all vanishing clients").await;
    clients_settle_at(&env, 1).await;
    for pool in env.proxy.proxy.pools.all() {
        let status = pool.status();
        if status.user == USER {
            assert_eq!(
                status.servers_active, 0,
                "no server of app is still checked out: {status:?}"
            );
            assert!(status.servers_idle <= 1, "{status:?}");
        }
    }
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_give_up_while_waiting_for_a_server_leave_at_once() {
    let env = env(|c| {
        c.auth_type = "trust".into();
        c.default_pool_size = 1;
        c.pool_timeout_ms = 30_000;
    })
    .await;
    let port = env.port();
    let holder = {
        let (client, connection) = within(
            "holder",
            STEP,
            tokio_postgres::connect(&env.app_dsn(), NoTls),
        )
        .await
        .expect("holder connects");
        tokio::spawn(connection);
        client
    };
    // Ten clients log in and queue for the only server, then give up and close.
    let mut quitters = Vec::new();
    for _ in 0..10 {
        let mut raw = Raw::connect(port).await;
        raw.send(&startup_packet(
            PROTOCOL_3_0,
            &[("user", USER), ("database", "postgres")],
        ))
        .await;
        match raw.read(ANSWER).await {
            Ok(Read::Message(b'R', body)) if body == [0, 0, 0, 0] => {}
            other => panic!("expected AuthenticationOk, got {other:?}"),
        }
        quitters.push(raw);
    }
    clients_settle_at(&env, 11).await;
    let waiting = || -> usize {
        env.proxy
            .proxy
            .pools
            .all()
            .iter()
            .map(|p| p.status().clients_waiting)
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while waiting() < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(waiting(), 10, "ten clients wait for the only server");
    drop(quitters);
    // Their client slots come back while the holder still holds the server.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    while env.proxy.proxy.client_count() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = env.proxy.proxy.client_count();
    println!(
        "client slots after 10 waiting clients gave up: {left} (after {:?})",
        started.elapsed()
    );
    assert_eq!(
        left, 1,
        "clients that closed their socket while waiting for a server still hold client slots"
    );
    assert_eq!(
        waiting(),
        0,
        "clients that gave up are still counted as waiting (/status, pgswitch_client_connections)"
    );
    assert_eq!(
        simple_value(&holder, "SELECT 'holder ok'").await,
        "holder ok"
    );
    drop(holder);
    slot_is_free(&env, "ten clients gave up waiting").await;
    panic_watch::assert_no_proxy_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_greeting_reports_the_clients_own_parameters_and_a_backend_key() {
    let env = env(|c| c.auth_type = "trust".into()).await;
    let mut raw = Raw::connect(env.port()).await;
    raw.send(&startup_packet(
        PROTOCOL_3_0,
        &[
            ("user", USER),
            ("database", "postgres"),
            ("application_name", "greeted"),
            ("TimeZone", "Asia/Tokyo"),
            ("DateStyle", "ISO, DMY"),
        ],
    ))
    .await;
    let (status, seen) = raw.until_ready("login").await;
    assert_eq!(status, b'I');
    let mut params = HashMap::new();
    let mut keys = 0;
    for (tag, body) in &seen {
        match tag {
            b'S' => {
                let mut parts = body.split(|&b| b == 0);
                let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).to_string();
                let value = String::from_utf8_lossy(parts.next().unwrap_or_default()).to_string();
                params.insert(name, value);
            }
            b'K' => {
                keys += 1;
                assert!(body.len() >= 8, "BackendKeyData body {body:?}");
            }
            b'R' => assert_eq!(body, &[0, 0, 0, 0], "AuthenticationOk"),
            other => panic!("unexpected message {:?} in the greeting", *other as char),
        }
    }
    assert_eq!(keys, 1, "exactly one BackendKeyData");
    for (name, want) in [
        ("application_name", "greeted"),
        ("TimeZone", "Asia/Tokyo"),
        ("DateStyle", "ISO, DMY"),
        ("client_encoding", "UTF8"),
        ("session_authorization", USER),
        ("integer_datetimes", "on"),
    ] {
        assert_eq!(
            params.get(name).map(String::as_str),
            Some(want),
            "ParameterStatus {name}: {params:?}"
        );
    }
    assert!(params.contains_key("server_version"), "{params:?}");
    raw.send(&query("SHOW TimeZone")).await;
    let (_, seen) = raw.until_ready("SHOW TimeZone").await;
    assert!(
        seen.iter()
            .any(|(t, b)| *t == b'D' && b.ends_with(b"Asia/Tokyo")),
        "{seen:?}"
    );
    panic_watch::assert_no_proxy_panics();
}

/// With a pool of one server connection, a new client of `app` gets it and runs a query well
/// within the pool timeout.
async fn slot_is_free(env: &TestEnv, after: &str) {
    let started = Instant::now();
    let (client, connection) = within(
        "next client",
        STEP,
        tokio_postgres::connect(&env.app_dsn(), NoTls),
    )
    .await
    .unwrap_or_else(|e| panic!("the only pool slot is not free after {after}: {e:?}"));
    let task = tokio::spawn(connection);
    assert_eq!(
        simple_value(&client, "SELECT 'slot ok'").await,
        "slot ok",
        "after {after}"
    );
    println!(
        "after {after}: the next client ran a query after {:?}",
        started.elapsed()
    );
    drop(client);
    let _ = within("next client closes", STEP, task).await;
}

/// Transaction mode over one server connection: a `SET search_path` whose bytes arrive in
/// pieces, with pauses between them, is still seen (pgswitch reads a small query whole before
/// forwarding it), so the value follows that client and does not reach the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_that_arrives_in_pieces_still_follows_its_client() {
    let env = env(|c| {
        c.auth_type = "trust".into();
        c.pool_mode = PoolMode::Transaction;
        c.default_pool_size = 1;
    })
    .await;
    let mut raw = Raw::connect(env.port()).await;
    raw.send(&startup_packet(
        PROTOCOL_3_0,
        &[("user", USER), ("database", "postgres")],
    ))
    .await;
    raw.until_ready("login").await;
    let set = query("SET search_path = in_pieces, public");
    for piece in set.chunks(7) {
        raw.send(piece).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    raw.until_ready("SET in pieces").await;
    let other = env.connect().await;
    assert_eq!(
        simple_value(&other, "SHOW search_path").await,
        "\"$user\", public",
        "another client of the one server got the pieced SET"
    );
    raw.send(&query("SHOW search_path")).await;
    let (_, seen) = raw.until_ready("SHOW search_path").await;
    assert!(
        seen.iter()
            .any(|(t, b)| *t == b'D' && b.ends_with(b"in_pieces, public")),
        "{seen:?}"
    );
    panic_watch::assert_no_proxy_panics();
}
