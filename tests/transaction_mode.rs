//! Transaction pooling against a real PostgreSQL: many clients over few server connections,
//! with the protocol modes and prepared statements real drivers use.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{connect_watched, ended_with, simple_value, within, TestEnv, PASSWORD, USER};
use pgswitch::config::{Config, PoolMode};
use pgswitch::harness::ClusterSpec;
use tokio_postgres::NoTls;

const STEP: Duration = Duration::from_secs(30);

async fn transaction_env(pool_size: usize) -> TestEnv {
    transaction_env_with(pool_size, |_| {}).await
}

/// A one-node cluster behind pgswitch in transaction mode, with more settings from `tweak`.
async fn transaction_env_with(pool_size: usize, tweak: impl FnOnce(&mut Config)) -> TestEnv {
    TestEnv::start(
        ClusterSpec {
            standbys: 0,
            ..ClusterSpec::default()
        },
        |c| {
            c.pool_mode = PoolMode::Transaction;
            c.default_pool_size = pool_size;
            c.pool_timeout_ms = 60_000;
            tweak(c);
        },
    )
    .await
}

/// Runs pgbench through pgswitch and returns its output; panics with the output on failure.
fn pgbench(port: u16, args: &[&str]) -> String {
    let out = Command::new(
        pgswitch::harness::pg_bin_dir()
            .expect("PostgreSQL binaries")
            .join("pgbench"),
    )
    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER, "-n"])
    .args(args)
    .arg("postgres")
    .env("PGPASSWORD", PASSWORD)
    .output()
    .expect("pgbench runs (install postgresql-client / run scripts/test.sh)");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_extended_and_prepared_run_with_100_clients_over_10_servers() {
    let env = transaction_env(10).await;
    let port = env.port();
    tokio::task::spawn_blocking(move || {
        let init = Command::new(
            pgswitch::harness::pg_bin_dir()
                .expect("PostgreSQL binaries")
                .join("pgbench"),
        )
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            USER,
            "-i",
            "-s",
            "1",
            "-q",
            "postgres",
        ])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("pgbench -i runs");
        assert!(
            init.status.success(),
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        for mode in ["simple", "extended", "prepared"] {
            let text = pgbench(port, &["-c", "100", "-j", "2", "-t", "20", "-M", mode]);
            println!("pgbench -M {mode}:\n{text}");
            assert!(
                text.contains("number of transactions actually processed: 2000/2000"),
                "-M {mode} did not process every transaction:\n{text}"
            );
            assert!(
                !text.contains("aborted"),
                "-M {mode} aborted clients:\n{text}"
            );
            let select_only = pgbench(
                port,
                &["-c", "100", "-j", "2", "-t", "50", "-S", "-M", mode],
            );
            assert!(
                select_only.contains("number of transactions actually processed: 5000/5000"),
                "-S -M {mode}:\n{select_only}"
            );
        }
    })
    .await
    .expect("pgbench task");
    let servers = env.cluster.nodes[0]
        .psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
        .expect("count server connections");
    assert!(
        servers.parse::<usize>().expect("a number") <= 10,
        "pgswitch opened more server connections than the pool size: {servers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tokio_postgres_clients_share_five_servers_with_prepared_statements() {
    let env = transaction_env(5).await;
    let setup = env.connect().await;
    setup
        .batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
        .await
        .expect("create table");
    let mut tasks = Vec::new();
    for c in 0..50i32 {
        let dsn = env.app_dsn();
        tasks.push(tokio::spawn(async move {
            let client = common::connect(&dsn).await;
            // Statements prepared once per client and used across many transactions, which
            // land on whichever of the 5 servers is free.
            let insert = client
                .prepare("INSERT INTO kv (k, v) VALUES ($1, $2)")
                .await
                .expect("prepare insert");
            let select = client
                .prepare("SELECT v FROM kv WHERE k = $1")
                .await
                .expect("prepare select");
            let count = client
                .prepare("SELECT count(*) FROM kv WHERE k >= $1 AND k < $2")
                .await
                .expect("prepare count");
            for i in 0..20i32 {
                let k = c * 1000 + i;
                client
                    .execute(&insert, &[&k, &format!("value {k}")])
                    .await
                    .expect("insert through a prepared statement");
                let row = client.query_one(&select, &[&k]).await.expect("select");
                assert_eq!(row.get::<_, String>(0), format!("value {k}"));
            }
            let row = client
                .query_one(&count, &[&(c * 1000), &(c * 1000 + 1000)])
                .await
                .expect("count");
            assert_eq!(row.get::<_, i64>(0), 20);
            // An explicit transaction keeps its server until COMMIT.
            let mut client = client;
            let tx = client.transaction().await.expect("begin");
            tx.execute(&insert, &[&(c * 1000 + 999), &"in tx"])
                .await
                .expect("insert in transaction");
            tx.commit().await.expect("commit");
        }));
    }
    for t in tasks {
        t.await.expect("client task succeeded");
    }
    let total = setup
        .query_one("SELECT count(*) FROM kv", &[])
        .await
        .expect("total");
    assert_eq!(total.get::<_, i64>(0), 50 * 21);
    let servers = env.cluster.nodes[0]
        .psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'")
        .expect("count server connections");
    assert!(
        servers.parse::<usize>().expect("a number") <= 5,
        "more server connections than the pool size: {servers}"
    );
}

