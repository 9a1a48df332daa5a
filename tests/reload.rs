//! SIGHUP reload of the real binary: passwords and pool sizes change under load without
//! dropping connections; a bad file is rejected and the old configuration stays.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgswitch::demo::demo_config;
use pgswitch::harness::{free_port, ClusterSpec, PgCluster};

struct Proxy {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Waits until the log contains `needle` (bounded).
    async fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no '{needle}' in the proxy log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The demo's config with the client password `client_password` and pool size `pool`; the
/// password pgswitch uses towards PostgreSQL stays "secret".
fn config_text(
    cluster: &PgCluster,
    port: u16,
    admin: u16,
    client_password: &str,
    pool: usize,
) -> String {
    demo_config(cluster, port, admin)
        .replace(
            "password = \"secret\"",
            &format!("password = \"{client_password}\"\nserver_password = \"secret\"\npool_size = {pool}"),
        )
        .replace("pool_mode = \"session\"", "pool_mode = \"transaction\"")
}

async fn connect(
    port: u16,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let dsn = format!("host=127.0.0.1 port={port} user=app password={password} dbname=postgres");
    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn pool_size(admin: u16) -> u64 {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_pgswitch"))
            .args([
                "status",
                "--json",
                "--admin",
                &format!("http://127.0.0.1:{admin}"),
            ])
            .output()
            .expect("pgswitch status runs")
    })
    .await
    .expect("status task");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    json["pools"][0]["size"]
        .as_u64()
        .expect("a pool with a size")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_passwords_and_pool_sizes_without_dropping_clients_and_keeps_the_old_config_on_error(
) {
    let cluster = tokio::task::spawn_blocking(|| {
        PgCluster::start(&ClusterSpec {
            standbys: 0,
            ..ClusterSpec::default()
        })
    })
    .await
    .expect("cluster task")
    .expect("cluster starts");
    let (port, admin) = (free_port().expect("port"), free_port().expect("port"));
    let path = cluster.dir.join("reload.toml");
    std::fs::write(&path, config_text(&cluster, port, admin, "secret", 20))
        .expect("config written");
    let log = cluster.dir.join("reload-proxy.log");
    let child = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["run", "--config"])
        .arg(&path)
        .env("PGSWITCH_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("pgswitch starts");
    let proxy = Proxy { child, log };
    proxy.wait_log("pgswitch listening").await;

    // A client connected before the reload, with a workload running through the change.
    let before = connect(port, "secret")
        .await
        .expect("old password works before the reload");
    before
        .batch_execute("CREATE TABLE reload_t (id int)")
        .await
        .expect("create");
    assert_eq!(pool_size(admin).await, 20);
    let writer = {
        let client = connect(port, "secret").await.expect("writer connects");
        tokio::spawn(async move {
            let mut n = 0;
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                client
                    .execute("INSERT INTO reload_t VALUES ($1)", &[&n])
                    .await
                    .expect("writes keep working across the reload");
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        })
    };

    std::fs::write(&path, config_text(&cluster, port, admin, "newsecret", 2))
        .expect("config rewritten");
    proxy.hangup();
    proxy.wait_log("SIGHUP: configuration reloaded").await;

    let old = connect(port, "secret")
        .await
        .expect_err("the old password is refused after the reload");
    assert_eq!(
        old.as_db_error().map(|e| e.code().code()),
        Some("28P01"),
        "{old}"
    );
    let after = connect(port, "newsecret")
        .await
        .expect("the new password works");
    after
        .simple_query("SELECT 1")
        .await
        .expect("new client runs queries");
    before
        .simple_query("SELECT 1")
        .await
        .expect("a client connected before the reload keeps working");
    assert_eq!(pool_size(admin).await, 2, "the pool took its new size");
    let written = writer.await.expect("writer task");
    assert!(written > 10, "the writer kept writing ({written} rows)");

    // A broken file is rejected and logged; the configuration in force stays.
    std::fs::write(&path, "listen = [this is not toml").expect("config broken");
    proxy.hangup();
    proxy.wait_log("new configuration rejected").await;
    connect(port, "newsecret")
        .await
        .expect("the configuration in force stays after a rejected reload")
        .simple_query("SELECT 1")
        .await
        .expect("query");
    // A change that needs a restart is named as such.
    std::fs::write(
        &path,
        config_text(&cluster, port, admin, "newsecret", 2)
            .replace("pool_mode = \"transaction\"", "pool_mode = \"session\""),
    )
    .expect("config rewritten");
    proxy.hangup();
    proxy.wait_log("need a restart").await;
    assert!(proxy.log().contains("pool_mode"), "{}", proxy.log());
}
