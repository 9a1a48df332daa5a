//! The cluster as pgswitch sees it: every node diagnosed over a control connection, and the
//! resulting `Topology` published through a `watch` channel. Pools and sessions only read it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::backend::ServerTarget;
use crate::config::{Config, NodeConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
    Unknown,
}

/// What one diagnosis of a node found.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub role: Role,
    pub healthy: bool,
    pub timeline: Option<u32>,
    /// Primary: current WAL LSN; standby: last received LSN.
    pub lsn: Option<String>,
    pub replay_lsn: Option<String>,
    pub latency_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

/// The published view of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    pub epoch: u64,
    /// Index into `nodes` of the node that takes writes, if any.
    pub primary: Option<usize>,
    pub nodes: Vec<NodeStatus>,
}

impl Topology {
    pub fn initial(config: &Config) -> Topology {
        Topology {
            epoch: 0,
            primary: None,
            nodes: config
                .nodes
                .iter()
                .map(|n| NodeStatus {
                    name: n.name.clone(),
                    host: n.host.clone(),
                    port: n.port,
                    role: Role::Unknown,
                    healthy: false,
                    timeline: None,
                    lsn: None,
                    replay_lsn: None,
                    latency_ms: None,
                    consecutive_failures: 0,
                    last_error: None,
                })
                .collect(),
        }
    }

    /// The server connections should go to, if a primary is known.
    pub fn primary_target(&self) -> Option<ServerTarget> {
        let node = self.nodes.get(self.primary?)?;
        Some(ServerTarget {
            node: Arc::from(node.name.as_str()),
            host: node.host.clone(),
            port: node.port,
        })
    }
}

/// Handle the data path uses to read the topology and to report a broken server connection.
#[derive(Clone)]
pub struct ClusterView {
    pub topology: watch::Receiver<Topology>,
    rediagnose: Arc<Notify>,
}

impl ClusterView {
    /// A passive signal: a server connection broke or could not be opened. Diagnose now
    /// instead of waiting for the next interval.
    pub fn report_server_failure(&self) {
        self.rediagnose.notify_one();
    }

    pub fn current(&self) -> Topology {
        self.topology.borrow().clone()
    }

    /// Waits until a primary is known, up to `limit`.
    pub async fn wait_for_primary(&self, limit: Duration) -> Option<(ServerTarget, u64)> {
        let mut rx = self.topology.clone();
        let wait = async {
            loop {
                {
                    let t = rx.borrow_and_update();
                    if let Some(target) = t.primary_target() {
                        return Some((target, t.epoch));
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }
}

/// Owns the topology: diagnoses nodes and publishes what it finds.
pub struct Monitor {
    config: Arc<Config>,
    tx: watch::Sender<Topology>,
    rediagnose: Arc<Notify>,
}

impl Monitor {
    pub fn new(config: Arc<Config>) -> (Monitor, ClusterView) {
        let (tx, rx) = watch::channel(Topology::initial(&config));
        let rediagnose = Arc::new(Notify::new());
        let view = ClusterView {
            topology: rx,
            rediagnose: rediagnose.clone(),
        };
        (
            Monitor {
                config,
                tx,
                rediagnose,
            },
            view,
        )
    }

    /// Diagnoses every node each `diagnosis.interval_ms`, or at once on a passive signal.
    pub async fn run(self) {
        let interval = Duration::from_millis(self.config.diagnosis.interval_ms);
        loop {
            self.diagnose_all().await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.rediagnose.notified() => {}
            }
        }
    }

    /// One diagnosis round: all nodes in parallel, then publish.
    pub async fn diagnose_all(&self) {
        let timeout = Duration::from_millis(self.config.diagnosis.timeout_ms);
        let probes = self
            .config
            .nodes
            .iter()
            .map(|node| diagnose(node, &self.config, timeout));
        let results = futures_util::future::join_all(probes).await;
        let previous = self.tx.borrow().clone();
        let mut next = previous.clone();
        for (status, result) in next.nodes.iter_mut().zip(results) {
            match result {
                Ok(d) => {
                    status.healthy = true;
                    status.role = d.role;
                    status.timeline = d.timeline;
                    status.lsn = d.lsn;
                    status.replay_lsn = d.replay_lsn;
                    status.latency_ms = Some(d.latency.as_secs_f64() * 1000.0);
                    status.consecutive_failures = 0;
                    status.last_error = None;
                }
                Err(e) => {
                    status.healthy = false;
                    status.consecutive_failures += 1;
                    status.latency_ms = None;
                    if status.last_error.as_deref() != Some(e.as_str()) {
                        warn!(node = %status.name, error = %e, "diagnosis failed");
                    }
                    status.last_error = Some(e);
                }
            }
        }
        next.primary = next
            .nodes
            .iter()
            .position(|n| n.healthy && n.role == Role::Primary);
        if next.primary != previous.primary {
            match next.primary {
                Some(i) => info!(node = %next.nodes[i].name, "primary found"),
                None => warn!("no node is serving writes"),
            }
        }
        self.tx.send_replace(next);
    }
}

struct Diagnosis {
    role: Role,
    timeline: Option<u32>,
    lsn: Option<String>,
    replay_lsn: Option<String>,
    latency: Duration,
}

async fn diagnose(
    node: &NodeConfig,
    config: &Config,
    timeout: Duration,
) -> Result<Diagnosis, String> {
    let started = Instant::now();
    let work = async {
        let mut pg = tokio_postgres::Config::new();
        pg.host(&node.host)
            .port(node.port)
            .user(&config.control.user)
            .dbname(&config.control.database)
            .application_name("pgswitch-diagnosis")
            .connect_timeout(timeout);
        if !config.control.password.is_empty() {
            pg.password(&config.control.password);
        }
        let (client, connection) = pg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), \
                 (SELECT timeline_id FROM pg_control_checkpoint())::int, \
                 CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text \
                      ELSE pg_current_wal_lsn()::text END, \
                 pg_last_wal_replay_lsn()::text",
                &[],
            )
            .await
            .map_err(|e| e.to_string());
        driver.abort();
        let row = row?;
        let in_recovery: bool = row.get(0);
        let timeline: Option<i32> = row.get(1);
        Ok(Diagnosis {
            role: if in_recovery {
                Role::Standby
            } else {
                Role::Primary
            },
            timeline: timeline.map(|t| t as u32),
            lsn: row.get(2),
            replay_lsn: row.get(3),
            latency: started.elapsed(),
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}