/// Starts `SELECT pg_sleep(30)` on `victim`, cancels it after 500 ms with the client's cancel
/// key, and checks that it ends with 57014; returns how long the cancel took.
async fn cancel_a_long_query(victim: tokio_postgres::Client) -> std::time::Duration {
    let token = victim.cancel_token();
    let long = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(30)").await });
    // Let the long query start on some server.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel request sent");
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), long)
        .await
        .expect("the cancelled query ends")
        .expect("task");
    let err = result.expect_err("the long query was cancelled");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{err}"
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_only_the_query_of_the_client_that_sent_it() {
    let env = transaction_env(3).await;
    let victim = env.connect().await;
    // Twenty other clients keep the three servers busy with short sleeps.
    let mut others = Vec::new();
    for _ in 0..20 {
        let client = env.connect().await;
        others.push(tokio::spawn(async move {
            for _ in 0..10 {
                client
                    .simple_query("SELECT pg_sleep(0.05)")
                    .await
                    .expect("another client's query is never cancelled");
            }
        }));
    }
    let took = cancel_a_long_query(victim).await;
    println!("cancelled in {took:?}");
    for t in others {
        t.await.expect("other clients finished without a cancel");
    }
    // Cancels sent while the client holds no server go nowhere.
    let idle = env.connect().await;
    idle.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel of an idle client is accepted");
    idle.simple_query("SELECT 1")
        .await
        .expect("the idle client is unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_and_asyncpg_run_prepared_statements_with_50_clients_over_5_servers() {
    common::python::require_python_modules("psycopg, pytest, asyncpg");
    let env = transaction_env(5).await;
    let dsn = env.app_dsn();
    common::python::pytest("tests/python_tx", dsn).await;
}

/// Both Python drivers at once, 32 clients over 4 servers that expire every second and keep two
/// prepared statements each, with idle timeouts set: prepared statements, pipelines, cursors,
/// transactions, SETs, CopyFail, clients vanishing mid-result and clients cancelling their own
/// queries. Each client checks every answer (tests/python_mixed, which passes against
/// PostgreSQL directly too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_drivers_with_cancels_vanishing_clients_and_server_churn_never_disturb_each_other() {
    common::python::require_python_modules("psycopg, pytest, asyncpg");
    let env = transaction_env_with(4, |c| {
        c.prepared_statement_cache_size = 2;
        c.server_lifetime_ms = 1_000;
        // Far above any pause of these clients: every client's idle timer is armed and moved
        // all along, and must never close one.
        c.idle_transaction_timeout_ms = 10_000;
        c.client_idle_timeout_ms = 15_000;
    })
    .await;
    let dsn = env.app_dsn();
    // Meanwhile a reload every 250 ms moves the idle timeouts (still far above any pause), and so
    // wakes every session, whatever it is doing: none may be disturbed or closed.
    let reloads = std::sync::atomic::AtomicU32::new(0);
    let reloading = async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let n = reloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut config = Config::clone(&env.proxy.proxy.config());
            config.idle_transaction_timeout_ms = 10_000 + u64::from(n % 2) * 1_000;
            config.client_idle_timeout_ms = 15_000 + u64::from(n % 2) * 1_000;
            env.proxy.reload(config).expect("reload");
        }
    };
    tokio::select! {
        () = common::python::pytest("tests/python_mixed", dsn) => {}
        () = reloading => unreachable!("reloads until the run ends"),
    }
    let reloads = reloads.into_inner();
    assert!(reloads >= 40, "only {reloads} reloads during the 20 s run");
    // The 20 s run kept to its 4 servers, and replaced them as they reached their lifetime.
    let servers = app_backends(&env);
    assert!(
        servers.len() <= 4,
        "{} server connections for a pool of 4",
        servers.len()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let old: Vec<_> = servers
        .iter()
        .filter(|(_, started)| *started < now - 10.0)
        .collect();
    assert!(
        old.is_empty(),
        "server connections outlived their 1 s lifetime: {old:?}"
    );
}

