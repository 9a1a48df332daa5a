//! Shared support for integration tests: a real PostgreSQL cluster with pgswitch in front,
//! running in the test's own tokio runtime.
#![allow(dead_code)]

pub mod python;

use std::future::Future;
use std::time::{Duration, Instant};

use pgswitch::config::Config;
use pgswitch::demo::demo_config;
use pgswitch::harness::{ClusterSpec, PgCluster};
use pgswitch::server::Running;

pub const USER: &str = "app";
pub const PASSWORD: &str = "secret";

/// A cluster and a pgswitch in front of it; both stop when dropped (the proxy's tasks end with
/// the test's runtime, the cluster in its `Drop`).
pub struct TestEnv {
    pub proxy: Running,
    pub cluster: PgCluster,
}

/// Logs to the test's output when `PGSWITCH_LOG` is set (e.g. `PGSWITCH_LOG=debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("PGSWITCH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// The config the demo uses, on a free client port, changed by `tweak`.
pub fn config_for(cluster: &PgCluster, tweak: impl FnOnce(&mut Config)) -> Config {
    let admin = pgswitch::harness::free_port().expect("free port");
    let text = demo_config(cluster, 0, admin);
    let mut config = Config::parse(&text).expect("demo config is valid");
    config.listen = "127.0.0.1:0".into();
    tweak(&mut config);
    config
}

impl TestEnv {
    /// Starts a cluster per `spec` and a pgswitch configured by `tweak`.
    pub async fn start(spec: ClusterSpec, tweak: impl FnOnce(&mut Config)) -> TestEnv {
        Self::start_with(spec, false, tweak).await
    }

    /// Like [`TestEnv::start`], with every node given to pgswitch by its socket directory, so
    /// pgswitch reaches PostgreSQL over Unix-domain sockets.
    pub async fn start_on_sockets(spec: ClusterSpec, tweak: impl FnOnce(&mut Config)) -> TestEnv {
        Self::start_with(spec, true, tweak).await
    }

    async fn start_with(
        spec: ClusterSpec,
        sockets: bool,
        tweak: impl FnOnce(&mut Config),
    ) -> TestEnv {
        init_logging();
        let cluster = tokio::task::spawn_blocking(move || PgCluster::start(&spec))
            .await
            .expect("cluster task")
            .unwrap_or_else(|e| panic!("cannot start the PostgreSQL cluster: {e:#}"));
        let config = config_for(&cluster, |c| {
            if sockets {
                for (node, pg) in c.nodes.iter_mut().zip(&cluster.nodes) {
                    node.host = pg.socket_dir().display().to_string();
                }
            }
            tweak(c)
        });
        let proxy = pgswitch::server::start(config)
            .await
            .expect("pgswitch starts");
        TestEnv { proxy, cluster }
    }

    /// Session-mode pgswitch in front of a primary and one standby.
    pub async fn session_mode() -> TestEnv {
        Self::start(
            ClusterSpec {
                standbys: 1,
                ..ClusterSpec::default()
            },
            |c| c.pool_mode = pgswitch::config::PoolMode::Session,
        )
        .await
    }

    pub fn port(&self) -> u16 {
        self.proxy.listen_addr.port()
    }

    /// A libpq connection string through pgswitch.
    pub fn dsn(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=postgres",
            self.port()
        )
    }

    pub fn app_dsn(&self) -> String {
        self.dsn(USER, PASSWORD)
    }

    /// Connects with tokio-postgres through pgswitch.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.app_dsn()).await
    }
}

/// Connects with tokio-postgres to `dsn` (pgswitch's, from [`TestEnv::app_dsn`]) and drives the
/// connection in a task of its own; usable from tasks that cannot borrow the `TestEnv`.
pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    // The connection's task runs on when its handle is dropped.
    connect_watched(dsn).await.0
}

/// [`connect`], with the handle of the connection's task: its end (and error) can be awaited.
pub async fn connect_watched(
    dsn: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect through pgswitch");
    (client, tokio::spawn(connection))
}

/// The SQLSTATE a connection ended with.
pub async fn ended_with(
    what: &str,
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) -> String {
    let end = within(what, Duration::from_secs(20), connection)
        .await
        .expect("connection task");
    let e = end.expect_err("the connection ends with an error");
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| panic!("{what}: ended without a SQLSTATE: {e}"))
}

/// The first column of the first row a simple query returns, as text (`<NULL>` for NULL);
/// fails the test on an error, no row, or no answer within 30 s.
pub async fn simple_value(client: &tokio_postgres::Client, sql: &str) -> String {
    let messages = within(sql, Duration::from_secs(30), client.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    for m in messages {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
            return row.get(0).unwrap_or("<NULL>").to_string();
        }
    }
    panic!("{sql}: no row returned")
}

/// Awaits `f`, failing the test when it takes longer than `limit`.
pub async fn within<F: Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {limit:?}"),
    }
}

/// SQL run directly on the primary (`nodes[0]`) as the superuser, not through pgswitch.
pub async fn on_primary(env: &TestEnv, sql: &str) -> String {
    let node = env.cluster.nodes[0].clone();
    let sql = sql.to_string();
    tokio::task::spawn_blocking(move || node.psql(&sql))
        .await
        .expect("psql task")
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Polls `sql` on the primary until it returns `want`, for at most `limit`.
pub async fn wait_on_primary(env: &TestEnv, sql: &str, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = on_primary(env, sql).await;
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "the primary never returned {want:?} for {sql:?} within {limit:?}; last: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
