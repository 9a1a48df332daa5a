//! Who may fail over, and how the outcome is made durable and known to peers.
//!
//! Standalone mode keeps the cluster state in a local file, written atomically, so a restarted
//! pgswitch knows the epoch and which node it promoted and never trusts an old primary again.
//! Etcd mode will implement the same interface with a lease and compare-and-swap.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// The durable part of the topology.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Incremented by every change of primary.
    pub epoch: u64,
    /// The node promoted (or first found) as primary in this epoch.
    pub primary: Option<String>,
    /// Former primaries not yet rejoined as standbys: never routed to.
    #[serde(default)]
    pub quarantined: Vec<String>,
    /// A node that may have been promoted but is not published (pg_promote sent and its
    /// outcome unknown): a restarted pgswitch routes nothing and promotes no other node until
    /// it is seen in or out of recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingNode>,
}

/// What a restarted pgswitch needs to settle a pending promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingNode {
    /// The node that may have been promoted.
    pub node: String,
    /// The primary it replaces.
    pub old_primary: String,
    /// A planned switchover (the old primary was made read-only), not an automatic failover.
    #[serde(default)]
    pub switchover: bool,
    /// The other standbys the attempt detached from the old primary. Their `primary_conninfo`
    /// is not kept here (it may hold a password): should the promotion turn out undone, a
    /// restarted pgswitch points them (and the node) back at the old primary with the
    /// conninfo it builds for re-pointing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detached: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("cannot read state file {0}: {1}")]
    Read(PathBuf, String),
    #[error("cannot write state file {0}: {1}")]
    Write(PathBuf, String),
}

/// The decision to fail over and its publication, behind one small interface.
pub trait Coordinator: Send + Sync {
    /// The last published state (a fresh cluster: epoch 0, no primary).
    fn load(&self) -> BoxFuture<'_, Result<ClusterState, CoordError>>;
    /// Whether this proxy is the one allowed to run a failover now.
    fn may_fail_over(&self) -> BoxFuture<'_, bool>;
    /// Makes `state` durable (and, with peers, known to them) before it is acted on.
    fn publish<'a>(&'a self, state: &'a ClusterState) -> BoxFuture<'a, Result<(), CoordError>>;
}

/// Standalone: one proxy, a local state file.
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: &Path) -> StateFile {
        StateFile {
            path: path.to_path_buf(),
        }
    }

    fn read(&self) -> Result<ClusterState, CoordError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| CoordError::Read(self.path.clone(), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClusterState::default()),
            Err(e) => Err(CoordError::Read(self.path.clone(), e.to_string())),
        }
    }

    /// Write to a temporary file, fsync, rename over the old one, fsync the directory.
    fn write(&self, state: &ClusterState) -> Result<(), CoordError> {
        let err = |e: std::io::Error| CoordError::Write(self.path.clone(), e.to_string());
        let text = serde_json::to_string_pretty(state)
            .map_err(|e| CoordError::Write(self.path.clone(), e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(text.as_bytes()).map_err(err)?;
            f.write_all(b"\n").map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Coordinator for StateFile {
    fn load(&self) -> BoxFuture<'_, Result<ClusterState, CoordError>> {
        Box::pin(async move { self.read() })
    }

    fn may_fail_over(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }

    fn publish<'a>(&'a self, state: &'a ClusterState) -> BoxFuture<'a, Result<(), CoordError>> {
        Box::pin(async move { self.write(state) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn state_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("pgswitch-coord-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("state.json");
        let file = StateFile::new(&path);
        assert_eq!(
            file.load().await.expect("missing file is a fresh state"),
            ClusterState::default()
        );
        let state = ClusterState {
            epoch: 3,
            primary: Some("n1".into()),
            quarantined: vec!["n0".into()],
            pending: None,
        };
        file.publish(&state).await.expect("written");
        let text = std::fs::read_to_string(&path).expect("state file");
        assert!(
            !text.contains("pending"),
            "no pending node, no field: {text}"
        );
        assert_eq!(
            StateFile::new(&path).load().await.expect("read back"),
            state
        );
        let pending = ClusterState {
            pending: Some(PendingNode {
                node: "n2".into(),
                old_primary: "n1".into(),
                switchover: false,
                detached: vec!["n0".into()],
            }),
            ..state.clone()
        };
        file.publish(&pending).await.expect("written");
        assert_eq!(
            StateFile::new(&path).load().await.expect("read back"),
            pending
        );
        std::fs::write(&path, r#"{"epoch": 2, "primary": "n0"}"#).expect("old format");
        assert_eq!(
            StateFile::new(&path)
                .load()
                .await
                .expect("an old state file loads"),
            ClusterState {
                epoch: 2,
                primary: Some("n0".into()),
                ..ClusterState::default()
            }
        );
        std::fs::write(&path, "{not json").expect("corrupt");
        assert!(
            StateFile::new(&path).load().await.is_err(),
            "a corrupt state file is an error, not a fresh start"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
