//! The HA decision loop: diagnose every node, decide, act, publish. It is the only owner of the
//! `Topology`; pools and sessions read it through `ClusterView`.
//!
//! Every cycle that changes anything logs what it decided and why. The steps follow
//! DESIGN.md's "Failover, step by step": detect (consecutive failed diagnoses, corroborated by
//! the standbys' WAL receivers), hold and fence (no primary published, every server socket to
//! the old primary cut), freeze the standbys and choose the most advanced one, promote it,
//! publish epoch + 1 durably, re-point the other standbys, release held clients; later fence
//! the old primary when it returns and run the rejoin hook.
//!
//! A promotion that may have happened but is not published (pg_promote sent and its outcome
//! unknown, or a promoted node whose new epoch cannot be recorded) is a [`PendingPromotion`]:
//! until that node is seen in recovery or is published, nothing is routed, no other node is
//! promoted and no standby is pointed back at the old primary. It is recorded in the cluster
//! state (best effort), so a restarted pgswitch settles it before anything else.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{error, info, warn};

use crate::backend::{quote_literal, Fences};
use crate::cluster::{
    column, format_lsn, lsn_column, ClusterView, ControlConn, NodeStatus, Role, Topology,
};
use crate::config::Config;
use crate::coord::{ClusterState, Coordinator, PendingNode};
use crate::metrics::{self, FailoverMode, FailoverPhase, FailoverResult};
use crate::pool::Pools;

/// How soon a primary that failed one diagnosis is diagnosed again.
const RETRY_DELAY: Duration = Duration::from_millis(50);
/// How long running transactions may take to finish before a switchover cuts them.
const SWITCHOVER_DRAIN: Duration = Duration::from_secs(10);
/// How long a standby may take to replay what it received before promotion.
const CATCH_UP: Duration = Duration::from_secs(30);
/// How long the rejoin hook may run.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long to wait before running a failed rejoin hook again.
const REJOIN_RETRY: Duration = Duration::from_secs(30);
/// How long a switchover or failover target that got pg_promote but failed is watched for
/// leaving recovery before it is taken to be still a standby.
const PROMOTION_SETTLE: Duration = Duration::from_secs(5);
/// How a standby's `primary_conninfo` is read before it is detached, to be restored if no new
/// primary comes out of it.
const READ_CONNINFO: &str = "SELECT current_setting('primary_conninfo')";
/// The SQL of [`READ_ONLY`], as a literal that [`FENCE`] extends.
macro_rules! read_only_sql {
    () => {
        "ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf()"
    };
}
/// Makes a node refuse writes for good (persisted, so also after a restart or a promotion).
const READ_ONLY: &str = read_only_sql!();
/// Fences a primary: read-only as [`READ_ONLY`], and its client sessions ended.
const FENCE: &str = concat!(
    read_only_sql!(),
    "; SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid();"
);
/// How long a standby pgswitch re-pointed is given to stream before it is re-pointed again.
const REPOINT_RETRY: Duration = Duration::from_secs(30);

/// A planned switchover asked for through the admin API.
pub struct SwitchoverRequest {
    pub to: String,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// Where the admin API sends switchover requests.
#[derive(Clone)]
pub struct SwitchoverHandle(mpsc::Sender<SwitchoverRequest>);

impl SwitchoverHandle {
    /// Asks the controller to switch over to `to` and waits for the outcome.
    pub async fn switchover(&self, to: &str) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(SwitchoverRequest {
                to: to.to_string(),
                reply,
            })
            .await
            .map_err(|_| "the failover controller is not running".to_string())?;
        answer
            .await
            .map_err(|_| "the switchover was abandoned".to_string())?
    }
}

