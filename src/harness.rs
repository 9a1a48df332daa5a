//! Real PostgreSQL clusters for integration tests and for `pgswitch demo`.
//!
//! [`PgCluster::start`] brings up a primary and N streaming standbys on free loopback ports,
//! each in its own data directory under one temporary directory, and [`PgNode`] injects real
//! faults into them: `pg_ctl stop -m immediate`, SIGKILL of the whole process tree, SIGSTOP
//! (a hung server). Everything here is synchronous std code (blocking `std::process::Command`
//! calls): call it from sync tests or through `tokio::task::spawn_blocking`.
//!
//! PostgreSQL refuses to run as root, so when the process runs as root every server-side
//! binary (initdb, pg_ctl, pg_basebackup, pg_rewind) runs as the `postgres` operating-system
//! user through `runuser`, and every directory the server needs is owned by that user.
//!
//! `initdb` runs once per machine, into a template directory guarded by a file lock; each
//! cluster copies the template, which makes starting a cluster take a couple of seconds.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The superuser of every harness cluster.
pub const SUPERUSER: &str = "postgres";
/// Its password (the superuser always authenticates with SCRAM-SHA-256 over TCP).
pub const SUPERUSER_PASSWORD: &str = "postgres";

/// The operating-system user that runs the server when this process runs as root.
const OS_USER: &str = "postgres";
const HOST: &str = "127.0.0.1";
const NOT_FOUND: &str = "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and $PGSWITCH_PG_BIN): install them with 'apt-get install -y postgresql-15' or run scripts/test.sh, which does";
const LOG_TAIL_LINES: usize = 30;
const PG_CTL_TIMEOUT_SECS: u64 = 60;
const START_ATTEMPTS: usize = 4;

/// Replication mode of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Asynchronous streaming replication (`synchronous_standby_names` empty).
    Async,
    /// `synchronous_standby_names = 'ANY k (n1, n2, ...)'` over all standbys.
    Any(usize),
}

/// Authentication method of the `host` pg_hba.conf lines for non-replication connections of
/// roles other than the superuser (which always uses SCRAM-SHA-256).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAuth {
    Scram,
    /// Also makes the cluster store new passwords as md5 hashes (`password_encryption = 'md5'`).
    Md5,
    Password,
    Trust,
}

impl HostAuth {
    /// The pg_hba.conf method name.
    pub fn hba_method(self) -> &'static str {
        match self {
            HostAuth::Scram => "scram-sha-256",
            HostAuth::Md5 => "md5",
            HostAuth::Password => "password",
            HostAuth::Trust => "trust",
        }
    }
}

/// What cluster to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of streaming standbys (named n1, n2, ...).
    pub standbys: usize,
    pub sync: SyncMode,
    pub host_auth: HostAuth,
    /// Extra LOGIN roles `(name, password)`, created on the primary with CREATE on database
    /// `postgres` and schema `public`.
    pub users: Vec<(String, String)>,
    /// Lines appended to every node's postgresql.conf.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            standbys: 2,
            sync: SyncMode::Async,
            host_auth: HostAuth::Scram,
            users: vec![("app".to_string(), "secret".to_string())],
            extra_conf: Vec::new(),
        }
    }
}

/// A running primary + standbys; stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    /// The temporary directory holding every node's data directory, log and socket directory.
    pub dir: PathBuf,
    /// `nodes[0]` is the primary "n0", then the standbys "n1", "n2", ...
    pub nodes: Vec<PgNode>,
    keep: bool,
}

