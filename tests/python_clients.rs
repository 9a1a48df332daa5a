//! psycopg 3 (libpq underneath) through pgswitch: runs the pytest suite in `tests/python`
//! against a real cluster with a session-mode pgswitch in front.

mod common;

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::TestEnv;

/// The whole pytest run; each test inside fails on its own after 60 s.
const PYTEST_LIMIT: Duration = Duration::from_secs(420);

const INSTALL_HINT: &str = "install them with: python3 -m pip install \"psycopg[binary]\" pytest \
     (add --break-system-packages on Debian's own python3), or run scripts/test.sh, which does";

/// Fails (never skips) when the python3 on PATH cannot import psycopg and pytest.
fn require_psycopg_and_pytest() {
    let probe = Command::new("python3")
        .args(["-c", "import psycopg, pytest"])
        .stdin(Stdio::null())
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.trim().lines().last().unwrap_or("no error output");
            panic!("python3 cannot import psycopg and pytest ({why}): {INSTALL_HINT}")
        }
        Err(e) => panic!(
            "cannot run python3 ({e}); install Python 3, then psycopg and pytest: {INSTALL_HINT}"
        ),
    }
}

/// Runs `python3 -m pytest -q tests/python`, plus the arguments in `PGSWITCH_PYTEST_ARGS`
/// (e.g. `-k copy -x` to run one test while debugging).
fn run_pytest(dsn: String) -> std::io::Result<Output> {
    let extra = std::env::var("PGSWITCH_PYTEST_ARGS").unwrap_or_default();
    let child = Command::new("python3")
        .args(["-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"])
        .args(extra.split_whitespace())
        .arg("tests/python")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PGSWITCH_DSN", dsn)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    // Kills this pytest (by its own pid) if it outlives the limit, so a hang fails the test.
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(PYTEST_LIMIT).is_err() {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill(2) on the pid of the child we spawned and have not reaped yet.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    });
    let output = child.wait_with_output();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_clients_work_through_pgswitch() {
    require_psycopg_and_pytest();
    let env = TestEnv::session_mode().await;
    let dsn = env.app_dsn();
    let output = tokio::task::spawn_blocking(move || run_pytest(dsn))
        .await
        .expect("pytest task")
        .unwrap_or_else(|e| panic!("cannot run python3 -m pytest: {e}"));

    // Straight to the process's stderr, past the test harness's capture, so every Python test
    // that ran shows in the output of `cargo test`, passing or not.
    let report = format!(
        "\n---- pytest tests/python (psycopg 3 through pgswitch) ----\n{}{}---- end of pytest ----\n",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    let _ = std::io::stderr().write_all(report.as_bytes());

    assert!(
        output.status.success(),
        "pytest failed ({}), see its output above; PGSWITCH_LOG=debug adds the proxy's log",
        output.status
    );
}
