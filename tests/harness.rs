//! Integration tests of the test harness itself: real PostgreSQL clusters, real faults.

use pgswitch::harness::{
    free_port, ClusterSpec, HostAuth, PgCluster, PgNode, SyncMode, SUPERUSER, SUPERUSER_PASSWORD,
};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn start(spec: &ClusterSpec) -> PgCluster {
    match PgCluster::start(spec) {
        Ok(c) => c,
        Err(e) => panic!("cluster did not start: {e:#}"),
    }
}

fn node<'a>(cluster: &'a PgCluster, name: &str) -> &'a PgNode {
    cluster
        .node(name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn psql(node: &PgNode, sql: &str) -> String {
    match node.psql(sql) {
        Ok(s) => s,
        Err(e) => panic!("{e:#}\n--- log of {} ---\n{}", node.name, node.log_tail(30)),
    }
}

/// Polls `sql` on `node` until it returns `want`, up to 20 s.
fn wait_for(node: &PgNode, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = node.psql(sql);
        if matches!(&got, Ok(s) if s == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never returned {want:?} for {sql:?}; last: {got:?}\n--- log ---\n{}",
            node.name,
            node.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn port_accepts(node: &PgNode) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, node.port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[test]
fn standbys_stream_from_the_primary_and_survive_its_crash_and_hang() {
    let cluster = start(&ClusterSpec::default());
    assert_eq!(cluster.nodes.len(), 3);
    let (n0, n1, n2) = (
        node(&cluster, "n0"),
        node(&cluster, "n1"),
        node(&cluster, "n2"),
    );
    assert_eq!(n0.host(), "127.0.0.1");
    assert_eq!(psql(n0, "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(psql(n1, "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(psql(n2, "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(
        psql(
            n0,
            "SELECT string_agg(application_name || ':' || state || ':' || sync_state, ',' \
             ORDER BY application_name) FROM pg_stat_replication"
        ),
        "n1:streaming:async,n2:streaming:async"
    );

    // The extra user logs in with its password, can create tables, and a write replicates.
    n0.psql_as(
        "app",
        "secret",
        "CREATE TABLE t (v int); INSERT INTO t VALUES (42)",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(n0.psql_as("app", "wrong", "SELECT 1").is_err());
    wait_for(n1, "SELECT coalesce(sum(v), 0) FROM t", "42");
    wait_for(n2, "SELECT coalesce(sum(v), 0) FROM t", "42");
    assert_eq!(
        n1.psql_as("app", "secret", "SELECT v FROM t")
            .unwrap_or_else(|e| panic!("{e:#}")),
        "42"
    );

    // SIGKILL of the primary: the whole process tree dies and the port refuses.
    let pm = n0.postmaster_pid().expect("postmaster pid");
    assert!(!n0.child_pids().is_empty(), "the postmaster has children");
    n0.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!n0.is_running());
    assert!(!port_accepts(n0), "port {} still accepts", n0.port);
    assert!(n0.psql("SELECT 1").is_err());
    assert!(!std::path::Path::new(&format!("/proc/{pm}/status")).exists() || !n0.is_running());

    // Restart after the crash: crash recovery, data intact, standbys stream again.
    n0.start().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(n0.is_running());
    assert_eq!(psql(n0, "SELECT sum(v) FROM t"), "42");
    cluster
        .wait_streaming(n0, 2, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));

    // A hung standby: connects are accepted by the kernel but nothing answers.
    n1.hang().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(n1.is_running(), "a hung node still counts as running");
    assert!(
        port_accepts(n1),
        "the kernel backlog accepts the TCP connect"
    );
    let began = Instant::now();
    let hung = n1.psql_with(
        SUPERUSER,
        SUPERUSER_PASSWORD,
        "SELECT 1",
        Duration::from_secs(2),
    );
    let waited = began.elapsed();
    assert!(hung.is_err(), "psql answered while hung: {hung:?}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "psql gave up after {waited:?}"
    );
    n1.resume().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(psql(n1, "SELECT 1"), "1");

    // Clean stop and start.
    n2.stop_fast().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!n2.is_running());
    n2.start().unwrap_or_else(|e| panic!("{e:#}"));
    cluster
        .wait_streaming(n0, 2, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn any_1_cluster_has_quorum_standbys_and_commits_with_one_of_them_down() {
    let spec = ClusterSpec {
        standbys: 2,
        sync: SyncMode::Any(1),
        ..ClusterSpec::default()
    };
    let cluster = start(&spec);
    let (n0, n1, n2) = (
        node(&cluster, "n0"),
        node(&cluster, "n1"),
        node(&cluster, "n2"),
    );
    assert_eq!(psql(n0, "SHOW synchronous_standby_names"), "ANY 1 (n1, n2)");
    assert_eq!(
        psql(
            n0,
            "SELECT string_agg(application_name || ':' || sync_state, ',' \
             ORDER BY application_name) FROM pg_stat_replication"
        ),
        "n1:quorum,n2:quorum"
    );
    assert_eq!(psql(n1, "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(psql(n2, "SELECT pg_is_in_recovery()"), "t");

    // One standby down: ANY 1 still acknowledges commits through the other one.
    n1.stop_immediate().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!n1.is_running());
    psql(n0, "CREATE TABLE s (v int); INSERT INTO s VALUES (7)");
    wait_for(n2, "SELECT coalesce(sum(v), 0) FROM s", "7");
    n1.start().unwrap_or_else(|e| panic!("{e:#}"));
    wait_for(n1, "SELECT coalesce(sum(v), 0) FROM s", "7");
}

#[test]
fn md5_host_auth_stores_md5_passwords_and_accepts_them() {
    let spec = ClusterSpec {
        standbys: 0,
        host_auth: HostAuth::Md5,
        users: vec![("legacy".into(), "pw it's".into())],
        ..ClusterSpec::default()
    };
    let cluster = start(&spec);
    let n0 = node(&cluster, "n0");
    assert_eq!(
        psql(
            n0,
            "SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'legacy'"
        ),
        "md5"
    );
    assert_eq!(
        n0.psql_as("legacy", "pw it's", "SELECT current_user")
            .unwrap_or_else(|e| panic!("{e:#}")),
        "legacy"
    );
    assert!(n0.psql_as("legacy", "nope", "SELECT 1").is_err());
    assert!(n0
        .conninfo("legacy", "pw it's")
        .contains("password='pw it\\'s'"));
}

#[test]
fn a_crashed_primary_rejoins_as_a_standby_of_the_promoted_one() {
    let mut cluster = start(&ClusterSpec::default());
    cluster.keep_on_drop(false);
    let (n0, n1, n2) = (
        node(&cluster, "n0"),
        node(&cluster, "n1"),
        node(&cluster, "n2"),
    );
    psql(n0, "CREATE TABLE r (v int); INSERT INTO r VALUES (1)");
    wait_for(n1, "SELECT coalesce(sum(v), 0) FROM r", "1");
    wait_for(n2, "SELECT coalesce(sum(v), 0) FROM r", "1");

    n0.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    n1.promote().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(psql(n1, "SELECT pg_is_in_recovery()"), "f");
    psql(
        n2,
        &format!(
            "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={} user=postgres'",
            n1.port
        ),
    );
    psql(n2, "SELECT pg_reload_conf()");
    psql(n1, "INSERT INTO r VALUES (2)");

    n0.rejoin_as_standby_of(n1)
        .unwrap_or_else(|e| panic!("{e:#}"));
    cluster
        .wait_streaming(n1, 2, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(psql(n0, "SELECT pg_is_in_recovery()"), "t");
    wait_for(n0, "SELECT sum(v) FROM r", "3");
    wait_for(n2, "SELECT sum(v) FROM r", "3");
    assert_eq!(psql(n0, "SHOW port"), n0.port.to_string());
}

#[test]
fn free_ports_are_distinct() {
    let a = free_port().expect("port");
    let b = free_port().expect("port");
    assert_ne!(a, b);
}
