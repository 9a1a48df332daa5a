//! Running the Python client tests (pytest) against a pgswitch.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The whole pytest run; each test inside fails on its own after 60 s.
const PYTEST_LIMIT: Duration = Duration::from_secs(420);

const INSTALL_HINT: &str =
    "install them with: python3 -m pip install \"psycopg[binary]\" pytest asyncpg \
     (add --break-system-packages on Debian's own python3), or run scripts/test.sh, which does";

/// Fails (never skips) when the python3 on PATH cannot import `modules` (e.g. "psycopg, pytest").
pub fn require_python_modules(modules: &str) {
    let probe = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdin(Stdio::null())
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.trim().lines().last().unwrap_or("no error output");
            panic!("python3 cannot import {modules} ({why}): {INSTALL_HINT}")
        }
        Err(e) => panic!(
            "cannot run python3 ({e}); install Python 3, then psycopg and pytest: {INSTALL_HINT}"
        ),
    }
}

/// Runs `python3 -m pytest -q <dir>`, plus the arguments in `PGSWITCH_PYTEST_ARGS`
/// (e.g. `-k copy -x` to run one test while debugging).
pub fn run_pytest(dir: &str, dsn: String) -> std::io::Result<Output> {
    let extra = std::env::var("PGSWITCH_PYTEST_ARGS").unwrap_or_default();
    let child = Command::new("python3")
        .args(["-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"])
        .args(extra.split_whitespace())
        .arg(dir)
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

/// Runs the pytest files of `dir` against `dsn` off the runtime's threads and reports them
/// (see [`report_pytest`]): fails the test when pytest cannot run or fails.
pub async fn pytest(dir: &'static str, dsn: String) {
    let output = tokio::task::spawn_blocking(move || run_pytest(dir, dsn))
        .await
        .expect("pytest task")
        .unwrap_or_else(|e| panic!("cannot run python3 -m pytest: {e}"));
    report_pytest(dir, &output);
}

/// Prints pytest's output straight to the process's stderr, past the test harness's capture,
/// so every Python test that ran shows in the output of `cargo test`, passing or not; then
/// fails when pytest did.
pub fn report_pytest(dir: &str, output: &Output) {
    let report = format!(
        "\n---- pytest {dir} ----\n{}{}---- end of pytest ----\n",
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