/// Whether the node answers, in recovery, every 200 ms for `settle`.
async fn stays_in_recovery(
    conn: &mut ControlConn,
    config: &Config,
    timeout: Duration,
    settle: Duration,
) -> bool {
    let deadline = Instant::now() + settle;
    loop {
        let in_recovery = conn
            .query_one(config, "SELECT pg_is_in_recovery()", timeout)
            .await
            .and_then(|row| column::<bool>(&row, 0));
        if !matches!(in_recovery, Ok(true)) {
            return false;
        }
        if Instant::now() >= deadline {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a failed `pg_promote` was refused before it wrote the promote signal file and
/// signalled the postmaster, going by the SQLSTATE the server raised: not allowed to run it
/// (42501, also a file that cannot be created for lack of permission) or a file error while
/// creating the signal file (58P01 no such directory, 53100 disk full, 58030 I/O error).
/// PostgreSQL raises nothing after the signal was sent: a promotion that does not finish in
/// time answers `false`. A statement timeout or a terminated session (57xxx) may come after
/// the signal, so it is never taken as a refusal; neither is no answer at all.
fn refused_before_signal(f: &crate::cluster::ControlFailure) -> Option<&'static str> {
    match f.sqlstate.as_deref()? {
        "42501" => Some("insufficient privilege"),
        "58P01" => Some("undefined file"),
        "53100" => Some("disk full"),
        "58030" => Some("I/O error"),
        _ => None,
    }
}

/// Why a promotion did not produce a primary.
#[derive(Debug, thiserror::Error)]
enum PromoteError {
    /// The node is still a standby, and pg_promote was not sent or was refused before it could
    /// act: another candidate may be tried.
    #[error("{0}")]
    NotPromoted(String),
    /// pg_promote was sent, yet the node still reports recovery: most likely not promoted
    /// (pg_promote failed or timed out), but not certainly.
    #[error("{0}")]
    StillInRecovery(String),
    /// The node may or may not have left recovery: nothing else may be promoted.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// How far a failed switchover got, which decides how it is undone.
#[derive(Debug)]
enum SwitchoverError {
    /// Before pg_promote was sent: the target is certainly still a standby.
    BeforePromotion(String),
    /// pg_promote was sent, or the target was promoted and could not be published: the target
    /// may be a primary.
    AtPromotion(String),
}

/// Why an automatic failover attempt published no new primary.
enum NoNewPrimary {
    /// Nothing was promoted: the cluster is as it was (the detached standbys follow the old
    /// primary again).
    Failed(FailoverResult, String),
    /// `target` may be, or is, a primary but is not published: it becomes a
    /// [`PendingPromotion`].
    Unsettled {
        target: usize,
        error: String,
        /// Whether `target` was seen out of recovery (then only its publication failed).
        left_recovery: bool,
    },
}

/// A switchover or failover that failed once its target may have been promoted. Nothing is
/// routed and no other node is promoted until the target is found in recovery (undo) or out
/// of it (finish publishing it). In a switchover the old primary stays read-only meanwhile; in
/// a failover it is down, and the standbys stay detached from it.
struct PendingPromotion {
    mode: FailoverMode,
    /// The primary the target replaces.
    old: usize,
    target: usize,
    /// The target's `primary_conninfo` before it was detached.
    target_conninfo: Option<String>,
    error: String,
    /// Whether the target was seen out of recovery and checkpointed (`after_promotion`).
    left_recovery: bool,
    /// When the switchover or failover began.
    started: Instant,
}

/// How a [`PendingPromotion`] was settled.
enum Settled {
    /// The target is still a standby. After a switchover the old primary serves again and the
    /// target follows it; after a failover the detached standbys (the target too) follow the
    /// old primary again and the next attempt may go on.
    Undone,
    /// The target is out of recovery and now published as the primary.
    Finished,
    /// Still unresolved, for the reason given (also the topology's reason).
    Pending(String),
}

/// What a finished rejoin hook reports.
struct RejoinOutcome {
    node: String,
    result: Result<(), String>,
}

pub struct Controller {
    config: Arc<Config>,
    /// Reloaded configurations (diagnosis and failover settings apply at the next cycle).
    config_rx: watch::Receiver<Arc<Config>>,
    coord: Arc<dyn Coordinator>,
    fences: Arc<Fences>,
    pools: Arc<Pools>,
    tx: watch::Sender<Topology>,
    rediagnose: Arc<Notify>,
    conns: Vec<ControlConn>,
    topology: Topology,
    state: ClusterState,
    /// Diagnoses in a row in which the primary did not serve writes.
    primary_failures: u32,
    failing_since: Option<Instant>,
    /// When the last diagnosis of every node began.
    diagnosis_started: Option<Instant>,
    /// The primary's last healthy diagnosis: LSN, timeline, synchronous_standby_names.
    last_primary_lsn: Option<u64>,
    last_primary_timeline: Option<u32>,
    last_sync_names: Option<String>,
    last_failover: Option<Instant>,
    /// The last failover attempt that did not produce a primary.
    last_attempt: Option<Instant>,
    requests: mpsc::Receiver<SwitchoverRequest>,
    rejoin_tx: mpsc::Sender<RejoinOutcome>,
    rejoin_rx: mpsc::Receiver<RejoinOutcome>,
    /// Rejoin hooks running or recently failed, by node, with when they started.
    rejoins: HashMap<String, Instant>,
    /// Standbys a failover detached from the primary with the `primary_conninfo` each had,
    /// by node index: restored when the failover ends without a new primary, dropped when a
    /// new primary is published.
    detached: HashMap<usize, String>,
    /// Standbys re-pointed at the primary because they followed a former primary, by node
    /// index, with when.
    repointed: HashMap<usize, Instant>,
    /// A switchover or failover whose target may have been promoted: settled before anything
    /// else.
    pending_promotion: Option<PendingPromotion>,
}

impl Controller {
    pub fn new(
        config_rx: watch::Receiver<Arc<Config>>,
        coord: Arc<dyn Coordinator>,
        fences: Arc<Fences>,
        pools: Arc<Pools>,
    ) -> (Controller, ClusterView, SwitchoverHandle) {
        let config = config_rx.borrow().clone();
        let topology = Topology::initial(&config);
        let (tx, rx) = watch::channel(topology.clone());
        let rediagnose = Arc::new(Notify::new());
        let (req_tx, requests) = mpsc::channel(4);
        let (rejoin_tx, rejoin_rx) = mpsc::channel(16);
        let conns = config.nodes.iter().cloned().map(ControlConn::new).collect();
        let view = ClusterView::new(rx, rediagnose.clone());
        (
            Controller {
                config,
                config_rx,
                coord,
                fences,
                pools,
                tx,
                rediagnose,
                conns,
                topology,
                state: ClusterState::default(),
                primary_failures: 0,
                failing_since: None,
                diagnosis_started: None,
                last_primary_lsn: None,
                last_primary_timeline: None,
                last_sync_names: None,
                last_failover: None,
                last_attempt: None,
                requests,
                rejoin_tx,
                rejoin_rx,
                rejoins: HashMap::new(),
                detached: HashMap::new(),
                repointed: HashMap::new(),
                pending_promotion: None,
            },
            view,
            SwitchoverHandle(req_tx),
        )
    }

    /// Loads the durable state and runs the first cycle, so a primary is known (if there is
    /// one) before clients are accepted.
    pub async fn start(&mut self) -> Result<(), crate::coord::CoordError> {
        self.state = self.coord.load().await?;
        self.topology.epoch = self.state.epoch;
        if self.state.epoch > 0 {
            info!(epoch = self.state.epoch, primary = ?self.state.primary, quarantined = ?self.state.quarantined, "cluster state loaded");
        }
        if let Some(pending) = self.state.pending.clone() {
            match (
                self.topology.index_of(&pending.node),
                self.topology.index_of(&pending.old_primary),
            ) {
                (Some(target), Some(old)) => {
                    warn!(node = %pending.node, old_primary = %pending.old_primary, detached = ?pending.detached, "the cluster state records a pending promotion: nothing is routed and no other node is promoted until {} is seen in or out of recovery", pending.node);
                    // What they followed before is gone with the process: should the promotion
                    // be undone, they follow the old primary with the conninfo pgswitch builds.
                    let primary = self.topology.nodes[old].clone();
                    for name in &pending.detached {
                        match self.topology.index_of(name) {
                            Some(i) if i != old && i != target => {
                                let conninfo = self.conninfo_for(&primary, name);
                                self.detached.insert(i, conninfo);
                            }
                            _ => {
                                warn!(node = %name, "the cluster state names a detached standby not in the configuration; ignored")
                            }
                        }
                    }
                    let target_conninfo = Some(self.conninfo_for(&primary, &pending.node));
                    self.pending_promotion = Some(PendingPromotion {
                        mode: if pending.switchover {
                            FailoverMode::Switchover
                        } else {
                            FailoverMode::Automatic
                        },
                        old,
                        target,
                        target_conninfo,
                        error: "recorded as pending when pgswitch started".into(),
                        left_recovery: false,
                        started: Instant::now(),
                    });
                }
                _ => {
                    error!(node = %pending.node, old_primary = %pending.old_primary, "the cluster state records a pending promotion of a node not in the configuration; ignored");
                }
            }
        }
        self.cycle().await;
        Ok(())
    }

    /// The loop: a cycle every `diagnosis.interval_ms`, sooner while the primary fails or on
    /// a passive signal from the data path.
    pub async fn run(mut self) {
        loop {
            let interval = Duration::from_millis(self.config.diagnosis.interval_ms);
            // A pending promotion is asked about once a cycle, not at the retry pace.
            let delay = if self.primary_failures > 0 && self.pending_promotion.is_none() {
                RETRY_DELAY.min(interval)
            } else {
                interval
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => self.cycle().await,
                _ = self.rediagnose.notified() => self.cycle().await,
                Some(req) = self.requests.recv() => {
                    let result = self.switchover(&req.to).await;
                    let _ = req.reply.send(result);
                }
                Some(outcome) = self.rejoin_rx.recv() => self.rejoin_finished(outcome),
            }
        }
    }

    fn publish(&self) {
        metrics::epoch(self.topology.epoch);
        self.tx.send_replace(self.topology.clone());
    }

    fn set_reason(&mut self, reason: Option<String>) {
        if reason != self.topology.reason {
            if let Some(r) = &reason {
                warn!("{r}");
            }
            self.topology.reason = reason;
        }
    }

    async fn cycle(&mut self) {
        if self.config_rx.has_changed().unwrap_or(false) {
            self.config = self.config_rx.borrow_and_update().clone();
        }
        self.diagnose_all().await;
        self.decide().await;
        self.publish();
    }

    async fn diagnose_all(&mut self) {
        self.diagnosis_started = Some(Instant::now());
        self.diagnose_except(None).await;
    }

    /// Diagnoses every node but `skip` (a failed primary need not hold up an election).
    async fn diagnose_except(&mut self, skip: Option<usize>) {
        let timeout = Duration::from_millis(self.config.diagnosis.timeout_ms);
        let config = self.config.clone();
        let results = futures_util::future::join_all(
            self.conns
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| Some(*i) != skip)
                .map(|(i, c)| {
                    let config = &config;
                    async move { (i, c.diagnose(config, timeout).await) }
                }),
        )
        .await;
        for (i, result) in results {
            let node = &mut self.topology.nodes[i];
            node.quarantined = self.state.quarantined.contains(&node.name);
            match result {
                Ok(d) => {
                    let latency = d.latency.as_secs_f64();
                    node.record(d);
                    metrics::node_diagnosed(&node.name, true, node.diagnosis.role, None, latency);
                }
                Err(e) => {
                    if node.record_failure(e.clone()) {
                        warn!(node = %node.name, error = %e, "diagnosis failed");
                    }
                    metrics::node_diagnosed(&node.name, false, Role::Unknown, None, 0.0);
                }
            }
        }
    }

    /// A node serves writes: answers, is not in recovery, is not read-only.
    fn serves_writes(node: &NodeStatus) -> bool {
        node.healthy && node.diagnosis.role == Role::Primary && !node.diagnosis.read_only
    }

    async fn decide(&mut self) {
        if self.pending_promotion.is_some() {
            self.settle_promotion(Duration::ZERO).await;
            return;
        }
        self.handle_quarantined().await;
        let primary = self.topology.primary.or_else(|| {
            self.state
                .primary
                .as_deref()
                .and_then(|p| self.topology.index_of(p))
        });
        let Some(p) = primary else {
            self.adopt_primary().await;
            return;
        };
        let node = &self.topology.nodes[p];
        if Self::serves_writes(node) {
            if self.primary_failures > 0 {
                info!(node = %node.name, "primary serves writes again");
            }
            self.last_primary_lsn = node.lsn_value();
            self.last_primary_timeline = node.diagnosis.timeline;
            self.last_sync_names = node.diagnosis.synchronous_standby_names.clone();
            self.primary_failures = 0;
            self.failing_since = None;
            if self.topology.primary != Some(p) {
                info!(node = %node.name, epoch = self.state.epoch, "routing writes to the primary");
            }
            self.topology.primary = Some(p);
            self.topology.holding = false;
            self.set_reason(None);
            self.restore_detached().await;
            if self.detached.is_empty() {
                self.repoint_strays(p).await;
            }
            return;
        }
        let why = if !node.healthy {
            node.last_error
                .clone()
                .unwrap_or_else(|| "no answer".into())
        } else if node.diagnosis.role != Role::Primary {
            "it is in recovery".into()
        } else {
            "it is read-only".into()
        };
        if !node.healthy
            && self
                .diagnosis_started
                .is_some_and(|at| self.fences.answered_since(&node.host, node.port, at))
        {
            // Clients' requests finished on it while its diagnosis failed: it is busy (or only
            // the control path is stuck), not down. A hung or dead primary answers no one.
            if self.primary_failures > 0 {
                info!(node = %node.name, "primary answered clients while its diagnosis failed: failures reset");
            }
            let reason = format!(
                "primary {} failed a diagnosis ({why}) but answered clients meanwhile: busy, not failed over",
                node.name
            );
            self.primary_failures = 0;
            self.failing_since = None;
            self.set_reason(Some(reason));
            return;
        }
        self.primary_failures += 1;
        self.failing_since.get_or_insert_with(Instant::now);
        if self.primary_failures < self.config.diagnosis.failures {
            info!(node = %node.name, failures = self.primary_failures, "primary failed a diagnosis ({why}); diagnosing again");
            return;
        }
        let name = node.name.clone();
        self.fail_over(
            p,
            &format!(
                "primary {name} failed {} diagnoses in a row: {why}",
                self.primary_failures
            ),
        )
        .await;
    }

    /// No primary recorded yet: adopt the node that serves writes.
    async fn adopt_primary(&mut self) {
        let writable: Vec<usize> = (0..self.topology.nodes.len())
            .filter(|&i| {
                Self::serves_writes(&self.topology.nodes[i]) && !self.topology.nodes[i].quarantined
            })
            .collect();
        let Some(&first) = writable.iter().max_by_key(|&&i| {
            // Highest timeline first, then config order.
            (
                self.topology.nodes[i].diagnosis.timeline.unwrap_or(0),
                std::cmp::Reverse(i),
            )
        }) else {
            self.set_reason(Some("no node serves writes".into()));
            return;
        };
        if writable.len() > 1 {
            let names: Vec<&str> = writable
                .iter()
                .map(|&i| self.topology.nodes[i].name.as_str())
                .collect();
            warn!(nodes = ?names, chosen = %self.topology.nodes[first].name, "several nodes accept writes; routing only to the one on the highest timeline");
        }
        let name = self.topology.nodes[first].name.clone();
        let next = ClusterState {
            epoch: self.state.epoch.max(1),
            primary: Some(name.clone()),
            quarantined: self.state.quarantined.clone(),
            pending: None,
        };
        if let Err(e) = self.coord.publish(&next).await {
            self.set_reason(Some(format!("cannot record the primary: {e}")));
            return;
        }
        self.state = next;
        self.topology.epoch = self.state.epoch;
        self.topology.primary = Some(first);
        // The baseline a failover measures lag and synchronous guarantees against.
        let node = &self.topology.nodes[first];
        self.last_primary_lsn = node.lsn_value();
        self.last_primary_timeline = node.diagnosis.timeline;
        self.last_sync_names = node.diagnosis.synchronous_standby_names.clone();
        info!(node = %name, epoch = self.state.epoch, "primary found");
        self.set_reason(None);
    }

    /// Corroboration: a standby whose WAL receiver heard from the primary after pgswitch began
    /// to fail reaching it proves the primary alive.
    fn primary_alive_per_standbys(&self, old: usize) -> Option<String> {
        let since = self.failing_since?.elapsed().as_secs_f64();
        let others: Vec<String> = self
            .topology
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != old)
            .map(|(_, n)| format!("{}:{}", n.host, n.port))
            .collect();
        self.topology.nodes.iter().enumerate().find_map(|(i, n)| {
            if i == old || !n.healthy || n.diagnosis.role != Role::Standby {
                return None;
            }
            let upstream = n.diagnosis.upstream.as_deref()?;
            let age = n.diagnosis.last_msg_age_seconds?;
            if others.iter().any(|o| o == upstream) || age >= since {
                return None;
            }
            Some(format!(
                "no failover: standby {} still receives WAL from the primary (last message {age:.1} s ago); only pgswitch's path to {} is broken",
                n.name, self.topology.nodes[old].name
            ))
        })
    }

    /// Hold, fence, freeze, choose, promote, publish, re-point, release.
    async fn fail_over(&mut self, old: usize, why: &str) {
        // A primary that does not serve is not routed to, whether or not a failover follows:
        // new transactions wait for it (or for a new one) instead of failing against it.
        self.topology.primary = None;
        if !self.config.failover.enabled {
            self.set_reason(Some(format!("{why}; failover is disabled")));
            return;
        }
        let quiet = Duration::from_millis(self.config.failover.min_interval_ms);
        if let Some(t) = self.last_failover {
            if t.elapsed() < quiet {
                self.set_reason(Some(format!(
                    "{why}; no failover within {} ms of the last one (failover.min_interval_ms)",
                    quiet.as_millis()
                )));
                return;
            }
        }
        let interval =
            Duration::from_millis(self.config.diagnosis.interval_ms).max(Duration::from_secs(1));
        if self.last_attempt.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        if let Some(alive) = self.primary_alive_per_standbys(old) {
            self.topology.primary = Some(old);
            self.set_reason(Some(alive));
            return;
        }
        if !self.coord.may_fail_over().await {
            self.set_reason(Some(format!("{why}; another pgswitch runs the failover")));
            return;
        }
        let started = Instant::now();
        if let Some(since) = self.failing_since {
            metrics::failover_phase(FailoverPhase::Detect, since.elapsed().as_secs_f64());
        }
        let old_name = self.topology.nodes[old].name.clone();
        warn!(node = %old_name, "failing over: {why}");

        // Hold and fence.
        self.topology.primary = None;
        self.topology.holding = true;
        self.topology.reason = Some(format!("failover from {old_name} in progress"));
        metrics::hold_active(true);
        self.publish();
        let (host, port) = (
            self.topology.nodes[old].host.clone(),
            self.topology.nodes[old].port,
        );
        let cut = self.fences.cut(&host, port);
        info!(node = %old_name, connections = cut, "fenced: server connections to the old primary cut");
        metrics::failover_phase(FailoverPhase::Fence, started.elapsed().as_secs_f64());

        let outcome = self.elect_and_promote(old).await;
        metrics::hold_active(false);
        self.topology.holding = false;
        match outcome {
            Ok(new) => self.failover_done(old, new, started),
            Err(NoNewPrimary::Failed(result, reason)) => {
                self.last_attempt = Some(Instant::now());
                metrics::failover(FailoverMode::Automatic, result);
                self.topology.primary = None;
                self.restore_detached().await;
                self.set_reason(Some(format!("{why}; {reason}")));
            }
            Err(NoNewPrimary::Unsettled {
                target,
                error,
                left_recovery,
            }) => {
                // The target may be a primary: it is not pointed back at the old primary, nor
                // is any other standby, and nothing else is promoted until it is settled (the
                // result is counted then).
                self.last_attempt = Some(Instant::now());
                let target_conninfo = self.detached.remove(&target);
                self.record_pending(Some(PendingPromotion {
                    mode: FailoverMode::Automatic,
                    old,
                    target,
                    target_conninfo,
                    error,
                    left_recovery,
                    started,
                }))
                .await;
                self.settle_promotion(PROMOTION_SETTLE).await;
            }
        }
        self.publish();
    }

    /// An automatic failover published its new primary.
    fn failover_done(&mut self, old: usize, new: usize, started: Instant) {
        self.last_failover = Some(Instant::now());
        self.last_attempt = None;
        self.primary_failures = 0;
        self.failing_since = None;
        metrics::failover(FailoverMode::Automatic, FailoverResult::Success);
        metrics::failover_phase(FailoverPhase::Total, started.elapsed().as_secs_f64());
        info!(from = %self.topology.nodes[old].name, to = %self.topology.nodes[new].name, epoch = self.state.epoch, seconds = started.elapsed().as_secs_f64(), "failover done: writes go to the new primary");
    }

    /// Freeze the standbys, pick the most advanced candidate, promote it (or the next, while
    /// the promotion certainly did not happen), publish the new epoch and re-point the others.
    /// Returns the new primary's index.
    async fn elect_and_promote(&mut self, old: usize) -> Result<usize, NoNewPrimary> {
        let started = Instant::now();
        let timeout = Duration::from_millis(self.config.diagnosis.timeout_ms);
        // A node out of recovery besides the failed primary (one promoted after all, by a
        // promotion that looked failed, or by hand) would be a second primary: none is made.
        if let Some(stray) = self.topology.nodes.iter().enumerate().find(|(i, n)| {
            *i != old && n.healthy && n.diagnosis.role == Role::Primary && !n.quarantined
        }) {
            return Err(NoNewPrimary::Failed(
                FailoverResult::Refused,
                format!(
                    "{} is out of recovery but not the published primary: no standby is promoted, which would make two primaries",
                    stray.1.name
                ),
            ));
        }
        let standbys: Vec<usize> = (0..self.topology.nodes.len())
            .filter(|&i| {
                let n = &self.topology.nodes[i];
                i != old && n.healthy && n.diagnosis.role == Role::Standby && !n.quarantined
            })
            .collect();
        // Freeze: no standby follows the old primary any more, so LSNs stop moving. What each
        // followed is kept first, so a failover that ends without a new primary can undo this.
        for &i in &standbys {
            if !self.detached.contains_key(&i) {
                // A standby still detached by an earlier attempt keeps the value it had before.
                match self.read_conninfo(i, timeout).await {
                    Ok(conninfo) if conninfo.is_empty() => {}
                    Ok(conninfo) => {
                        self.detached.insert(i, conninfo);
                    }
                    Err(e) => {
                        warn!(node = %self.topology.nodes[i].name, error = %e, "cannot read primary_conninfo: if no standby is promoted, this one is not pointed back at the old primary")
                    }
                }
            }
            if let Err(e) = self.detach(i, timeout).await {
                warn!(node = %self.topology.nodes[i].name, error = %e, "cannot detach standby from the old primary");
            }
        }
        // The WAL receivers stop at once on reload; give them a moment to report.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.diagnose_except(Some(old)).await;
        metrics::failover_phase(FailoverPhase::Elect, started.elapsed().as_secs_f64());

        let old_timeline = self.last_primary_timeline;
        let max_lag = self.config.failover.max_lag_bytes;
        // Lag is measured against the old primary's last LSN; if pgswitch never saw it healthy,
        // against the most advanced standby.
        let reference = self.last_primary_lsn.or_else(|| {
            standbys
                .iter()
                .filter_map(|&i| self.topology.nodes[i].wal_position())
                .max()
        });
        let mut candidates = Vec::new();
        let mut rejected = Vec::new();
        for &i in &standbys {
            let n = &self.topology.nodes[i];
            if !n.healthy || n.diagnosis.role != Role::Standby {
                rejected.push(format!("{} stopped answering", n.name));
                continue;
            }
            if let (Some(t), Some(old_t)) = (n.diagnosis.timeline, old_timeline) {
                if t != old_t {
                    rejected.push(format!("{} is on timeline {t}, not {old_t}", n.name));
                    continue;
                }
            }
            let lsn = n.wal_position().unwrap_or(0);
            let lag = reference.map_or(0, |p| p.saturating_sub(lsn));
            if lag > max_lag {
                rejected.push(format!(
                    "{} is {lag} bytes behind (max_lag_bytes = {max_lag})",
                    n.name
                ));
                continue;
            }
            candidates.push((i, lsn));
        }
        // Highest received LSN first; ties by config order.
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        if candidates.is_empty() {
            let detail = if rejected.is_empty() {
                "no standby answers".to_string()
            } else {
                rejected.join("; ")
            };
            return Err(NoNewPrimary::Failed(
                FailoverResult::Refused,
                format!("no candidate to promote: {detail}"),
            ));
        }
        if self.config.failover.require_sync {
            // Only standbys that answered after the freeze count towards the proof: one that
            // stopped answering since may be the one that holds a commit nobody else has.
            let answered: Vec<(usize, u64)> = standbys
                .iter()
                .filter_map(|&i| {
                    let n = &self.topology.nodes[i];
                    let lsn = n.wal_position()?;
                    (n.healthy && n.diagnosis.role == Role::Standby).then_some((i, lsn))
                })
                .collect();
            let reached: Vec<String> = answered
                .iter()
                .map(|&(i, _)| self.topology.nodes[i].name.clone())
                .collect();
            let all: Vec<String> = self
                .topology
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != old)
                .map(|(_, n)| n.name.clone())
                .collect();
            if self.last_sync_names.is_none() {
                return Err(NoNewPrimary::Failed(
                    FailoverResult::Refused,
                    "require_sync: the old primary's synchronous_standby_names is unknown (pgswitch never saw it healthy)".into(),
                ));
            }
            if let Err(why) = sync_guarantee(self.last_sync_names.as_deref(), &reached, &all) {
                return Err(NoNewPrimary::Failed(
                    FailoverResult::Refused,
                    format!("require_sync: {why}"),
                ));
            }
            // One of those holds every acknowledged commit, but which one is not known: the
            // new primary must have received at least as much as each of them. A candidate
            // behind one that was rejected (another timeline, say) is not promoted.
            if let Some(&(most, need)) = answered.iter().max_by_key(|&&(_, lsn)| lsn) {
                let before = candidates.len();
                candidates.retain(|&(_, lsn)| lsn >= need);
                if candidates.is_empty() {
                    return Err(NoNewPrimary::Failed(
                        FailoverResult::Refused,
                        format!(
                            "require_sync: {} received the most WAL ({}) but is not a candidate ({}), and every candidate received less",
                            self.topology.nodes[most].name,
                            format_lsn(need),
                            rejected.join("; ")
                        ),
                    ));
                }
                if candidates.len() < before {
                    info!(lsn = %format_lsn(need), "require_sync: candidates that received less than every answering standby are not promoted");
                }
            }
        }
        let mut refusals = Vec::new();
        let summary: Vec<String> = candidates
            .iter()
            .map(|(i, lsn)| format!("{} at {}", self.topology.nodes[*i].name, format_lsn(*lsn)))
            .collect();
        for (i, lsn) in candidates.clone() {
            let name = self.topology.nodes[i].name.clone();
            info!(node = %name, "promoting {name}: highest received LSN {} among candidates [{}]", format_lsn(lsn), summary.join(", "));
            let promote_started = Instant::now();
            match self.promote(i, old_timeline).await {
                Ok(timeline) => {
                    metrics::failover_phase(
                        FailoverPhase::Promote,
                        promote_started.elapsed().as_secs_f64(),
                    );
                    let old_name = self.topology.nodes[old].name.clone();
                    if let Err(e) = self.publish_new_primary(i, &old_name).await {
                        // A primary now, unpublished: the others must not be promoted, nor
                        // pointed back at the old primary.
                        error!(node = %name, error = %e, "promoted but not published; nothing else is promoted until it is");
                        return Err(NoNewPrimary::Unsettled {
                            target: i,
                            error: e,
                            left_recovery: true,
                        });
                    }
                    info!(node = %name, timeline, epoch = self.state.epoch, "promoted and published");
                    self.repoint_standbys(i, old).await;
                    return Ok(i);
                }
                Err(PromoteError::NotPromoted(e)) => {
                    error!(node = %name, error = %e, "not promoted, and it cannot be promoted by this attempt later; trying the next candidate");
                    refusals.push(format!("{name}: {e}"));
                }
                Err(PromoteError::StillInRecovery(e)) => {
                    // It answers, in recovery, but may still act on the promote request later:
                    // another node is promoted only once this one is set aside for good.
                    match self.set_aside(i).await {
                        Ok(()) => {
                            error!(node = %name, error = %e, "not promoted; set aside (read-only, quarantined) so that a late promotion takes no writes; trying the next candidate");
                            refusals
                                .push(format!("{name}: {e}; set aside: read-only and quarantined"));
                        }
                        Err(why) => {
                            error!(node = %name, error = %e, why = %why, "promotion outcome unknown; no other node is promoted until this one is seen in or out of recovery");
                            return Err(NoNewPrimary::Unsettled {
                                target: i,
                                error: format!("{e}; it cannot be set aside: {why}"),
                                left_recovery: false,
                            });
                        }
                    }
                }
                Err(e @ PromoteError::Unknown(_)) => {
                    // pg_promote was sent: promoting another node could make two primaries.
                    error!(node = %name, error = %e, "promotion outcome unknown; no other node is promoted until this one is seen in or out of recovery");
                    return Err(NoNewPrimary::Unsettled {
                        target: i,
                        error: e.to_string(),
                        left_recovery: false,
                    });
                }
            }
        }
        Err(NoNewPrimary::Failed(
            FailoverResult::Failed,
            format!(
                "every candidate failed to promote ({})",
                refusals.join("; ")
            ),
        ))
    }

    /// A candidate that got pg_promote and is still in recovery, but may yet act on the promote
    /// request, is set aside before any other node is promoted: made read-only (persisted, so a
    /// late promotion takes no writes), seen in recovery once more after that, and quarantined
    /// in the published state (never routed to; it counts as a standby again once it streams
    /// from the primary, like a former primary). An error says why it could not be.
    async fn set_aside(&mut self, i: usize) -> Result<(), String> {
        let config = self.config.clone();
        let timeout = self.control_timeout();
        self.conns[i]
            .execute(&config, READ_ONLY, timeout)
            .await
            .map_err(|e| format!("cannot make it read-only: {e}"))?;
        match self.in_recovery(i, timeout).await {
            Some(true) => {}
            Some(false) => return Err("it left recovery meanwhile".into()),
            None => return Err("it stopped answering".into()),
        }
        let name = self.topology.nodes[i].name.clone();
        if !self.state.quarantined.contains(&name) {
            self.state.quarantined.push(name.clone());
            if let Err(e) = self.coord.publish(&self.state).await {
                self.state.quarantined.retain(|q| q != &name);
                return Err(format!("cannot record its quarantine: {e}"));
            }
        }
        self.topology.nodes[i].quarantined = true;
        self.detached.remove(&i);
        Ok(())
    }

    /// Waits for the candidate to replay what it received, promotes it, confirms it left
    /// recovery on a higher timeline, and checkpoints. Returns the new timeline.
    async fn promote(&mut self, i: usize, old_timeline: Option<u32>) -> Result<u32, PromoteError> {
        let config = self.config.clone();
        let timeout = self.control_timeout();
        let conn = &mut self.conns[i];
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let row = conn
                .query_one(
                    &config,
                    "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, pg_is_wal_replay_paused()",
                    timeout,
                )
                .await
                .map_err(PromoteError::NotPromoted)?;
            let received = lsn_column(&row, 0);
            let replayed = lsn_column(&row, 1);
            let paused: bool = column(&row, 2).map_err(PromoteError::NotPromoted)?;
            if received.is_none() || replayed >= received {
                break;
            }
            if paused {
                conn.execute(&config, "SELECT pg_wal_replay_resume()", timeout)
                    .await
                    .map_err(PromoteError::NotPromoted)?;
            }
            if Instant::now() > deadline {
                return Err(PromoteError::NotPromoted(format!(
                    "did not replay what it received within {} s",
                    CATCH_UP.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let promoted = conn
            .query_one_coded(
                &config,
                "SELECT pg_promote(true, 60)",
                Duration::from_secs(65),
            )
            .await;
        if let Err(refused) = &promoted {
            if let Some(why) = refused_before_signal(refused) {
                // Refused before it wrote the promote signal file: this call cannot promote
                // the node later. A file left by an earlier call still could (the postmaster
                // hands it to recovery at its next signal, and recovery removes it before it
                // ends), so there must be none, and the node must stay in recovery for as long
                // as a promotion under way is watched for.
                let no_file = conn
                    .query_one(
                        &config,
                        "SELECT pg_stat_file('promote', true) IS NULL",
                        timeout,
                    )
                    .await
                    .and_then(|row| column::<bool>(&row, 0));
                let stays = match no_file {
                    Ok(true) => stays_in_recovery(conn, &config, timeout, PROMOTION_SETTLE).await,
                    _ => false,
                };
                if stays {
                    return Err(PromoteError::NotPromoted(format!(
                        "pg_promote failed ({why}: {}); no promote signal file was left, and the node is still in recovery after {} s",
                        refused.message,
                        PROMOTION_SETTLE.as_secs()
                    )));
                }
                warn!(node = %conn.name(), error = %refused.message, no_promote_file = ?no_file, "pg_promote failed, but a promote signal file may be left, or the node left recovery");
            }
        }
        let promoted = promoted.map_err(|f| f.message);
        // Whatever pg_promote answered, ask the node itself: a promotion that timed out may
        // still have happened, and then no other node may be promoted.
        let confirm = conn
            .query_one(
                &config,
                "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL ELSE \
                 ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END",
                timeout,
            )
            .await;
        let timeline = match (promoted, confirm) {
            (promoted, Ok(row)) => match column::<bool>(&row, 0) {
                Ok(false) => column::<Option<i32>>(&row, 1).ok().flatten().unwrap_or(0) as u32,
                Ok(true) => {
                    let answer = match promoted {
                        Ok(row) => match column::<bool>(&row, 0) {
                            Ok(true) => "true".to_string(),
                            Ok(false) => "false (not promoted within 60 s)".to_string(),
                            Err(e) => e,
                        },
                        Err(e) => e,
                    };
                    return Err(PromoteError::StillInRecovery(format!(
                        "still in recovery after pg_promote, which answered: {answer}"
                    )));
                }
                Err(e) => return Err(PromoteError::Unknown(e)),
            },
            (_, Err(e)) => return Err(PromoteError::Unknown(e)),
        };
        if let Some(old) = old_timeline {
            if timeline <= old {
                warn!(
                    timeline,
                    old, "the promoted node's timeline is not above the old primary's"
                );
            }
        }
        self.after_promotion(i).await;
        Ok(timeline)
    }

    /// A checkpoint (so pg_rewind sees the new timeline) and writes allowed again, on a node
    /// that just left recovery.
    async fn after_promotion(&mut self, i: usize) {
        let config = self.config.clone();
        let after =
            "CHECKPOINT; ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf()";
        let conn = &mut self.conns[i];
        if let Err(e) = conn.execute(&config, after, Duration::from_secs(60)).await {
            warn!(node = %conn.name(), error = %e, "promoted, but the checkpoint after promotion failed");
        }
    }

    /// Epoch + 1 with the new primary, made durable before anything is routed to it.
    async fn publish_new_primary(&mut self, new: usize, old_name: &str) -> Result<(), String> {
        let started = Instant::now();
        let mut next = self.state.clone();
        next.epoch += 1;
        next.primary = Some(self.topology.nodes[new].name.clone());
        if !next.quarantined.iter().any(|q| q == old_name) {
            next.quarantined.push(old_name.to_string());
        }
        next.quarantined
            .retain(|q| Some(q) != next.primary.as_ref());
        next.pending = None;
        self.coord
            .publish(&next)
            .await
            .map_err(|e| format!("promoted, but cannot record the new epoch: {e}"))?;
        self.state = next;
        // Standbys detached from the old primary are re-pointed at the new one, never back.
        self.detached.clear();
        self.topology.epoch = self.state.epoch;
        self.topology.primary = Some(new);
        self.topology.reason = None;
        for n in &mut self.topology.nodes {
            n.quarantined = self.state.quarantined.contains(&n.name);
        }
        self.publish();
        metrics::failover_phase(FailoverPhase::Publish, started.elapsed().as_secs_f64());
        metrics::await_first_write();
        Ok(())
    }

    /// The `primary_conninfo` a standby uses to follow `primary`.
    fn conninfo_for(&self, primary: &NodeStatus, standby: &str) -> String {
        let q = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut s = format!(
            "host={} port={} user={} application_name={}",
            q(&primary.host),
            primary.port,
            q(&self.config.control.user),
            q(standby)
        );
        if !self.config.control.password.is_empty() {
            s.push_str(&format!(" password={}", q(&self.config.control.password)));
        }
        s
    }

    /// How long a control statement outside diagnosis (re-pointing, fencing, settling a
    /// promotion) may take: the diagnosis timeout, at least 2 s.
    fn control_timeout(&self) -> Duration {
        Duration::from_millis(self.config.diagnosis.timeout_ms).max(Duration::from_secs(2))
    }

    /// A standby's current `primary_conninfo`.
    async fn read_conninfo(&mut self, i: usize, timeout: Duration) -> Result<String, String> {
        let config = self.config.clone();
        let row = self.conns[i]
            .query_one(&config, READ_CONNINFO, timeout)
            .await?;
        column::<String>(&row, 0)
    }

    /// Sets a standby's `primary_conninfo` (as a SQL literal) and reloads it.
    async fn set_conninfo(
        &mut self,
        i: usize,
        conninfo: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let config = self.config.clone();
        let sql = format!(
            "ALTER SYSTEM SET primary_conninfo = {}; SELECT pg_reload_conf();",
            quote_literal(conninfo)
        );
        self.conns[i].execute(&config, &sql, timeout).await
    }

    /// Detaches a standby from whatever it follows (empty `primary_conninfo`, reloaded), so
    /// its received LSN stops moving, and resumes replay if it was paused, so it can replay
    /// all it received.
    async fn detach(&mut self, i: usize, timeout: Duration) -> Result<(), String> {
        let config = self.config.clone();
        let sql = "ALTER SYSTEM SET primary_conninfo = ''; SELECT pg_reload_conf(); \
                   SELECT pg_wal_replay_resume() WHERE pg_is_wal_replay_paused();";
        self.conns[i].execute(&config, sql, timeout).await
    }

    /// Whether node `i` is in recovery; `None` when it does not answer.
    async fn in_recovery(&mut self, i: usize, timeout: Duration) -> Option<bool> {
        let config = self.config.clone();
        let row = self.conns[i]
            .query_one(&config, "SELECT pg_is_in_recovery()", timeout)
            .await
            .ok()?;
        column::<bool>(&row, 0).ok()
    }

    /// Points the standbys a failover detached back at the primary they followed, once it
    /// ended without a new primary: a failed failover leaves the cluster as it was. A standby
    /// that does not answer now is done when it answers again (at a later attempt, or when the
    /// primary serves again); one that left recovery is left alone.
    async fn restore_detached(&mut self) {
        if self.detached.is_empty() {
            return;
        }
        let timeout = self.control_timeout();
        let mut detached: Vec<(usize, String)> =
            self.detached.iter().map(|(i, c)| (*i, c.clone())).collect();
        detached.sort();
        for (i, conninfo) in detached {
            let name = self.topology.nodes[i].name.clone();
            if !self.topology.nodes[i].healthy {
                continue;
            }
            match self.in_recovery(i, timeout).await {
                None => {}
                Some(false) => {
                    self.detached.remove(&i);
                    warn!(node = %name, "a detached standby left recovery: its primary_conninfo is not restored");
                }
                Some(true) => match self.set_conninfo(i, &conninfo, timeout).await {
                    Ok(()) => {
                        self.detached.remove(&i);
                        info!(node = %name, "no standby was promoted: this one follows the old primary again (primary_conninfo restored)");
                    }
                    Err(e) => {
                        warn!(node = %name, error = %e, "cannot restore primary_conninfo; tried again later")
                    }
                },
            }
        }
    }

    /// Points every other reachable standby at the new primary and checks, in the background,
    /// that each streams from it.
    async fn repoint_standbys(&mut self, new: usize, old: usize) {
        let started = Instant::now();
        let config = self.config.clone();
        let timeout = self.control_timeout();
        let primary = self.topology.nodes[new].clone();
        for i in 0..self.topology.nodes.len() {
            let n = &self.topology.nodes[i];
            if i == new
                || i == old
                || !n.healthy
                || n.diagnosis.role != Role::Standby
                || n.quarantined
            {
                continue;
            }
            let name = n.name.clone();
            let conninfo = self.conninfo_for(&primary, &name);
            match self.set_conninfo(i, &conninfo, timeout).await {
                Ok(()) => {
                    info!(node = %name, primary = %primary.name, "standby re-pointed to the new primary");
                    let mut check = ControlConn::new(config.nodes[i].clone());
                    let config = config.clone();
                    let expected = format!("{}:{}", primary.host, primary.port);
                    tokio::spawn(async move {
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while Instant::now() < deadline {
                            if let Ok(d) = check.diagnose(&config, Duration::from_secs(2)).await {
                                if d.upstream.as_deref() == Some(expected.as_str()) {
                                    info!(node = %check.name(), primary = %expected, "standby streams from the new primary");
                                    return;
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        warn!(node = %check.name(), primary = %expected, "standby does not stream from the new primary after 30 s");
                    });
                }
                Err(e) => warn!(node = %name, error = %e, "cannot re-point standby"),
            }
        }
        metrics::failover_phase(FailoverPhase::Repoint, started.elapsed().as_secs_f64());
    }

    /// Standbys that follow a former primary (they were down or unreachable when a failover
    /// re-pointed the others) are pointed at the serving primary `p`. One that follows
    /// another standby (cascading), a server not in the configuration or no one (an empty
    /// `primary_conninfo`, which an operator may have set) is left alone. Each is retried
    /// after `REPOINT_RETRY` while it does not stream from the primary.
    async fn repoint_strays(&mut self, p: usize) {
        let primary = self.topology.nodes[p].clone();
        let expected = format!("{}:{}", primary.host, primary.port);
        let timeout = self.control_timeout();
        self.repointed.retain(|_, at| at.elapsed() < REPOINT_RETRY);
        let formers: Vec<(String, u16, String)> = self
            .topology
            .nodes
            .iter()
            .filter(|o| o.quarantined)
            .map(|o| (o.host.clone(), o.port, o.name.clone()))
            .collect();
        for i in 0..self.topology.nodes.len() {
            let n = &self.topology.nodes[i];
            if i == p
                || !n.healthy
                || n.diagnosis.role != Role::Standby
                || n.quarantined
                || n.diagnosis.upstream.as_deref() == Some(expected.as_str())
                || self.repointed.contains_key(&i)
            {
                continue;
            }
            let name = n.name.clone();
            let former = |host: &str, port: u16| {
                formers
                    .iter()
                    .find(|(h, p, _)| h == host && *p == port)
                    .map(|(_, _, name)| name.clone())
            };
            let follows = match n.diagnosis.upstream.as_deref() {
                Some(upstream) => match upstream.rsplit_once(':') {
                    Some((host, port)) => port
                        .parse()
                        .ok()
                        .and_then(|port| former(host, port))
                        .map(|old| format!("streams from the former primary {old}")),
                    None => None,
                },
                None => match self.read_conninfo(i, timeout).await {
                    Ok(conninfo) => conninfo_target(&conninfo)
                        .and_then(|(host, port)| former(&host, port))
                        .map(|old| format!("follows the former primary {old}")),
                    Err(e) => {
                        warn!(node = %name, error = %e, "cannot read primary_conninfo");
                        None
                    }
                },
            };
            let Some(follows) = follows else {
                continue;
            };
            let conninfo = self.conninfo_for(&primary, &name);
            self.repointed.insert(i, Instant::now());
            match self.set_conninfo(i, &conninfo, timeout).await {
                Ok(()) => {
                    warn!(node = %name, primary = %primary.name, "standby {follows}: re-pointed to the primary")
                }
                Err(e) => {
                    warn!(node = %name, primary = %primary.name, error = %e, "standby {follows}, and cannot be re-pointed to the primary; tried again later")
                }
            }
        }
    }

    /// Former primaries: fence them when they come back, run the rejoin hook, and count them
    /// as standbys again once they stream from the current primary.
    async fn handle_quarantined(&mut self) {
        let Some(primary) = self
            .topology
            .primary
            .map(|p| self.topology.nodes[p].clone())
        else {
            return;
        };
        let timeout = self.control_timeout();
        let config = self.config.clone();
        for i in 0..self.topology.nodes.len() {
            let n = self.topology.nodes[i].clone();
            if !n.quarantined || !n.healthy {
                continue;
            }
            if n.diagnosis.role == Role::Primary && !n.diagnosis.read_only {
                match self.conns[i].execute(&config, FENCE, timeout).await {
                    Ok(()) => {
                        warn!(node = %n.name, "old primary is back: fenced (read-only, sessions terminated); it is never routed to until it rejoins")
                    }
                    Err(e) => {
                        warn!(node = %n.name, error = %e, "old primary is back but cannot be fenced")
                    }
                }
                self.fences.cut(&n.host, n.port);
            }
            let expected = format!("{}:{}", primary.host, primary.port);
            if n.diagnosis.role == Role::Standby
                && n.diagnosis.upstream.as_deref() == Some(expected.as_str())
            {
                self.state.quarantined.retain(|q| q != &n.name);
                if let Err(e) = self.coord.publish(&self.state).await {
                    warn!(node = %n.name, error = %e, "cannot record the rejoin");
                    self.state.quarantined.push(n.name.clone());
                    continue;
                }
                self.topology.nodes[i].quarantined = false;
                self.rejoins.remove(&n.name);
                info!(node = %n.name, primary = %primary.name, "old primary rejoined: it streams from the primary and counts as a standby again");
                continue;
            }
            self.start_rejoin(i, &primary);
        }
    }

    fn start_rejoin(&mut self, i: usize, primary: &NodeStatus) {
        let command = self.config.failover.rejoin_command.clone();
        if command.is_empty() {
            return;
        }
        let node = self.config.nodes[i].clone();
        if self
            .rejoins
            .get(&node.name)
            .is_some_and(|t| t.elapsed() < REJOIN_RETRY)
        {
            return;
        }
        self.rejoins.insert(node.name.clone(), Instant::now());
        let primary_config = self
            .config
            .nodes
            .iter()
            .find(|n| n.name == primary.name)
            .cloned();
        let command = command
            .replace("{node}", &node.name)
            .replace("{old_host}", &node.host)
            .replace("{old_port}", &node.port.to_string())
            .replace("{old_data_dir}", node.data_dir.as_deref().unwrap_or(""))
            .replace("{new_node}", &primary.name)
            .replace("{new_host}", &primary.host)
            .replace("{new_port}", &primary.port.to_string())
            .replace(
                "{new_data_dir}",
                primary_config
                    .as_ref()
                    .and_then(|p| p.data_dir.as_deref())
                    .unwrap_or(""),
            )
            .replace("{control_user}", &self.config.control.user);
        info!(node = %node.name, primary = %primary.name, command = %command, "running the rejoin hook");
        let tx = self.rejoin_tx.clone();
        let password = self.config.control.password.clone();
        let rediagnose = self.rediagnose.clone();
        tokio::spawn(async move {
            let run = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .env("PGPASSWORD", password)
                .kill_on_drop(true)
                .output();
            let result = match tokio::time::timeout(REJOIN_TIMEOUT, run).await {
                Err(_) => Err(format!(
                    "did not finish within {} s",
                    REJOIN_TIMEOUT.as_secs()
                )),
                Ok(Err(e)) => Err(format!("cannot run: {e}")),
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => Err(format!(
                    "exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            };
            let _ = tx
                .send(RejoinOutcome {
                    node: node.name,
                    result,
                })
                .await;
            rediagnose.notify_one();
        });
    }

    fn rejoin_finished(&mut self, outcome: RejoinOutcome) {
        match outcome.result {
            Ok(()) => {
                info!(node = %outcome.node, "rejoin hook finished; waiting for the node to stream from the primary")
            }
            Err(e) => {
                warn!(node = %outcome.node, error = %e, "rejoin hook failed; the node stays quarantined and is retried later")
            }
        }
    }

    /// Planned switchover: hold, drain, make the primary read-only, let the target catch up,
    /// promote it, publish, release; the old primary rejoins through the hook.
    ///
    /// A failure before pg_promote is sent is undone: the old primary is writable again and
    /// the target follows it again. After pg_promote was sent the target may be a primary, so
    /// the old one is made writable only once the target is seen still in recovery; if it left
    /// recovery it is published as the primary (retried every cycle while that fails), and while
    /// it does not answer, nothing is routed and the status says why.
    async fn switchover(&mut self, to: &str) -> Result<String, String> {
        let started = Instant::now();
        let Some(target) = self.topology.index_of(to) else {
            return Err(format!("no node named {to}"));
        };
        let Some(old) = self.topology.primary else {
            return Err("there is no primary to switch over from".into());
        };
        if old == target {
            return Err(format!("{to} is already the primary"));
        }
        let t = &self.topology.nodes[target];
        if !t.healthy || t.diagnosis.role != Role::Standby || t.quarantined {
            return Err(format!("{to} is not a healthy standby"));
        }
        let old_name = self.topology.nodes[old].name.clone();
        let old_timeline = self.topology.nodes[old].diagnosis.timeline;
        info!(from = %old_name, to = %to, "switchover requested");

        self.topology.primary = None;
        self.topology.holding = true;
        self.topology.reason = Some(format!("switchover from {old_name} to {to} in progress"));
        metrics::hold_active(true);
        self.publish();
        let mut target_conninfo = None;
        let result = self
            .switchover_steps(old, target, old_timeline, &mut target_conninfo)
            .await;
        metrics::hold_active(false);
        self.topology.holding = false;
        let outcome = match result {
            Ok(()) => Ok(format!(
                "switched over from {old_name} to {to} at epoch {} in {:.2} s",
                self.state.epoch,
                started.elapsed().as_secs_f64()
            )),
            Err(SwitchoverError::BeforePromotion(e)) => {
                self.undo_switchover(old, target, target_conninfo.as_deref())
                    .await;
                error!(from = %old_name, to = %to, error = %e, "switchover failed before the promotion; the old primary keeps serving");
                Err(format!("{e}; {old_name} keeps serving"))
            }
            Err(SwitchoverError::AtPromotion(e)) => {
                error!(from = %old_name, to = %to, error = %e, "switchover failed at or after the promotion; {old_name} stays read-only until {to} is found in or out of recovery");
                self.record_pending(Some(PendingPromotion {
                    mode: FailoverMode::Switchover,
                    old,
                    target,
                    target_conninfo,
                    error: e.clone(),
                    left_recovery: false,
                    started,
                }))
                .await;
                match self.settle_promotion(PROMOTION_SETTLE).await {
                    Settled::Undone => Err(format!(
                        "{e}; {to} is still in recovery: {old_name} keeps serving"
                    )),
                    Settled::Finished => Ok(format!(
                        "switched over from {old_name} to {to} at epoch {} in {:.2} s, after: {e}",
                        self.state.epoch,
                        started.elapsed().as_secs_f64()
                    )),
                    Settled::Pending(reason) => Err(reason),
                }
            }
        };
        match &outcome {
            Ok(msg) => {
                metrics::failover(FailoverMode::Switchover, FailoverResult::Success);
                info!("{msg}");
            }
            Err(_) => metrics::failover(FailoverMode::Switchover, FailoverResult::Failed),
        }
        self.publish();
        outcome
    }

    /// Undoes a switchover that did not promote its target: the old primary takes writes
    /// again and the target follows it again.
    async fn undo_switchover(&mut self, old: usize, target: usize, conninfo: Option<&str>) {
        let config = self.config.clone();
        let timeout = Duration::from_secs(5);
        let undo = "ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf();";
        let old_name = self.topology.nodes[old].name.clone();
        let target_name = self.topology.nodes[target].name.clone();
        if let Err(e) = self.conns[old].execute(&config, undo, timeout).await {
            error!(node = %old_name, error = %e, "cannot make the old primary writable again after the failed switchover");
        }
        if let Some(conninfo) = conninfo.filter(|c| !c.is_empty()) {
            match self.set_conninfo(target, conninfo, timeout).await {
                Ok(()) => {
                    info!(node = %target_name, primary = %old_name, "switchover target follows the old primary again (primary_conninfo restored)")
                }
                Err(e) => {
                    error!(node = %target_name, primary = %old_name, error = %e, "cannot point the switchover target back at the old primary")
                }
            }
        }
        self.topology.primary = Some(old);
        self.topology.reason = None;
    }

    /// Settles a switchover or failover whose target may have been promoted, by asking the
    /// target (for up to `settle`, so a promotion under way is seen): still in recovery, it is
    /// undone; out of recovery, the target is published (and the other standbys re-pointed at
    /// it); no answer, or no publication, it stays pending with nothing routed.
    async fn settle_promotion(&mut self, settle: Duration) -> Settled {
        let Some(mut p) = self.pending_promotion.take() else {
            return Settled::Undone;
        };
        let old_name = self.topology.nodes[p.old].name.clone();
        let target_name = self.topology.nodes[p.target].name.clone();
        let timeout = self.control_timeout();
        let deadline = Instant::now() + settle;
        let mut in_recovery = None;
        loop {
            match self.in_recovery(p.target, timeout).await {
                Some(false) => {
                    in_recovery = Some(false);
                    break;
                }
                Some(true) => in_recovery = Some(true),
                None => {}
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let what = match p.mode {
            FailoverMode::Switchover => format!("switchover from {old_name} to {target_name}"),
            FailoverMode::Automatic => format!("failover from {old_name} to {target_name}"),
        };
        // What holds while it is pending.
        let meanwhile = match p.mode {
            FailoverMode::Switchover => format!("{old_name} stays read-only and nothing is routed"),
            FailoverMode::Automatic => format!(
                "nothing is routed, no other node is promoted and no standby follows {old_name} again"
            ),
        };
        let reason = match in_recovery {
            Some(true) => {
                match p.mode {
                    FailoverMode::Switchover => {
                        info!(node = %target_name, "the switchover target is still in recovery: undoing the switchover");
                        self.undo_switchover(p.old, p.target, p.target_conninfo.as_deref())
                            .await;
                    }
                    FailoverMode::Automatic => {
                        info!(node = %target_name, "the failover target is still in recovery: it was not promoted; the detached standbys follow the old primary again");
                        if let Some(conninfo) = p.target_conninfo.take() {
                            self.detached.insert(p.target, conninfo);
                        }
                        self.restore_detached().await;
                        metrics::failover(FailoverMode::Automatic, FailoverResult::Failed);
                        self.topology.primary = None;
                        self.set_reason(Some(format!(
                            "{what} failed: {target_name} is still in recovery after pg_promote ({}); the next failover attempt goes on",
                            p.error
                        )));
                    }
                }
                self.record_pending(None).await;
                return Settled::Undone;
            }
            Some(false) => {
                if !p.left_recovery {
                    self.after_promotion(p.target).await;
                    p.left_recovery = true;
                }
                match self.publish_new_primary(p.target, &old_name).await {
                    Ok(()) => {
                        info!(from = %old_name, to = %target_name, epoch = self.state.epoch, "{what}: {target_name} left recovery and is published as the primary");
                        self.repoint_standbys(p.target, p.old).await;
                        if p.mode == FailoverMode::Automatic {
                            self.failover_done(p.old, p.target, p.started);
                        }
                        return Settled::Finished;
                    }
                    Err(e) => {
                        let reason = format!(
                            "{what} failed after {target_name} left recovery: {e}; {meanwhile} until {target_name} is published (retried every cycle)"
                        );
                        p.error = e;
                        reason
                    }
                }
            }
            None if p.left_recovery => format!(
                "{what} failed after {target_name} left recovery ({}); {target_name} does not answer now: {meanwhile} until it answers and is published",
                p.error
            ),
            None => format!(
                "{what} failed after pg_promote was sent ({}); {target_name} does not answer, so whether it left recovery is unknown: {meanwhile} until {target_name} answers",
                p.error
            ),
        };
        self.topology.primary = None;
        self.set_reason(Some(reason.clone()));
        self.pending_promotion = Some(p);
        Settled::Pending(reason)
    }

    /// Makes `p` (or no promotion) the pending one, in memory and in the cluster state, so a
    /// restarted pgswitch settles it first. Recording is best effort: a failure is logged (a
    /// pgswitch that cannot write its state file publishes nothing anyway).
    async fn record_pending(&mut self, p: Option<PendingPromotion>) {
        self.state.pending = p.as_ref().map(|p| PendingNode {
            node: self.topology.nodes[p.target].name.clone(),
            old_primary: self.topology.nodes[p.old].name.clone(),
            switchover: p.mode == FailoverMode::Switchover,
            detached: {
                let mut names: Vec<String> = self
                    .detached
                    .keys()
                    .filter(|&&i| i != p.target)
                    .map(|&i| self.topology.nodes[i].name.clone())
                    .collect();
                names.sort();
                names
            },
        });
        self.pending_promotion = p;
        if let Err(e) = self.coord.publish(&self.state).await {
            error!(error = %e, pending = ?self.state.pending, "cannot record the pending promotion in the cluster state");
        }
    }

    async fn switchover_steps(
        &mut self,
        old: usize,
        target: usize,
        old_timeline: Option<u32>,
        target_conninfo: &mut Option<String>,
    ) -> Result<(), SwitchoverError> {
        use SwitchoverError::{AtPromotion, BeforePromotion};
        let config = self.config.clone();
        let timeout = Duration::from_secs(5);
        // Let running transactions finish (bounded); new ones are held. Session-mode
        // sessions hold their server for good: idle ones move to the new primary instead.
        let drain = if self.config.pool_mode == crate::config::PoolMode::Transaction {
            SWITCHOVER_DRAIN
        } else {
            Duration::ZERO
        };
        let drain_deadline = Instant::now() + drain;
        while self
            .pools
            .all()
            .iter()
            .any(|p| p.status().servers_active > 0)
            && Instant::now() < drain_deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.conns[old]
            .execute(&config, FENCE, timeout)
            .await
            .map_err(BeforePromotion)?;
        let (host, port) = (
            self.topology.nodes[old].host.clone(),
            self.topology.nodes[old].port,
        );
        self.fences.cut(&host, port);
        let row = self.conns[old]
            .query_one(&config, "SELECT pg_current_wal_lsn()::text", timeout)
            .await
            .map_err(BeforePromotion)?;
        let last = lsn_column(&row, 0).unwrap_or(0);
        info!(lsn = %format_lsn(last), "old primary is read-only; waiting for the target to replay up to its last LSN");
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let row = self.conns[target]
                .query_one(&config, "SELECT pg_last_wal_replay_lsn()::text", timeout)
                .await
                .map_err(BeforePromotion)?;
            let replayed = lsn_column(&row, 0).unwrap_or(0);
            if replayed >= last {
                break;
            }
            if Instant::now() > deadline {
                return Err(BeforePromotion(format!(
                    "target replayed {} of {} within {} s",
                    format_lsn(replayed),
                    format_lsn(last),
                    CATCH_UP.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What the target follows is kept first, so a failure before the promotion can point
        // it back at the old primary.
        *target_conninfo = Some(
            self.read_conninfo(target, timeout)
                .await
                .map_err(BeforePromotion)?,
        );
        self.detach(target, timeout)
            .await
            .map_err(BeforePromotion)?;
        match self.promote(target, old_timeline).await {
            Ok(_) => {}
            Err(PromoteError::NotPromoted(e)) => return Err(BeforePromotion(e)),
            Err(e @ (PromoteError::StillInRecovery(_) | PromoteError::Unknown(_))) => {
                return Err(AtPromotion(e.to_string()))
            }
        }
        let old_name = self.topology.nodes[old].name.clone();
        self.publish_new_primary(target, &old_name)
            .await
            .map_err(AtPromotion)?;
        self.repoint_standbys(target, old).await;
        Ok(())
    }
}

/// With `synchronous_standby_names` = `ANY k (s1, …, sN)` (or `FIRST k`, or a plain list),
/// every acknowledged commit is on at least k of the N listed standbys, so reaching N − k + 1
/// of them proves the most advanced one reached holds all of them.
pub fn sync_guarantee(
    names: Option<&str>,
    reached: &[String],
    all_standbys: &[String],
) -> Result<(), String> {
    let spec = names.map(str::trim).unwrap_or("");
    if spec.is_empty() {
        return Err("the primary had no synchronous standbys (synchronous_standby_names is empty), so any commit may be lost".into());
    }
    let (k, list) = parse_sync_names(spec)
        .ok_or_else(|| format!("cannot parse synchronous_standby_names '{spec}'"))?;
    let listed: Vec<String> = if list.iter().any(|n| n == "*") {
        all_standbys.to_vec()
    } else {
        list
    };
    let n = listed.len();
    if k == 0 || k > n {
        return Err(format!(
            "synchronous_standby_names '{spec}' names {n} standbys for {k} synchronous copies"
        ));
    }
    let needed = n - k + 1;
    let got = listed
        .iter()
        .filter(|l| reached.iter().any(|r| r.eq_ignore_ascii_case(l)))
        .count();
    if got < needed {
        return Err(format!(
            "only {got} of the synchronous standbys [{}] answered; {needed} are needed to be sure no acknowledged commit is lost",
            listed.join(", ")
        ));
    }
    Ok(())
}

/// Parses `ANY k (a, b)`, `FIRST k (a, b)`, `k (a, b)` and `a, b` (= FIRST 1).
fn parse_sync_names(spec: &str) -> Option<(usize, Vec<String>)> {
    let names = |s: &str| -> Vec<String> {
        s.split(',')
            .map(|n| n.trim().trim_matches('"').to_string())
            .filter(|n| !n.is_empty())
            .collect()
    };
    let Some(open) = spec.find('(') else {
        return Some((1, names(spec)));
    };
    let close = spec.rfind(')')?;
    let head: Vec<&str> = spec[..open].split_whitespace().collect();
    let k = match head.as_slice() {
        [method, k]
            if method.eq_ignore_ascii_case("any") || method.eq_ignore_ascii_case("first") =>
        {
            k.parse().ok()?
        }
        [k] => k.parse().ok()?,
        _ => return None,
    };
    Some((k, names(spec.get(open + 1..close)?)))
}

/// The host and port a libpq connection string (`key=value` pairs, values optionally in single
/// quotes with backslash escapes) connects to: its first `host` (or `hostaddr`), and its first
/// `port` (5432 when there is none). `None` when it names no host, or is a URI.
fn conninfo_target(conninfo: &str) -> Option<(String, u16)> {
    let mut host = None;
    let mut hostaddr = None;
    let mut port = None;
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        let first = |v: &str| v.split(',').next().unwrap_or_default().to_string();
        match key.as_str() {
            "host" => host = Some(first(&value)),
            "hostaddr" => hostaddr = Some(first(&value)),
            "port" => port = Some(first(&value)),
            _ => {}
        }
    }
    let host = host.or(hostaddr).filter(|h| !h.is_empty())?;
    let port = match port.filter(|p| !p.is_empty()) {
        Some(p) => p.parse().ok()?,
        None => 5432,
    };
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_targets_are_read() {
        let t = |s: &str| conninfo_target(s);
        assert_eq!(
            t("user=rep passfile='/var/lib/postgresql/.pgpass' channel_binding=prefer host=127.0.0.1 port=25432 sslmode=prefer"),
            Some(("127.0.0.1".into(), 25432))
        );
        assert_eq!(
            t("host='/tmp/pg sock' port = '5433' application_name='n\\'1'"),
            Some(("/tmp/pg sock".into(), 5433))
        );
        assert_eq!(t("host=db1,db2 port=6000,6001"), Some(("db1".into(), 6000)));
        assert_eq!(t("hostaddr=127.0.0.2"), Some(("127.0.0.2".into(), 5432)));
        assert_eq!(t(""), None);
        assert_eq!(t("port=5432"), None);
        assert_eq!(t("host='unterminated"), None);
        assert_eq!(t("postgresql://db1:5433/x"), None);
    }

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn synchronous_standby_names_are_parsed() {
        assert_eq!(
            parse_sync_names("ANY 1 (n1, n2)"),
            Some((1, v(&["n1", "n2"])))
        );
        assert_eq!(
            parse_sync_names("FIRST 2 (\"a\", b, c)"),
            Some((2, v(&["a", "b", "c"])))
        );
        assert_eq!(parse_sync_names("2 (a, b)"), Some((2, v(&["a", "b"]))));
        assert_eq!(parse_sync_names("a, b"), Some((1, v(&["a", "b"]))));
    }

    #[test]
    fn any_1_of_2_needs_both_standbys_to_be_sure() {
        let all = v(&["n1", "n2"]);
        assert!(sync_guarantee(Some("ANY 1 (n1, n2)"), &v(&["n1", "n2"]), &all).is_ok());
        let e =
            sync_guarantee(Some("ANY 1 (n1, n2)"), &v(&["n1"]), &all).expect_err("not provable");
        assert!(e.contains("only 1"), "{e}");
    }

    #[test]
    fn any_2_of_3_needs_two() {
        let all = v(&["a", "b", "c"]);
        assert!(sync_guarantee(Some("ANY 2 (a, b, c)"), &v(&["a", "c"]), &all).is_ok());
        assert!(sync_guarantee(Some("ANY 2 (a, b, c)"), &v(&["a"]), &all).is_err());
    }

    #[test]
    fn no_synchronous_standbys_proves_nothing() {
        assert!(sync_guarantee(Some(""), &v(&["n1"]), &v(&["n1"])).is_err());
        assert!(sync_guarantee(None, &v(&["n1"]), &v(&["n1"])).is_err());
    }
}
