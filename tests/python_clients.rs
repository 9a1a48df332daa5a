//! psycopg 3 (libpq underneath) through pgswitch: runs the pytest suite in `tests/python`
//! against a real cluster with a session-mode pgswitch in front.

mod common;

use common::python::{pytest, require_python_modules};
use common::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_clients_work_through_pgswitch() {
    require_python_modules("psycopg, pytest");
    let env = TestEnv::session_mode().await;
    let dsn = env.app_dsn();
    pytest("tests/python", dsn).await;
}
