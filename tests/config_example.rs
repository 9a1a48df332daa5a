//! `config/pgswitch.toml`, the documented example: it must stay valid, document every key the
//! config schema has with its real default, and `pgswitch check-config` must turn each mistake
//! in a copy of it into one line naming the key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pgswitch::config::Config;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgswitch.toml")
}

fn example_text() -> String {
    std::fs::read_to_string(example_path()).expect("config/pgswitch.toml is readable")
}

/// The smallest valid config: everything else takes its default.
const MINIMAL: &str = r#"
[[users]]
name = "app"
password = "secret"

[[nodes]]
name = "n0"
host = "127.0.0.1"
port = 5432
"#;

/// Tables whose keys have no defaults (they describe this site, not pgswitch).
const SITE_TABLES: &[&str] = &["users", "nodes", "tls"];

fn as_toml(config: &Config) -> toml::Table {
    toml::Table::try_from(config).expect("a config serializes to TOML")
}

/// Every key path in `table`, as `key` or `table.key` (array elements merged).
fn key_paths(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(t) => key_paths(&path, t, out),
            toml::Value::Array(items)
                if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
            {
                for item in items {
                    if let toml::Value::Table(t) = item {
                        key_paths(&path, t, out);
                    }
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

#[test]
fn example_config_is_valid() {
    if let Err(e) = Config::load(&example_path()) {
        panic!("config/pgswitch.toml is rejected: {e}");
    }
}

#[test]
fn example_config_documents_every_key() {
    let text = example_text();
    // The example leaves [tls] commented out (its files do not exist); add it to see its keys.
    let full = Config::parse(&format!(
        "{text}\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n"
    ))
    .unwrap_or_else(|e| panic!("example + [tls] is rejected: {e}"));
    let mut keys = BTreeSet::new();
    key_paths("", &as_toml(&full), &mut keys);
    assert!(keys.len() > 30, "too few keys found: {keys:?}");

    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut undocumented = Vec::new();
    for path in &keys {
        let name = path.rsplit('.').next().unwrap_or(path);
        // PgBouncer style: a "# name" heading line opens the key's comment block, and the key
        // follows, set or (for [tls]) commented out.
        let heading = lines.iter().any(|l| *l == format!("# {name}"));
        let assigned = lines.iter().any(|l| {
            let l = l.trim_start_matches('#').trim_start();
            l.starts_with(&format!("{name} ="))
        });
        if !heading || !assigned {
            undocumented.push(path.as_str());
        }
    }
    assert!(
        undocumented.is_empty(),
        "config/pgswitch.toml does not document these keys (a \"# key\" heading and a \"key = ...\" line): {undocumented:?}"
    );
}

#[test]
fn example_config_shows_the_real_defaults() {
    let example = as_toml(&Config::load(&example_path()).expect("example is valid"));
    let defaults = as_toml(&Config::parse(MINIMAL).expect("minimal config is valid"));
    let mut differing = Vec::new();
    for (key, value) in &defaults {
        if SITE_TABLES.contains(&key.as_str()) {
            continue;
        }
        match (value, example.get(key)) {
            (toml::Value::Table(default_table), Some(toml::Value::Table(example_table))) => {
                for (sub, default_value) in default_table {
                    if example_table.get(sub) != Some(default_value) {
                        differing.push(format!(
                            "{key}.{sub}: default {default_value}, example {:?}",
                            example_table.get(sub)
                        ));
                    }
                }
            }
            (default_value, example_value) if example_value != Some(default_value) => {
                differing.push(format!(
                    "{key}: default {default_value}, example {example_value:?}"
                ));
            }
            _ => {}
        }
    }
    assert!(
        differing.is_empty(),
        "config/pgswitch.toml sets these keys to something other than their default: {differing:?}"
    );
}

fn check_config(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["check-config", "--config"])
        .arg(path)
        .env_remove("PGSWITCH_CONFIG")
        .output()
        .expect("pgswitch runs")
}

#[test]
fn check_config_accepts_the_example_and_masks_passwords() {
    let out = check_config(&example_path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check-config failed: {stderr}");
    assert!(stdout.contains("pool_mode = \"transaction\""), "{stdout}");
    assert!(
        !stdout.contains("\"secret\""),
        "a password is shown: {stdout}"
    );
    assert!(
        !stdout.contains("reporting-secret"),
        "a password is shown: {stdout}"
    );
}

/// A copy of the example with `edit` applied, checked by the binary: it must fail with one line
/// that names `key`.
fn assert_rejected(case: &str, edit: impl FnOnce(String) -> String, key: &str) {
    let original = example_text();
    let broken = edit(original.clone());
    assert_ne!(broken, original, "{case}: the edit changed nothing");
    let path = std::env::temp_dir().join(format!(
        "pgswitch-config-example-{}-{case}.toml",
        std::process::id()
    ));
    std::fs::write(&path, broken).expect("write the broken copy");
    let out = check_config(&path);
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let message = stderr.trim();
    assert!(!out.status.success(), "{case}: check-config accepted it");
    assert!(out.stdout.is_empty(), "{case}: printed a config anyway");
    assert_eq!(
        message.lines().count(),
        1,
        "{case}: not one line: {message}"
    );
    assert!(
        message.contains(key),
        "{case}: {key} not named in: {message}"
    );
}

#[test]
fn check_config_names_the_key_of_each_mistake() {
    let replace = |from: &'static str, to: &'static str| {
        move |text: String| {
            assert!(text.contains(from), "example has no {from:?}");
            text.replacen(from, to, 1)
        }
    };
    assert_rejected(
        "duplicate-node",
        replace("name = \"n1\"", "name = \"n0\""),
        "nodes[1].name",
    );
    assert_rejected(
        "duplicate-user",
        replace("name = \"reporting\"", "name = \"app\""),
        "users[1].name",
    );
    assert_rejected(
        "unknown-key",
        |text| format!("pool_sise = 20\n{text}"),
        "pool_sise",
    );
    assert_rejected(
        "pool-size-0",
        replace("default_pool_size = 20", "default_pool_size = 0"),
        "default_pool_size",
    );
    assert_rejected(
        "user-pool-size-0",
        replace("pool_size = 5", "pool_size = 0"),
        "users[1].pool_size",
    );
    assert_rejected(
        "bad-listen",
        replace("listen = \"127.0.0.1:6432\"", "listen = \"localhost\""),
        "listen",
    );
    // What `run` loads before it listens is checked too.
    assert_rejected(
        "tls-files-missing",
        |text| {
            format!("{text}\n[tls]\ncert = \"/nonexistent/server.crt\"\nkey = \"/nonexistent/server.key\"\n")
        },
        "tls: cannot read certificate /nonexistent/server.crt",
    );
    assert_rejected(
        "etcd-mode",
        replace("mode = \"standalone\"", "mode = \"etcd\""),
        "coordination.mode",
    );
    assert_rejected(
        "missing-password",
        replace("password = \"secret\"\n", ""),
        "users[0].password",
    );
}
