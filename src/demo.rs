//! `pgswitch demo`: a local primary + 2 streaming standbys with pgswitch in front.

use std::fmt::Write as _;

use anyhow::Context as _;

use crate::config::Config;
use crate::harness::{ClusterSpec, PgCluster, SUPERUSER, SUPERUSER_PASSWORD};

/// The demo's config: session pooling is the safe default for a first look with psql.
pub fn demo_config(cluster: &PgCluster, port: u16, admin_port: u16) -> String {
    let mut text = format!(
        "listen = \"127.0.0.1:{port}\"\n\
         admin_listen = \"127.0.0.1:{admin_port}\"\n\
         pool_mode = \"session\"\n\
         default_pool_size = 20\n\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
         [control]\nuser = \"{SUPERUSER}\"\npassword = \"{SUPERUSER_PASSWORD}\"\ndatabase = \"postgres\"\n\n\
         [coordination]\nstate_file = \"{}/pgswitch.state\"\n",
        cluster.dir.display()
    );
    if let Some(script) = rejoin_script() {
        let _ = write!(
            text,
            "\n[failover]\nrejoin_command = \"{} {{old_data_dir}} {{new_host}} {{new_port}} {{node}} {{control_user}}\"\n",
            script.display()
        );
    }
    for node in &cluster.nodes {
        let _ = write!(
            text,
            "\n[[nodes]]\nname = \"{}\"\nhost = \"{}\"\nport = {}\ndata_dir = \"{}\"\n",
            node.name,
            node.host(),
            node.port,
            node.data_dir.display()
        );
    }
    text
}

/// The example rejoin hook shipped in `scripts/`, when run from the repository.
fn rejoin_script() -> Option<std::path::PathBuf> {
    let path = std::env::current_dir()
        .ok()?
        .join("scripts/rejoin-local.sh");
    path.is_file().then_some(path)
}

pub async fn run(port: u16) -> anyhow::Result<()> {
    println!("pgswitch demo: starting a primary and 2 streaming standbys (PostgreSQL as user postgres)...");
    let cluster = tokio::task::spawn_blocking(|| PgCluster::start(&ClusterSpec::default()))
        .await
        .context("cluster start task")??;
    let admin_port = crate::harness::free_port()?;
    let text = demo_config(&cluster, port, admin_port);
    let config_path = cluster.dir.join("pgswitch.toml");
    std::fs::write(&config_path, &text).context("writing the demo config")?;
    let config = Config::parse(&text).context("demo config")?;
    let running = crate::server::start(config).await?;
    println!();
    for node in &cluster.nodes {
        println!(
            "  node {:<3} 127.0.0.1:{:<5} data {}",
            node.name,
            node.port,
            node.data_dir.display()
        );
    }
    println!("  config   {}", config_path.display());
    println!();
    println!("Connect through pgswitch:");
    println!(
        "  PGPASSWORD=secret psql \"host=127.0.0.1 port={} user=app dbname=postgres\"",
        running.listen_addr.port()
    );
    println!();
    println!("Press Ctrl-C to stop everything.");
    crate::server::wait_for_signal().await;
    println!("stopping pgswitch and the cluster...");
    running.shutdown().await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .ok();
    println!("stopped.");
    Ok(())
}
