//! Transaction pooling against a real PostgreSQL: many clients over few server connections,
//! with the protocol modes and prepared statements real drivers use.

mod common;

use std::process::Command;

use common::{TestEnv, PASSWORD, USER};
use pgswitch::config::PoolMode;
use pgswitch::harness::ClusterSpec;

async fn transaction_env(pool_size: usize) -> TestEnv {
    TestEnv::start(
        ClusterSpec {
            standbys: 0,
            ..ClusterSpec::default()
        },
        |c| {
            c.pool_mode = PoolMode::Transaction;
            c.default_pool_size = pool_size;
            c.pool_timeout_ms = 60_000;
        },
    )
    .await
}

/// Runs pgbench through pgswitch and returns its output; panics with the output on failure.
fn pgbench(port: u16, args: &[&str]) -> String {
    let out = Command::new("pgbench")
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
        let init = Command::new("pgbench")
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