/// One PostgreSQL server of a [`PgCluster`].
#[derive(Debug, Clone)]
pub struct PgNode {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    bin_dir: PathBuf,
    log_file: PathBuf,
    socket_dir: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

impl PgCluster {
    /// Starts a primary and `spec.standbys` streaming standbys and waits until they all stream.
    pub fn start(spec: &ClusterSpec) -> Result<PgCluster> {
        if let SyncMode::Any(k) = spec.sync {
            if k == 0 || spec.standbys == 0 {
                bail!(
                    "SyncMode::Any({k}) needs k >= 1 and at least one standby (spec has {})",
                    spec.standbys
                );
            }
        }
        let bin = pg_bin_dir()?;
        if is_root() {
            pg_os_user()?;
        }
        let major = pg_major_version(&bin)?;
        let template = ensure_template(&bin, &major)?;
        let dir = unique_cluster_dir()?;
        // From here on, `cluster` owns `dir`: any early return stops what runs and deletes it.
        let mut cluster = PgCluster {
            dir,
            nodes: Vec::new(),
            keep: false,
        };

        // The primary: a copy of the template.
        let primary = cluster.new_node("n0", &bin)?;
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(&template).arg(&primary.data_dir);
        let out = run(&mut cp, Duration::from_secs(120))?;
        check(&cp, &out, "copying the template data directory", None)?;
        if is_root() {
            chown_recursive(&primary.data_dir)?;
        }
        write_owned(
            &primary.data_dir.join("pg_hba.conf"),
            &hba_conf(spec.host_auth),
        )?;
        primary.append_conf(&common_conf(spec))?;
        cluster.start_new_node(primary)?;
        let primary = cluster.nodes.first().cloned().context("primary missing")?;

        // Extra users.
        let encryption = if spec.host_auth == HostAuth::Md5 {
            "md5"
        } else {
            "scram-sha-256"
        };
        for (name, password) in &spec.users {
            let ident = quote_ident(name);
            let sql = format!(
                "SET password_encryption = '{encryption}'; \
                 CREATE ROLE {ident} LOGIN PASSWORD {}; \
                 GRANT CREATE ON DATABASE postgres TO {ident}; \
                 GRANT CREATE ON SCHEMA public TO {ident};",
                quote_literal(password)
            );
            primary
                .psql(&sql)
                .with_context(|| format!("creating role {name} on the primary"))?;
        }

        // Standbys: base backups of the primary.
        for i in 1..=spec.standbys {
            let name = format!("n{i}");
            let node = cluster.new_node(&name, &bin)?;
            let mut cmd = server_cmd(&bin.join("pg_basebackup"));
            cmd.args([
                "-h",
                HOST,
                "-p",
                &primary.port.to_string(),
                "-U",
                SUPERUSER,
                "-D",
            ])
            .arg(&node.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-w"])
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .current_dir(&cluster.dir);
            let out = run(&mut cmd, Duration::from_secs(180))
                .with_context(|| format!("base backup for standby {name}"))?;
            check(
                &cmd,
                &out,
                &format!(
                    "pg_basebackup for standby {name} from the primary (port {})",
                    primary.port
                ),
                Some(&primary),
            )?;
            cluster.start_new_node(node)?;
        }

        if let SyncMode::Any(k) = spec.sync {
            let names: Vec<String> = cluster
                .nodes
                .iter()
                .skip(1)
                .map(|n| n.name.clone())
                .collect();
            let value = format!("ANY {k} ({})", names.join(", "));
            primary.psql(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = {}",
                quote_literal(&value)
            ))?;
            primary.psql("SELECT pg_reload_conf()")?;
        }

        cluster.wait_streaming(&primary, spec.standbys, Duration::from_secs(60))?;
        if matches!(spec.sync, SyncMode::Any(_)) {
            cluster.wait_sync_standbys(&primary, spec.standbys, Duration::from_secs(30))?;
        }
        Ok(cluster)
    }

    /// The node called `name` ("n0", "n1", ...).
    pub fn node(&self, name: &str) -> Option<&PgNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Blocks until at least `standby_count` standbys stream from `primary`
    /// (`pg_stat_replication.state = 'streaming'`), up to `timeout`.
    pub fn wait_streaming(
        &self,
        primary: &PgNode,
        standby_count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let sql = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'";
        self.wait_count(primary, sql, standby_count, timeout)
            .with_context(|| {
                format!(
                    "waiting for {standby_count} standbys to stream from {} (port {})",
                    primary.name, primary.port
                )
            })
    }

    /// Keep the data directories after drop (for debugging); the default is to delete them.
    pub fn keep_on_drop(&mut self, keep: bool) {
        self.keep = keep;
    }

