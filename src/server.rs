//! Starting and stopping a whole pgswitch: control plane, pools, listener, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::backend::Fences;
use crate::cluster::ClusterView;
use crate::config::Config;
use crate::config::CoordinationMode;
use crate::coord::{Coordinator, StateFile};
use crate::failover::Controller;
use crate::frontend::{self, Live, Proxy};
use crate::pool::Pools;
use crate::{admin, metrics};

/// A running pgswitch.
pub struct Running {
    pub listen_addr: SocketAddr,
    /// Where the admin HTTP API (/metrics, /status, ...) actually listens.
    pub admin_addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub cluster: ClusterView,
    config_tx: watch::Sender<Arc<Config>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What `start` needs besides a config that parses: the TLS files load, the users' secrets
/// parse, the coordination mode is one this build runs, the addresses parse. `check-config` runs
/// it too, so a config it passes is one `run` starts with (ports taken by others aside).
pub fn preflight(config: Arc<Config>) -> anyhow::Result<Live> {
    if config.coordination.mode == CoordinationMode::Etcd {
        anyhow::bail!(
            "coordination.mode: \"etcd\" is not available in this build; use \"standalone\""
        );
    }
    config.listen_addr()?;
    config.admin_addr()?;
    Live::new(config).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Starts every part of pgswitch and returns once the client port is listening.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    // First, so that nothing the data path records is lost.
    metrics::install();
    let config = Arc::new(config);
    let live = preflight(config.clone())?;
    let fences = Arc::new(Fences::default());
    let pools = Arc::new(Pools::default());
    let coord: Arc<dyn Coordinator> = match config.coordination.mode {
        CoordinationMode::Standalone => Arc::new(StateFile::new(&config.coordination.state_file)),
        CoordinationMode::Etcd => anyhow::bail!("coordination.mode: \"etcd\" is not available"),
    };
    let (config_tx, config_rx) = watch::channel(config.clone());
    let (mut controller, cluster, switchover) =
        Controller::new(config_rx, coord, fences.clone(), pools.clone());
    controller.start().await.context("cluster state")?;
    let mut tasks = vec![tokio::spawn(controller.run())];
    let proxy = Arc::new(Proxy::new(
        live,
        cluster.clone(),
        fences,
        pools,
        Some(switchover),
    ));
    tasks.push(tokio::spawn(
        proxy
            .pools
            .clone()
            .run_idle_reaper(config.server_idle_timeout(), cluster.clone()),
    ));
    let addr = config.listen_addr()?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let listen_addr = listener.local_addr()?;
    let admin_bind = config.admin_addr()?;
    let admin_listener = TcpListener::bind(admin_bind)
        .await
        .with_context(|| format!("cannot listen on {admin_bind} (admin_listen)"))?;
    let admin_addr = admin_listener.local_addr()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    tasks.push(tokio::spawn(admin::serve(
        admin_listener,
        admin::Admin::from_config(proxy.clone()),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(frontend::serve(
        listener,
        proxy.clone(),
        shutdown_rx,
    )));
    info!(%listen_addr, %admin_addr, pool_mode = ?config.pool_mode, "pgswitch listening");
    Ok(Running {
        listen_addr,
        admin_addr,
        proxy,
        cluster,
        config_tx,
        shutdown,
        tasks,
    })
}

impl Running {
    /// Puts a new configuration in force without dropping connections: users and passwords,
    /// pool sizes, timeouts, TLS certificates, diagnosis and failover settings. A config that
    /// does not load (bad TLS files, bad secrets) is rejected and the old one stays. Returns the
    /// changed keys that need a restart.
    pub fn reload(&self, config: Config) -> anyhow::Result<Vec<String>> {
        let config = Arc::new(config);
        let live = match Live::new(config.clone()) {
            Ok(l) => l,
            Err(e) => {
                metrics::config_reloaded(false);
                return Err(e.into());
            }
        };
        let restart = self.proxy.reload(live);
        self.config_tx.send_replace(config);
        metrics::config_reloaded(true);
        Ok(restart)
    }

    /// Stops accepting clients, lets sessions finish for up to `shutdown_timeout_ms`, then
    /// stops everything.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let deadline = Instant::now() + self.proxy.config().shutdown_timeout();
        while self.proxy.client_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.proxy.client_count();
        if left > 0 {
            info!(
                clients = left,
                "shutdown timeout reached; closing remaining sessions"
            );
        }
        // The sessions end when the runtime drops their tasks (the process exits after this);
        // each tells its client 57P01 as it goes.
        self.proxy.close_sessions();
        for task in self.tasks {
            task.abort();
        }
        info!("pgswitch stopped");
    }
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP reloads `path`.
pub async fn run_until_signal(config: Config, path: std::path::PathBuf) -> anyhow::Result<()> {
    let running = start(config).await?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = wait_for_signal() => break,
            _ = hangup.recv() => match Config::load(&path) {
                Ok(config) => match running.reload(config) {
                    Ok(restart) if restart.is_empty() => info!(path = %path.display(), "SIGHUP: configuration reloaded"),
                    Ok(restart) => warn!(path = %path.display(), keys = ?restart, "SIGHUP: configuration reloaded; these changes need a restart"),
                    Err(e) => {
                        warn!(path = %path.display(), error = %format!("{e:#}"), "SIGHUP: new configuration rejected; the old one stays");
                    }
                },
                Err(e) => {
                    metrics::config_reloaded(false);
                    warn!(path = %path.display(), error = %e, "SIGHUP: new configuration rejected; the old one stays");
                }
            },
        }
    }
    info!("shutdown requested");
    running.shutdown().await;
    Ok(())
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