/// Backend pids of pgswitch's server connections on the primary, with their start times.
fn app_backends(env: &TestEnv) -> Vec<(i64, f64)> {
    env.cluster.nodes[0]
        .psql(
            "SELECT pid, extract(epoch FROM backend_start) FROM pg_stat_activity \
             WHERE usename = 'app' AND backend_type = 'client backend' ORDER BY backend_start",
        )
        .expect("pg_stat_activity")
        .lines()
        .filter_map(|l| {
            let (pid, start) = l.split_once('|')?;
            Some((pid.parse().ok()?, start.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connections_keep_a_minimum_expire_with_their_lifetime_and_open_at_a_bounded_rate() {
    let env = transaction_env_with(10, |c| {
        c.min_pool_size = 3;
        c.server_lifetime_ms = 2_000;
        c.server_connect_rate = 5;
        c.server_idle_timeout_ms = 60_000;
    })
    .await;
    let client = env.connect().await;
    client.simple_query("SELECT 1").await.expect("query");
    // min_pool_size: the pool fills up to 3 connections on its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while app_backends(&env).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never reached min_pool_size"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let first: Vec<i64> = app_backends(&env).iter().map(|b| b.0).collect();
    // server_lifetime_ms: after a few lifetimes none of the first connections is left, while
    // the minimum stays.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        client.simple_query("SELECT 1").await.expect("query");
        let now = app_backends(&env);
        if now.iter().all(|b| !first.contains(&b.0)) && now.len() >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections outlived server_lifetime_ms: first {first:?}, now {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // server_connect_rate = 5/s: ten clients needing ten connections at once never get more
    // than about five new server connections in any one second.
    let burst = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let dsn = env.app_dsn();
        tasks.push(tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            c.simple_query("SELECT pg_sleep(1)").await.expect("sleep");
        }));
    }
    let mut seen = std::collections::BTreeMap::new();
    while !tasks.iter().all(|t| t.is_finished()) {
        for (pid, start) in app_backends(&env) {
            seen.insert(pid, start);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let mut starts: Vec<f64> = seen
        .values()
        .copied()
        .filter(|s| *s >= burst - 0.05)
        .collect();
    starts.sort_by(|a, b| a.total_cmp(b));
    let busiest = starts
        .iter()
        .map(|&s| starts.iter().filter(|&&t| t >= s && t < s + 1.0).count())
        .max()
        .unwrap_or(0);
    println!(
        "{} server connections opened after the burst; at most {busiest} in one second",
        starts.len()
    );
    assert!(
        starts.len() >= 5,
        "the burst opened too few connections: {starts:?}"
    );
    assert!(
        busiest <= 6,
        "connections opened faster than server_connect_rate: {starts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_given_by_its_socket_directory_is_reached_over_the_unix_socket() {
    let cluster_spec = ClusterSpec {
        standbys: 0,
        ..ClusterSpec::default()
    };
    let env = TestEnv::start_on_sockets(cluster_spec, |c| {
        c.pool_mode = PoolMode::Transaction;
        c.default_pool_size = 3;
        c.pool_timeout_ms = 60_000;
    })
    .await;
    let socket_dir = env.cluster.nodes[0].socket_dir().display().to_string();
    let dsn = env.app_dsn();

    // Server connections are Unix-socket connections: PostgreSQL shows no client address.
    let client = env.connect().await;
    let row = client
        .query_one(
            "SELECT client_addr IS NULL AND client_port = -1 FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query over the socket");
    assert!(
        row.get::<_, bool>(0),
        "the server connection is not a Unix-socket connection"
    );

    // Prepared statements from 20 clients over 3 server connections.
    let mut tasks = Vec::new();
    for i in 0..20i32 {
        let dsn = dsn.clone();
        tasks.push(tokio::spawn(async move {
            let client = common::connect(&dsn).await;
            let stmt = client
                .prepare("SELECT $1::int4 * 2")
                .await
                .expect("prepare");
            for j in 0..50i32 {
                let row = client
                    .query_one(&stmt, &[&(i * 100 + j)])
                    .await
                    .expect("execute");
                assert_eq!(row.get::<_, i32>(0), (i * 100 + j) * 2);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }

    // A cancel travels over the socket too and stops the query.
    cancel_a_long_query(env.connect().await).await;
    client
        .simple_query("SELECT 1")
        .await
        .expect("the other client is unaffected");

    // Diagnosis (which found the primary the queries above went to) uses the socket as well.
    let topology = env.proxy.cluster.current();
    assert_eq!(
        topology.primary,
        Some(0),
        "the socket node is known as the primary"
    );
    assert!(
        topology.nodes[0].healthy && topology.nodes[0].host == socket_dir,
        "{:?}",
        topology.nodes[0]
    );
}

/// A statement's Parse, Bind, Describe and Close are rewritten in transaction mode. Megabytes of
/// parameter values (a Bind) and of query text (a Parse) get through, whether the statement is
/// named or unnamed, while other clients keep using the same two servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_and_parses_of_megabytes_get_through_while_others_run() {
    const SIZE: usize = 20 * 1024 * 1024;
    let env = transaction_env(2).await;
    let client = env.connect().await;
    let limit = std::time::Duration::from_secs(120);
    let mut others = Vec::new();
    for _ in 0..4 {
        let other = env.connect().await;
        others.push(tokio::spawn(async move {
            let select = other.prepare("SELECT $1::int + 1").await.expect("prepare");
            for i in 0..200i32 {
                let row = other.query_one(&select, &[&i]).await.expect("small query");
                assert_eq!(row.get::<_, i32>(0), i + 1);
            }
        }));
    }

    let data = vec![b'y'; SIZE];
    // A named statement (tokio-postgres prepares one per query): its Bind is rewritten.
    let row = common::within(
        "20 MB bind of a named statement",
        limit,
        client.query_one(
            "SELECT length($1::bytea), $1::bytea = repeat('y', 20*1024*1024)::bytea",
            &[&data],
        ),
    )
    .await
    .expect("20 MB bind of a named statement");
    assert_eq!(row.get::<_, i32>(0) as usize, SIZE);
    assert!(row.get::<_, bool>(1), "every byte arrived");

    // The unnamed statement (psycopg, query_typed): passed through as it is.
    let row = common::within(
        "20 MB bind of the unnamed statement",
        limit,
        client.query_typed(
            "SELECT length($1), $1 = repeat('y', 20*1024*1024)::bytea",
            &[(&data, tokio_postgres::types::Type::BYTEA)],
        ),
    )
    .await
    .expect("20 MB bind of the unnamed statement");
    assert_eq!(row[0].get::<_, i32>(0) as usize, SIZE);
    assert!(row[0].get::<_, bool>(1), "every byte arrived");

    // Named statements whose query text is 2 MB: a Parse is rewritten whole. Six clients at
    // once over the two servers: most wait for a server while their Parse arrives.
    let text = "z".repeat(2 * 1024 * 1024);
    let sql = format!("SELECT length('{text}') + $1::int");
    let mut big = Vec::new();
    for c in 0..6i32 {
        let client = env.connect().await;
        let sql = sql.clone();
        big.push(tokio::spawn(async move {
            let statement = client.prepare(&sql).await.expect("prepare a 2 MB query");
            for i in 0..3i32 {
                let row = client
                    .query_one(&statement, &[&(c * 10 + i)])
                    .await
                    .expect("run it");
                assert_eq!(row.get::<_, i32>(0), 2 * 1024 * 1024 + c * 10 + i);
            }
        }));
    }
    for task in big {
        common::within("six clients prepare a 2 MB query", limit, task)
            .await
            .expect("a client with a 2 MB query");
    }

    for t in others {
        t.await.expect("other clients were not disturbed");
    }
    let row = client
        .query_one("SELECT 'after'", &[])
        .await
        .expect("after");
    assert_eq!(row.get::<_, &str>(0), "after");
}

/// pgJDBC, the driver whose `getMetaData()` breaks on poolers that cannot describe a statement
/// the server has not seen: 30 connections over 3 servers, with server-side prepared statements
/// from the first use (`prepareThreshold=1`) and always (`-1`). `tests/jdbc/JdbcProbe.java` says
/// what each connection does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_metadata_batches_cursors_and_big_parameters_over_three_servers() {
    let jar = std::path::PathBuf::from(
        std::env::var("PGSWITCH_JDBC_JAR")
            .unwrap_or_else(|_| "/usr/share/java/postgresql.jar".to_string()),
    );
    const HINT: &str = "install a JDK and pgJDBC (apt-get install default-jdk-headless \
        libpostgresql-jdbc-java), or run scripts/test.sh, which does";
    assert!(jar.is_file(), "no pgJDBC at {}: {HINT}", jar.display());
    let env = transaction_env(3).await;
    let classes = env.cluster.dir.join("jdbc-classes");
    std::fs::create_dir_all(&classes).expect("class directory");
    let javac = Command::new("javac")
        .arg("-cp")
        .arg(&jar)
        .arg("-d")
        .arg(&classes)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/jdbc/JdbcProbe.java"
        ))
        .output()
        .unwrap_or_else(|e| panic!("cannot run javac ({e}): {HINT}"));
    assert!(
        javac.status.success(),
        "javac failed:\n{}",
        String::from_utf8_lossy(&javac.stderr)
    );
    let classpath = format!("{}:{}", jar.display(), classes.display());
    let port = env.port().to_string();
    for threshold in ["1", "-1"] {
        let args = [
            "-cp",
            &classpath,
            "JdbcProbe",
            "127.0.0.1",
            &port,
            "postgres",
            USER,
            PASSWORD,
            threshold,
            "30",
        ];
        let run = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            move || Command::new("java").args(&args).output()
        });
        let out = common::within("the JDBC probe", std::time::Duration::from_secs(240), run)
            .await
            .expect("java task")
            .unwrap_or_else(|e| panic!("cannot run java ({e}): {HINT}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{}", text.trim());
        assert!(out.status.success(), "the JDBC probe failed:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_status_never_counts_a_connection_twice_while_transactions_run() {
    const SIZE: usize = 2;
    const CLIENTS: usize = 6;
    let env = transaction_env(SIZE).await;
    let pools = env.proxy.proxy.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A scraper on its own thread reads the pools as fast as it can, like `/metrics` and
    // `/status` do, while clients check connections in and out.
    let scraper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut reads, mut wrong) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for pool in pools.pools.all() {
                    let s = pool.status();
                    reads += 1;
                    // Each client holding a connection or waiting for one counts once.
                    let twice = s.servers_active + s.clients_waiting > CLIENTS;
                    if (s.servers_active + s.servers_idle > SIZE || twice) && wrong.len() < 5 {
                        wrong.push(s);
                    }
                }
            }
            (reads, wrong)
        })
    };
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = env.connect().await;
        tasks.push(tokio::spawn(async move {
            for q in 0..1500 {
                let want = c * 10000 + q;
                let got = client
                    .simple_query(&format!("SELECT {want}"))
                    .await
                    .expect("query")
                    .into_iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                        _ => None,
                    });
                assert_eq!(got, Some(want.to_string()));
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, wrong) = scraper.join().expect("scraper");
    assert!(
        reads > 1000,
        "the scraper read the pools only {reads} times"
    );
    assert!(
        wrong.is_empty(),
        "a pool of {SIZE} was seen with more connections than it has, or {CLIENTS} clients \
         counted more than once ({reads} reads): {wrong:?}"
    );
}

/// Each client's `search_path` (with a startup value, set by `SET` in any form, or none) and
/// startup `-c` settings are what it sees on every transaction, while three clients take
/// turns on one server connection; nothing one client set reaches another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_follow_each_client_and_never_leak_to_another() {
    let env = transaction_env(1).await;
    let default_path = "\"$user\", public";
    let plain = env.connect().await;
    let mut cfg: tokio_postgres::Config = env.app_dsn().parse().expect("dsn");
    cfg.options("-c statement_timeout=1234 -c search_path=myschema,public");
    let (started, connection) = within("connect with options", STEP, cfg.connect(NoTls))
        .await
        .expect("connect with options");
    tokio::spawn(connection);
    let setter = env.connect().await;

    let path = "SHOW search_path";
    let timeout = "SHOW statement_timeout";
    assert_eq!(simple_value(&started, path).await, "myschema,public");
    assert_eq!(simple_value(&started, timeout).await, "1234ms");
    assert_eq!(
        simple_value(&plain, path).await,
        default_path,
        "a startup search_path reached the next client of the server"
    );
    assert_eq!(
        simple_value(&plain, timeout).await,
        "0",
        "a startup statement_timeout reached the next client of the server"
    );
    assert_eq!(simple_value(&started, path).await, "myschema,public");

    // SET as a simple query, then the others take the server in between.
    simple_value(&setter, "SET search_path = s1; SELECT 1").await;
    for _ in 0..2 {
        assert_eq!(simple_value(&setter, path).await, "s1");
        assert_eq!(simple_value(&plain, path).await, default_path);
        assert_eq!(simple_value(&started, path).await, "myschema,public");
    }
    // A SET rolled back is not kept; SET LOCAL lasts its transaction.
    within(
        "rolled back",
        STEP,
        setter.batch_execute("BEGIN; SET search_path = rolled_back; ROLLBACK"),
    )
    .await
    .expect("rolled-back SET");
    assert_eq!(simple_value(&plain, path).await, default_path);
    assert_eq!(simple_value(&setter, path).await, "s1");
    within(
        "local",
        STEP,
        setter.batch_execute("BEGIN; SET LOCAL search_path = only_here"),
    )
    .await
    .expect("SET LOCAL");
    assert_eq!(simple_value(&setter, path).await, "only_here");
    within("commit", STEP, setter.batch_execute("COMMIT"))
        .await
        .expect("COMMIT");
    assert_eq!(simple_value(&plain, path).await, default_path);
    assert_eq!(simple_value(&setter, path).await, "s1");
    // SET through Parse/Bind/Execute, and set_config() in a SELECT.
    within(
        "extended SET",
        STEP,
        setter.execute("SET search_path = s2", &[]),
    )
    .await
    .expect("extended SET");
    assert_eq!(simple_value(&plain, path).await, default_path);
    let row = within("extended SHOW", STEP, setter.query_one(path, &[]))
        .await
        .expect("extended SHOW");
    assert_eq!(row.get::<_, String>(0), "s2");
    within(
        "set_config",
        STEP,
        setter.query_one(
            "SELECT set_config('search_path', $1, false)",
            &[&"s3, public"],
        ),
    )
    .await
    .expect("set_config");
    assert_eq!(simple_value(&started, path).await, "myschema,public");
    assert_eq!(simple_value(&setter, path).await, "s3, public");
    // RESET: back to the default.
    simple_value(&setter, "RESET search_path; SELECT 1").await;
    assert_eq!(simple_value(&started, path).await, "myschema,public");
    assert_eq!(simple_value(&setter, path).await, default_path);
    within(
        "SET TO",
        STEP,
        setter.batch_execute("SET search_path TO s4"),
    )
    .await
    .expect("SET TO");

    // All three at once over the one server, many times.
    let turns = |client: tokio_postgres::Client, want: &'static str| {
        tokio::spawn(async move {
            for i in 0..100 {
                let got = simple_value(&client, "SHOW search_path").await;
                assert_eq!(got, want, "turn {i}");
            }
            client
        })
    };
    let a = turns(plain, "\"$user\", public");
    let b = turns(started, "myschema,public");
    let c = turns(setter, "s4");
    let (plain, started, _setter) = (
        a.await.expect("plain"),
        b.await.expect("started"),
        c.await.expect("setter"),
    );
    assert_eq!(simple_value(&started, timeout).await, "1234ms");
    assert_eq!(simple_value(&plain, timeout).await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_after_their_timeouts_and_free_their_server() {
    let env = transaction_env_with(1, |c| {
        // Wide margins: the clients that must stay are never idle for more than a fifth of it.
        c.idle_transaction_timeout_ms = 1_000;
        c.client_idle_timeout_ms = 3_000;
        c.pool_timeout_ms = 20_000;
    })
    .await;
    let dsn = env.app_dsn();
    env.connect()
        .await
        .simple_query("CREATE TABLE idle_t (n int)")
        .await
        .expect("create table");

    // A opens a transaction and goes quiet, holding the pool's only server: B waits for it.
    let (a, a_conn) = connect_watched(&dsn).await;
    a.simple_query("BEGIN; INSERT INTO idle_t VALUES (1)")
        .await
        .expect("A's transaction");
    // (pgswitch gives a logging-in client its greeting from a server: B's wait starts there.)
    let started = std::time::Instant::now();
    let b = within("B's login", STEP, env.connect()).await;
    within("B's query", STEP, b.simple_query("SELECT 1"))
        .await
        .expect("B gets the server A held");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "B got a server while A still held the only one ({:?})",
        started.elapsed()
    );
    assert_eq!(ended_with("A", a_conn).await, "25P03");
    assert!(a.simple_query("SELECT 1").await.is_err(), "A is closed");
    assert_eq!(
        simple_value(&b, "SELECT count(*) FROM idle_t").await,
        "0",
        "A's transaction was rolled back"
    );

    // Busy inside a transaction is not idle: a long query, then statements 200 ms apart.
    let c = env.connect().await;
    c.simple_query("BEGIN; SELECT pg_sleep(1.5); INSERT INTO idle_t VALUES (2)")
        .await
        .expect("a query longer than the idle timeout");
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.simple_query("SELECT 1")
            .await
            .expect("a statement inside the transaction");
    }
    c.simple_query("COMMIT").await.expect("commit");
    assert_eq!(simple_value(&c, "SELECT count(*) FROM idle_t").await, "1");
    drop(c);

    // Outside a transaction: D sits idle and is closed; E, querying every 500 ms, is not
    // (its SETs of search_path end in pgswitch reading the value back, the slow path).
    let (d, d_conn) = connect_watched(&dsn).await;
    d.simple_query("SELECT 1").await.expect("D's query");
    let e = env.connect().await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        e.simple_query("SET search_path TO public")
            .await
            .expect("a client that keeps working stays");
    }
    assert_eq!(ended_with("D", d_conn).await, "57P05");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_sets_the_idle_timeouts_for_clients_already_connected() {
    let env = transaction_env(3).await;
    let dsn = env.app_dsn();
    let (a, a_conn) = connect_watched(&dsn).await;
    let (b, b_conn) = connect_watched(&dsn).await;
    let (c, c_conn) = connect_watched(&dsn).await;
    let (d, d_conn) = connect_watched(&dsn).await;
    a.simple_query("CREATE TABLE idle_r (n int)")
        .await
        .expect("create table");
    // B sits in a transaction and C between transactions since before the reload, and neither
    // sends anything after it.
    b.simple_query("BEGIN; INSERT INTO idle_r VALUES (2)")
        .await
        .expect("B's transaction");
    c.simple_query("SELECT 1").await.expect("C's query");
    let mut config = Config::clone(&env.proxy.proxy.config());
    config.idle_transaction_timeout_ms = 300;
    config.client_idle_timeout_ms = 1_000;
    let restart = env.proxy.reload(config).expect("reload");
    assert!(restart.is_empty(), "nothing needs a restart: {restart:?}");
    // A and D send their next request after the reload.
    a.simple_query("BEGIN; INSERT INTO idle_r VALUES (1)")
        .await
        .expect("A's transaction");
    d.simple_query("SELECT 1").await.expect("D's query");
    assert_eq!(ended_with("A", a_conn).await, "25P03");
    assert_eq!(ended_with("D", d_conn).await, "57P05");
    // The reload woke the two already idle: they are timed from it.
    assert_eq!(ended_with("B", b_conn).await, "25P03");
    assert_eq!(ended_with("C", c_conn).await, "57P05");
    let check = env.connect().await;
    assert_eq!(
        simple_value(&check, "SELECT count(*) FROM idle_r").await,
        "0"
    );
}