    fn wait_sync_standbys(&self, primary: &PgNode, count: usize, timeout: Duration) -> Result<()> {
        let sql = "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')";
        self.wait_count(primary, sql, count, timeout)
            .with_context(|| {
                format!(
                    "waiting for {count} synchronous standbys of {} (port {})",
                    primary.name, primary.port
                )
            })
    }

    /// Polls `sql` (a single count) on `primary` until it reaches `want`.
    fn wait_count(
        &self,
        primary: &PgNode,
        sql: &str,
        want: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            match primary.psql(sql) {
                Ok(s) => {
                    if s.parse::<usize>().is_ok_and(|n| n >= want) {
                        return Ok(());
                    }
                    last = format!("{s} of {want}");
                }
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                let replication = primary
                    .psql(
                        "SELECT application_name, state, sync_state, replay_lsn \
                         FROM pg_stat_replication ORDER BY 1",
                    )
                    .unwrap_or_else(|e| format!("(could not read pg_stat_replication: {e:#})"));
                let mut msg = format!(
                    "timed out after {timeout:?}: last result {last}\n\
                     pg_stat_replication on {}:\n{replication}\n--- log of {} ---\n{}",
                    primary.name,
                    primary.name,
                    primary.log_tail(LOG_TAIL_LINES)
                );
                for node in self.nodes.iter().filter(|n| n.name != primary.name) {
                    msg.push_str(&format!(
                        "\n--- log of {} ---\n{}",
                        node.name,
                        node.log_tail(15)
                    ));
                }
                bail!(msg);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A node description with its socket directory created; not started, not in `nodes`.
    fn new_node(&self, name: &str, bin: &Path) -> Result<PgNode> {
        let socket_dir = self.dir.join(format!("sock-{name}"));
        make_dir(&socket_dir, 0o700)?;
        Ok(PgNode {
            name: name.to_string(),
            port: 0,
            data_dir: self.dir.join(name),
            bin_dir: bin.to_path_buf(),
            log_file: self.dir.join(format!("{name}.log")),
            socket_dir,
        })
    }

    /// Gives `node` a free port and starts it, retrying with another port if the chosen one
    /// was taken in the meantime. The node joins `nodes` even when it fails, so drop cleans up.
    fn start_new_node(&mut self, mut node: PgNode) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            node.port = free_port()?;
            node.append_conf(&node.node_conf())?;
            let log_len = fs::metadata(&node.log_file).map(|m| m.len()).unwrap_or(0);
            match node.start() {
                Ok(()) => {
                    self.nodes.push(node);
                    return Ok(());
                }
                Err(e) => {
                    let new_log = read_from(&node.log_file, log_len);
                    let port_taken = new_log.contains("could not bind")
                        || new_log.contains("Address already in use");
                    if !port_taken || attempt >= START_ATTEMPTS || node.is_running() {
                        self.nodes.push(node);
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        for node in self.nodes.iter().rev() {
            node.signal_all(libc::SIGCONT);
        }
        for node in self.nodes.iter().rev() {
            if node.is_running() {
                let _ = node.pg_ctl_stop("immediate", Duration::from_secs(15));
            }
            if node.is_running() {
                node.signal_all(libc::SIGKILL);
            }
        }
        if self.keep {
            eprintln!(
                "pgswitch harness: keeping cluster files in {}",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------------------------

impl PgNode {
    /// The address the node listens on: "127.0.0.1".
    pub fn host(&self) -> &str {
        HOST
    }

    /// The directory holding the node's Unix-domain socket (`.s.PGSQL.<port>`): as a `host`,
    /// it makes libpq and pgswitch connect through the socket instead of TCP.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The first line of `data_dir/postmaster.pid` (may be stale after a crash).
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Processes whose parent is the (live) postmaster.
    pub fn child_pids(&self) -> Vec<i32> {
        match self.live_postmaster_pid() {
            Some(pm) => children_of(pm),
            None => Vec::new(),
        }
    }

    /// `pg_ctl start -w`; also restarts the node after a fault (stale lock files of a killed
    /// postmaster are removed first).
    pub fn start(&self) -> Result<()> {
        if let Some(pid) = self.live_postmaster_pid() {
            bail!(
                "node {} (port {}) is already running (postmaster pid {pid})",
                self.name,
                self.port
            );
        }
        self.remove_stale_lock_files();
        let mut cmd = server_cmd(&self.bin_dir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t", &PG_CTL_TIMEOUT_SECS.to_string(), "-l"])
            .arg(&self.log_file)
            .arg("start")
            .current_dir(self.cwd());
        let out = run(&mut cmd, Duration::from_secs(PG_CTL_TIMEOUT_SECS + 30))
            .with_context(|| format!("starting node {} (port {})", self.name, self.port))?;
        check(
            &cmd,
            &out,
            &format!("starting node {} (port {})", self.name, self.port),
            Some(self),
        )
    }

    /// `pg_ctl stop -m fast -w`. A hung node is resumed first; a stopped node is left alone.
    pub fn stop_fast(&self) -> Result<()> {
        self.stop("fast")
    }

    /// `pg_ctl stop -m immediate -w`. A hung node is resumed first; a stopped node is left alone.
    pub fn stop_immediate(&self) -> Result<()> {
        self.stop("immediate")
    }

    /// SIGKILL the postmaster and all its children, then wait until the port refuses connections.
    pub fn kill9(&self) -> Result<()> {
        self.signal_all(libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let alive = self.live_postmaster_pid().is_some();
            let accepting = self.port_accepts();
            if !alive && !accepting {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {} (port {}) still {} 10 s after SIGKILL\n--- log ---\n{}",
                    self.name,
                    self.port,
                    if alive {
                        "alive"
                    } else {
                        "accepts connections"
                    },
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP the postmaster and all its children: the kernel still accepts TCP connections
    /// into the listen backlog but nothing answers.
    pub fn hang(&self) -> Result<()> {
        if self.live_postmaster_pid().is_none() {
            bail!(
                "cannot hang node {} (port {}): not running",
                self.name,
                self.port
            );
        }
        self.signal_all(libc::SIGSTOP);
        Ok(())
    }

    /// SIGCONT the postmaster and all its children (undoes [`PgNode::hang`]).
    pub fn resume(&self) -> Result<()> {
        self.signal_all(libc::SIGCONT);
        Ok(())
    }

    /// Whether the postmaster process is alive (a hung one counts as running).
    pub fn is_running(&self) -> bool {
        self.live_postmaster_pid().is_some()
    }

    /// Runs SQL as the superuser with psql and returns its trimmed stdout.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_as(SUPERUSER, SUPERUSER_PASSWORD, sql)
    }

    /// Runs SQL as `user` with psql (`PGCONNECT_TIMEOUT=5`) and returns its trimmed stdout.
    pub fn psql_as(&self, user: &str, password: &str, sql: &str) -> Result<String> {
        self.psql_with(user, password, sql, Duration::from_secs(5))
    }

    /// Runs `psql -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p PORT -U user -d postgres -c SQL`
    /// with `PGPASSWORD` and `PGCONNECT_TIMEOUT` (whole seconds, libpq's minimum is 2); the
    /// whole command is killed if it runs longer than the connect timeout + 60 s.
    pub fn psql_with(
        &self,
        user: &str,
        password: &str,
        sql: &str,
        connect_timeout: Duration,
    ) -> Result<String> {
        let secs = connect_timeout.as_secs().max(1);
        let mut cmd = Command::new(self.psql_path());
        cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", HOST])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", secs.to_string())
            .env("PGSSLMODE", "disable")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS");
        let out = run(&mut cmd, Duration::from_secs(secs + 60)).with_context(|| {
            format!(
                "psql on node {} (port {}) as {user}: {sql}",
                self.name, self.port
            )
        })?;
        if !out.status.success() {
            bail!(
                "psql on node {} (port {}) as {user} failed ({}): {}\nSQL: {sql}",
                self.name,
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The last `lines` lines of the server log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        match fs::read(&self.log_file) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(no log at {}: {e})", self.log_file.display()),
        }
    }

    /// A libpq connection string for this node and database `postgres`.
    pub fn conninfo(&self, user: &str, password: &str) -> String {
        format!(
            "host={HOST} port={} user={} password={} dbname=postgres",
            self.port,
            conninfo_value(user),
            conninfo_value(password)
        )
    }

    /// Path of the server log file.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// `SELECT pg_promote(true, 60)`, then `CHECKPOINT` (so pg_rewind sees the new timeline).
    pub fn promote(&self) -> Result<()> {
        let promoted = self.psql("SELECT pg_promote(true, 60)")?;
        if promoted != "t" {
            bail!(
                "pg_promote on node {} (port {}) returned {promoted:?}\n--- log ---\n{}",
                self.name,
                self.port,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        self.psql("CHECKPOINT")?;
        Ok(())
    }

    /// Turns this node (typically a crashed or demoted old primary) into a standby of
    /// `primary`: stops it if it runs, `pg_rewind -R` from `primary`, restores this node's own
    /// port/socket/cluster_name settings (pg_rewind copies the source's configuration files),
    /// and starts it. Wait with [`PgCluster::wait_streaming`] to see it stream.
    pub fn rejoin_as_standby_of(&self, primary: &PgNode) -> Result<()> {
        if self.is_running() {
            self.stop_fast()?;
        }
        self.remove_stale_lock_files();
        let mut cmd = server_cmd(&self.bin_dir.join("pg_rewind"));
        cmd.arg("--target-pgdata")
            .arg(&self.data_dir)
            .arg(format!(
                "--source-server={}",
                primary.conninfo(SUPERUSER, SUPERUSER_PASSWORD)
            ))
            .args(["--write-recovery-conf", "--no-sync"])
            .current_dir(self.cwd());
        let out = run(&mut cmd, Duration::from_secs(180))
            .with_context(|| format!("pg_rewind of node {}", self.name))?;
        check(
            &cmd,
            &out,
            &format!("pg_rewind of node {} from {}", self.name, primary.name),
            Some(self),
        )?;
        // pg_rewind copies postgresql.conf from the source; later lines win.
        self.append_conf(&self.node_conf())?;
        let signal = self.data_dir.join("standby.signal");
        if !signal.exists() {
            write_owned(&signal, "")?;
        }
        self.start()
    }

    // -- private ------------------------------------------------------------------------------

    fn psql_path(&self) -> PathBuf {
        let own = self.bin_dir.join("psql");
        if own.is_file() {
            own
        } else {
            PathBuf::from("psql")
        }
    }

    /// Working directory for server-side commands: one the postgres user can enter.
    fn cwd(&self) -> PathBuf {
        self.data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/tmp"))
    }

    fn node_conf(&self) -> String {
        format!(
            "\n# pgswitch harness: node {name}\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             cluster_name = '{name}'\n",
            name = self.name,
            port = self.port,
            sock = self.socket_dir.display()
        )
    }

    fn append_conf(&self, text: &str) -> Result<()> {
        let path = self.data_dir.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    fn stop(&self, mode: &str) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        self.signal_all(libc::SIGCONT);
        self.pg_ctl_stop(mode, Duration::from_secs(PG_CTL_TIMEOUT_SECS))
    }

    fn pg_ctl_stop(&self, mode: &str, timeout: Duration) -> Result<()> {
        let mut cmd = server_cmd(&self.bin_dir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args([
                "-w",
                "-t",
                &timeout.as_secs().max(1).to_string(),
                "-m",
                mode,
                "stop",
            ])
            .current_dir(self.cwd());
        let out = run(&mut cmd, timeout + Duration::from_secs(15))
            .with_context(|| format!("stopping node {} (-m {mode})", self.name))?;
        check(
            &cmd,
            &out,
            &format!("stopping node {} (port {}) -m {mode}", self.name, self.port),
            Some(self),
        )
    }

    /// The postmaster pid if that process is alive (not a zombie) and is a PostgreSQL server.
    fn live_postmaster_pid(&self) -> Option<i32> {
        let pid = self.postmaster_pid()?;
        let stat = ProcStat::read(pid)?;
        let is_server = stat.comm == "postgres" || stat.comm == "postmaster";
        (is_server && stat.state != 'Z' && stat.state != 'X').then_some(pid)
    }

    /// Sends `sig` to the postmaster and all its children. SIGSTOP/SIGKILL stop the postmaster
    /// first so it cannot fork while its children are listed; SIGCONT wakes the children first.
    fn signal_all(&self, sig: i32) {
        let Some(pm) = self.live_postmaster_pid() else {
            return;
        };
        if sig == libc::SIGCONT {
            for child in children_of(pm) {
                send_signal(child, sig);
            }
            send_signal(pm, sig);
        } else {
            send_signal(pm, libc::SIGSTOP);
            let children = children_of(pm);
            for &child in &children {
                send_signal(child, sig);
            }
            send_signal(pm, sig);
            if sig == libc::SIGKILL {
                // Children forked between the listing and the stop (none expected).
                for child in children_of(pm) {
                    if !children.contains(&child) {
                        send_signal(child, sig);
                    }
                }
            }
        }
    }

    fn port_accepts(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
    }

    /// After a crash the postmaster may linger as a zombie (PID 1 of a container does not
    /// always reap), and PostgreSQL refuses to start while a lock file names a live pid.
    fn remove_stale_lock_files(&self) {
        if self.live_postmaster_pid().is_some() {
            return;
        }
        let _ = fs::remove_file(self.data_dir.join("postmaster.pid"));
        if let Ok(entries) = fs::read_dir(&self.socket_dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Free functions
// ---------------------------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1, picked by the OS; never the same port twice in one process.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
        let port = listener
            .local_addr()
            .context("reading a bound port")?
            .port();
        drop(listener);
        let mut set = handed_out.lock().unwrap_or_else(|e| e.into_inner());
        if set.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free loopback port found after 100 attempts")
}

/// The PostgreSQL server binary directory: `$PGSWITCH_PG_BIN`, else the highest
/// `/usr/lib/postgresql/N/bin` with N >= 15 that contains `postgres`.
pub fn pg_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGSWITCH_PG_BIN").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if dir.join("postgres").is_file() {
            return Ok(dir);
        }
        bail!(
            "{NOT_FOUND} ($PGSWITCH_PG_BIN={} has no postgres binary)",
            dir.display()
        );
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let Some(major) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let bin = entry.path().join("bin");
            if major >= 15
                && bin.join("postgres").is_file()
                && best.as_ref().is_none_or(|(b, _)| major > *b)
            {
                best = Some((major, bin));
            }
        }
    }
    best.map(|(_, bin)| bin).ok_or_else(|| anyhow!(NOT_FOUND))
}

fn pg_major_version(bin: &Path) -> Result<String> {
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("--version");
    let out = run(&mut cmd, Duration::from_secs(30))?;
    check(&cmd, &out, "reading the PostgreSQL version", None)?;
    // "postgres (PostgreSQL) 15.6 (Debian 15.6-0+deb12u1)"
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_once("(PostgreSQL)")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|v| v.split('.').next())
        .filter(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("cannot parse the PostgreSQL version from {text:?}"))
}

fn common_conf(spec: &ClusterSpec) -> String {
    let mut conf = String::from(
        "\n# pgswitch harness: all nodes\n\
         listen_addresses = '127.0.0.1'\n\
         wal_level = replica\n\
         max_wal_senders = 10\n\
         max_replication_slots = 10\n\
         hot_standby = on\n\
         wal_log_hints = on\n\
         wal_keep_size = '256MB'\n\
         fsync = off\n\
         synchronous_commit = on\n\
         shared_buffers = '32MB'\n\
         max_connections = 300\n\
         hot_standby_feedback = on\n\
         wal_receiver_status_interval = '1s'\n\
         log_line_prefix = '%m [%p] '\n",
    );
    if spec.host_auth == HostAuth::Md5 {
        conf.push_str("password_encryption = 'md5'\n");
    }
    for line in &spec.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    conf
}

fn hba_conf(auth: HostAuth) -> String {
    let method = auth.hba_method();
    let mut hba =
        String::from("# pgswitch harness\nlocal replication all trust\nlocal all all trust\n");
    for net in ["127.0.0.1/32", "::1/128"] {
        hba.push_str(&format!(
            "host replication all {net} trust\n\
             host all {SUPERUSER} {net} scram-sha-256\n\
             host all all {net} {method}\n"
        ));
    }
    hba
}

/// Runs `initdb` once per machine (per PostgreSQL major and user) into a template directory.
fn ensure_template(bin: &Path, major: &str) -> Result<PathBuf> {
    let suffix = if is_root() {
        String::new()
    } else {
        // SAFETY: geteuid has no preconditions.
        format!("-u{}", unsafe { libc::geteuid() })
    };
    let base = format!("/tmp/pgswitch-pg-template-{major}-v1{suffix}");
    let template = PathBuf::from(&base);
    // The template appears by an atomic rename, so its existence means it is complete.
    if template.join("PG_VERSION").is_file() {
        return Ok(template);
    }
    let _lock = FileLock::acquire(Path::new(&format!("{base}.lock")), Duration::from_secs(300))?;
    if template.join("PG_VERSION").is_file() {
        return Ok(template);
    }
    if template.exists() {
        fs::remove_dir_all(&template)
            .with_context(|| format!("removing a broken template {}", template.display()))?;
    }
    let staging = PathBuf::from(format!("{base}.staging-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    make_dir(&staging, 0o700)?;
    let result = (|| -> Result<()> {
        let pwfile = staging.join("pwfile");
        write_owned(&pwfile, &format!("{SUPERUSER_PASSWORD}\n"))?;
        let data = staging.join("data");
        let mut cmd = server_cmd(&bin.join("initdb"));
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .current_dir(&staging);
        let out = run(&mut cmd, Duration::from_secs(300))?;
        check(&cmd, &out, "initdb of the template cluster", None)?;
        fs::rename(&data, &template)
            .with_context(|| format!("moving {} to {}", data.display(), template.display()))
    })();
    let _ = fs::remove_dir_all(&staging);
    result.with_context(|| format!("creating the template cluster {}", template.display()))?;
    Ok(template)
}

fn unique_cluster_dir() -> Result<PathBuf> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    for _ in 0..20 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!(
            "/tmp/pgswitch-cluster-{}-{n}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {
                set_mode_and_owner(&dir, 0o700)?;
                return Ok(dir);
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("could not create a unique cluster directory under /tmp")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of the `postgres` operating-system user.
fn pg_os_user() -> Result<(libc::uid_t, libc::gid_t)> {
    static IDS: OnceLock<Option<(libc::uid_t, libc::gid_t)>> = OnceLock::new();
    let ids = IDS.get_or_init(|| {
        let name = CString::new(OS_USER).ok()?;
        // SAFETY: passwd is plain old data; getpwnam_r fills it, pointing into `buf`, which
        // outlives every use of the fields we copy out.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf: Vec<libc::c_char> = vec![0; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    });
    ids.ok_or_else(|| {
        anyhow!(
            "running as root, but the operating-system user '{OS_USER}' (which must run the \
             PostgreSQL server) does not exist: install the server with \
             'apt-get install -y postgresql-15' (it creates the user) or run as a non-root user"
        )
    })
}

/// A command for a server-side binary: run as the postgres user when this process is root.
fn server_cmd(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", OS_USER, "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    set_mode_and_owner(path, mode)
}

fn set_mode_and_owner(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    chown_pg(path)
}

/// Writes a file and, when root, gives it to the postgres user.
fn write_owned(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    chown_pg(path)
}

fn chown_pg(path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let (uid, gid) = pg_os_user()?;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path with a NUL byte: {}", path.display()))?;
    // SAFETY: c_path is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::chown(c_path.as_ptr(), uid, gid) } != 0 {
        let err = std::io::Error::last_os_error();
        return Err(err).with_context(|| format!("chown {OS_USER} {}", path.display()));
    }
    Ok(())
}

fn chown_recursive(path: &Path) -> Result<()> {
    let (uid, gid) = pg_os_user()?;
    let mut cmd = Command::new("chown");
    cmd.arg("-R").arg(format!("{uid}:{gid}")).arg(path);
    let out = run(&mut cmd, Duration::from_secs(60))?;
    check(&cmd, &out, &format!("chown -R of {}", path.display()), None)
}

/// Exclusive advisory lock on a file, released on drop (when the file closes).
struct FileLock {
    _file: fs::File,
}

impl FileLock {
    fn acquire(path: &Path, timeout: Duration) -> Result<FileLock> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .or_else(|_| fs::File::open(path))
            .with_context(|| format!("opening lock file {}", path.display()))?;
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: the descriptor belongs to `file`, which is alive.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(FileLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != ErrorKind::WouldBlock && err.raw_os_error() != Some(libc::EINTR) {
                return Err(err).with_context(|| format!("flock {}", path.display()));
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for the lock {} (another process is \
                     creating the template cluster)",
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs a command with null stdin and captured output, killing its process group after
/// `timeout`. A non-zero exit status is not an error here (see [`check`]).
fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not run {}", describe(cmd)))?;
    let stdout = read_in_thread(child.stdout.take());
    let stderr = read_in_thread(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            break status;
        }
        if Instant::now() >= deadline {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill has no memory-safety preconditions; the child leads its group.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr
                .recv_timeout(Duration::from_secs(1))
                .unwrap_or_default();
            bail!(
                "{} timed out after {timeout:?} and was killed; stderr: {}",
                describe(cmd),
                String::from_utf8_lossy(&err).trim()
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    // A grandchild (never the daemonized postmaster, whose output goes to its log) could keep
    // the pipes open; don't wait for it forever.
    let stdout = stdout
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    let stderr = stderr
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn read_in_thread<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// Fails with the command, its output and the node's log tail when it exited non-zero.
fn check(cmd: &Command, out: &Output, what: &str, node: Option<&PgNode>) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let mut msg = format!(
        "{what} failed: {} exited with {}\nstderr: {}\nstdout: {}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    if let Some(node) = node {
        msg.push_str(&format!(
            "\n--- log of {} ({}) ---\n{}",
            node.name,
            node.log_file.display(),
            node.log_tail(LOG_TAIL_LINES)
        ));
    }
    bail!(msg)
}

/// The program and arguments (not the environment, which may hold passwords).
fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().to_string()];
    parts.extend(
        cmd.get_args()
            .map(|a: &OsStr| a.to_string_lossy().to_string()),
    );
    parts.join(" ")
}

fn read_from(path: &Path, offset: u64) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
            String::from_utf8_lossy(&bytes[start..]).to_string()
        }
        Err(_) => String::new(),
    }
}

fn send_signal(pid: i32, sig: i32) {
    if pid > 1 {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The fields of `/proc/PID/stat` we need.
struct ProcStat {
    comm: String,
    state: char,
    ppid: i32,
}

impl ProcStat {
    fn read(pid: i32) -> Option<ProcStat> {
        ProcStat::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// "PID (COMM) STATE PPID ..."; COMM may itself contain spaces and parentheses.
    fn parse(stat: &str) -> Option<ProcStat> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat.get(open + 1..close)?.to_string();
        let mut rest = stat.get(close + 1..)?.split_whitespace();
        let state = rest.next()?.chars().next()?;
        let ppid = rest.next()?.parse().ok()?;
        Some(ProcStat { comm, state, ppid })
    }
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| ProcStat::read(pid).is_some_and(|s| s.ppid == parent && s.state != 'Z'))
        .collect()
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A libpq conninfo value, quoted when needed.
fn conninfo_value(value: &str) -> String {
    if !value.is_empty() && !value.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses_comm_with_spaces_and_parens() {
        let s = ProcStat::parse("123 (post gres) (x)) S 45 123 123 0 -1").unwrap();
        assert_eq!(s.comm, "post gres) (x)");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 45);
    }

    #[test]
    fn free_port_never_repeats_within_a_process() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        assert_eq!(ports.len(), 50);
    }

    #[test]
    fn conninfo_quotes_values_that_need_it() {
        assert_eq!(conninfo_value("app"), "app");
        assert_eq!(conninfo_value(""), "''");
        assert_eq!(conninfo_value("a b'c"), "'a b\\'c'");
    }

    #[test]
    fn hba_always_uses_scram_for_the_superuser() {
        let hba = hba_conf(HostAuth::Trust);
        let su = hba
            .find("host all postgres 127.0.0.1/32 scram-sha-256")
            .unwrap();
        let all = hba.find("host all all 127.0.0.1/32 trust").unwrap();
        assert!(su < all);
    }
}
