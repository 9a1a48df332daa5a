//! The configuration file: schema, defaults and validation.
//!
//! Every key is documented in `config/pgswitch.toml`. Validation turns every mistake into one
//! line that names the key, so `pgswitch check-config` can be used in CI pipelines.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{AuthMethod, Secret};

/// A configuration error: one line, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Session,
    Transaction,
}

/// How pgswitch uses TLS towards PostgreSQL servers (libpq's sslmode, without verification modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerTlsMode {
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "defaults::listen")]
    pub listen: String,
    #[serde(default = "defaults::admin_listen")]
    pub admin_listen: String,
    #[serde(default = "defaults::pool_mode")]
    pub pool_mode: PoolMode,
    #[serde(default = "defaults::default_pool_size")]
    pub default_pool_size: usize,
    #[serde(default = "defaults::max_client_connections")]
    pub max_client_connections: usize,
    /// Client authentication method: scram-sha-256, md5, password, trust.
    #[serde(default = "defaults::auth_type")]
    pub auth_type: String,
    /// How long a client may wait for a server connection before `53300`/`08P01`... see docs.
    #[serde(default = "defaults::pool_timeout_ms")]
    pub pool_timeout_ms: u64,
    /// Idle server connections are closed after this long.
    #[serde(default = "defaults::server_idle_timeout_ms")]
    pub server_idle_timeout_ms: u64,
    /// Time to open and log in a server connection.
    #[serde(default = "defaults::server_connect_timeout_ms")]
    pub server_connect_timeout_ms: u64,
    /// Time a client has to finish TLS, startup and authentication.
    #[serde(default = "defaults::client_login_timeout_ms")]
    pub client_login_timeout_ms: u64,
    /// Largest protocol message accepted from a client.
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
    /// On SIGTERM/SIGINT, how long running sessions may take to finish.
    #[serde(default = "defaults::shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    #[serde(default = "defaults::server_tls")]
    pub server_tls: ServerTlsMode,
    /// Query run on a server connection before it goes back to the pool (session mode).
    #[serde(default = "defaults::server_reset_query")]
    pub server_reset_query: String,
    /// Server connections each pool keeps open even when idle (once the pool exists).
    #[serde(default)]
    pub min_pool_size: usize,
    /// A server connection is closed after this long (±10 % jitter, so they do not all
    /// reconnect at once), when it is next returned to its pool.
    #[serde(default = "defaults::server_lifetime_ms")]
    pub server_lifetime_ms: u64,
    /// New server connections each pool may open per second, so a burst of clients never
    /// becomes a connection storm on PostgreSQL; 0 = no limit.
    #[serde(default = "defaults::server_connect_rate")]
    pub server_connect_rate: u32,
    /// A client idle inside a transaction (its server holding the transaction open, nothing
    /// sent since the last answer) for this long is closed with FATAL 25P03, and its
    /// transaction rolled back; 0 = never (PgBouncer's `idle_transaction_timeout`).
    #[serde(default)]
    pub idle_transaction_timeout_ms: u64,
    /// A client idle outside a transaction for this long is closed with FATAL 57P05; 0 =
    /// never (PgBouncer's `client_idle_timeout`).
    #[serde(default)]
    pub client_idle_timeout_ms: u64,
    /// Threads that run the proxy; 0 = one per CPU core.
    #[serde(default)]
    pub workers: usize,
    /// Transaction mode: prepared statements kept per server connection (least recently used
    /// are closed beyond this).
    #[serde(default = "defaults::prepared_statement_cache_size")]
    pub prepared_statement_cache_size: usize,
    /// Transaction mode: session parameters, beyond the built-in list, whose value each client
    /// keeps across server connections (followed from the server's ParameterStatus when it
    /// reports them, otherwise read back after a transaction that sets them).
    #[serde(default)]
    pub track_extra_params: Vec<String>,
    /// Bearer token required by the admin API's changing endpoints (POST); empty = none.
    #[serde(default)]
    pub admin_token: String,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub diagnosis: DiagnosisConfig,
    #[serde(default)]
    pub failover: FailoverConfig,
    #[serde(default)]
    pub coordination: CoordinationConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain text, an md5 hash, or a SCRAM-SHA-256 verifier (client auth only).
    pub password: Option<String>,
    /// Password pgswitch uses to log in to PostgreSQL; defaults to `password` when that is plain.
    #[serde(default)]
    pub server_password: Option<String>,
    /// Overrides the global `default_pool_size` for this user's pools.
    #[serde(default)]
    pub pool_size: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Data directory of this node, passed to `failover.rejoin_command` as `{old_data_dir}` or
    /// `{new_data_dir}`.
    #[serde(default)]
    pub data_dir: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default = "defaults::control_user")]
    pub user: String,
    #[serde(default)]
    pub password: String,
    #[serde(default = "defaults::control_database")]
    pub database: String,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            user: defaults::control_user(),
            password: String::new(),
            database: defaults::control_database(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiagnosisConfig {
    #[serde(default = "defaults::interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "defaults::failures")]
    pub failures: u32,
}

impl Default for DiagnosisConfig {
    fn default() -> Self {
        DiagnosisConfig {
            interval_ms: defaults::interval_ms(),
            timeout_ms: defaults::timeout_ms(),
            failures: defaults::failures(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    #[serde(default = "defaults::max_lag_bytes")]
    pub max_lag_bytes: u64,
    #[serde(default)]
    pub require_sync: bool,
    #[serde(default = "defaults::hold_ms")]
    pub hold_ms: u64,
    #[serde(default)]
    pub rejoin_command: String,
    /// After a failover, no automatic failover for this long (no flapping).
    #[serde(default = "defaults::min_interval_ms")]
    pub min_interval_ms: u64,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            enabled: true,
            max_lag_bytes: defaults::max_lag_bytes(),
            require_sync: false,
            hold_ms: defaults::hold_ms(),
            rejoin_command: String::new(),
            min_interval_ms: defaults::min_interval_ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoordinationMode {
    Standalone,
    Etcd,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationConfig {
    #[serde(default = "defaults::coordination_mode")]
    pub mode: CoordinationMode,
    #[serde(default = "defaults::state_file")]
    pub state_file: PathBuf,
    #[serde(default = "defaults::etcd_endpoints")]
    pub etcd_endpoints: Vec<String>,
    #[serde(default = "defaults::cluster_name")]
    pub cluster_name: String,
    #[serde(default = "defaults::lease_ttl_ms")]
    pub lease_ttl_ms: u64,
}

impl Default for CoordinationConfig {
    fn default() -> Self {
        CoordinationConfig {
            mode: defaults::coordination_mode(),
            state_file: defaults::state_file(),
            etcd_endpoints: defaults::etcd_endpoints(),
            cluster_name: defaults::cluster_name(),
            lease_ttl_ms: defaults::lease_ttl_ms(),
        }
    }
}

mod defaults {
    use super::{CoordinationMode, PoolMode, ServerTlsMode};
    use std::path::PathBuf;

    pub fn listen() -> String {
        "127.0.0.1:6432".into()
    }
    pub fn admin_listen() -> String {
        "127.0.0.1:9930".into()
    }
    pub fn pool_mode() -> PoolMode {
        PoolMode::Transaction
    }
    pub fn default_pool_size() -> usize {
        20
    }
    pub fn max_client_connections() -> usize {
        10_000
    }
    pub fn auth_type() -> String {
        "scram-sha-256".into()
    }
    pub fn pool_timeout_ms() -> u64 {
        30_000
    }
    pub fn server_idle_timeout_ms() -> u64 {
        600_000
    }
    pub fn server_connect_timeout_ms() -> u64 {
        5_000
    }
    pub fn client_login_timeout_ms() -> u64 {
        15_000
    }
    pub fn max_message_bytes() -> usize {
        // PostgreSQL's own limit for a single protocol message (MaxAllocSize).
        0x3fff_ffff
    }
    pub fn shutdown_timeout_ms() -> u64 {
        10_000
    }
    pub fn server_tls() -> ServerTlsMode {
        ServerTlsMode::Disable
    }
    pub fn server_lifetime_ms() -> u64 {
        3_600_000
    }
    pub fn server_connect_rate() -> u32 {
        100
    }
    pub fn prepared_statement_cache_size() -> usize {
        256
    }
    pub fn server_reset_query() -> String {
        "DISCARD ALL".into()
    }
    pub fn control_user() -> String {
        "postgres".into()
    }
    pub fn control_database() -> String {
        "postgres".into()
    }
    pub fn interval_ms() -> u64 {
        1000
    }
    pub fn timeout_ms() -> u64 {
        1000
    }
    pub fn failures() -> u32 {
        3
    }
    pub fn yes() -> bool {
        true
    }
    pub fn max_lag_bytes() -> u64 {
        1_048_576
    }
    pub fn hold_ms() -> u64 {
        30_000
    }
    pub fn min_interval_ms() -> u64 {
        60_000
    }
    pub fn coordination_mode() -> CoordinationMode {
        CoordinationMode::Standalone
    }
    pub fn state_file() -> PathBuf {
        PathBuf::from("pgswitch.state")
    }
    pub fn etcd_endpoints() -> Vec<String> {
        vec!["http://127.0.0.1:2379".into()]
    }
    pub fn cluster_name() -> String {
        "main".into()
    }
    pub fn lease_ttl_ms() -> u64 {
        5000
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(one_line(text, &e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("listen", &self.listen)?;
        parse_addr("admin_listen", &self.admin_listen)?;
        if self.default_pool_size == 0 {
            return Err(invalid("default_pool_size", "must be at least 1"));
        }
        if self.max_client_connections == 0 {
            return Err(invalid("max_client_connections", "must be at least 1"));
        }
        let method = self
            .auth_type
            .parse::<AuthMethod>()
            .map_err(|e| invalid("auth_type", e.to_string()))?;
        if self.min_pool_size > self.default_pool_size {
            return Err(invalid(
                "min_pool_size",
                format!(
                    "must not exceed default_pool_size ({})",
                    self.default_pool_size
                ),
            ));
        }
        if self.server_lifetime_ms == 0 {
            return Err(invalid("server_lifetime_ms", "must be greater than 0"));
        }
        if self.prepared_statement_cache_size == 0 {
            return Err(invalid(
                "prepared_statement_cache_size",
                "must be at least 1",
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(invalid("max_message_bytes", "must be at least 1024"));
        }
        for (key, value) in [
            ("pool_timeout_ms", self.pool_timeout_ms),
            ("server_connect_timeout_ms", self.server_connect_timeout_ms),
            ("client_login_timeout_ms", self.client_login_timeout_ms),
            ("diagnosis.interval_ms", self.diagnosis.interval_ms),
            ("diagnosis.timeout_ms", self.diagnosis.timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.diagnosis.failures == 0 {
            return Err(invalid("diagnosis.failures", "must be at least 1"));
        }
        if let Some(tls) = &self.tls {
            if tls.cert.as_os_str().is_empty() {
                return Err(invalid("tls.cert", "must name a PEM certificate file"));
            }
            if tls.key.as_os_str().is_empty() {
                return Err(invalid("tls.key", "must name a PEM private key file"));
            }
        }
        if self.users.is_empty() {
            return Err(invalid("users", "at least one [[users]] entry is required"));
        }
        let mut names = HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            let key = format!("users[{i}]");
            if user.name.is_empty() {
                return Err(invalid(format!("{key}.name"), "must not be empty"));
            }
            if !names.insert(user.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("duplicate user name \"{}\"", user.name),
                ));
            }
            if user.pool_size == Some(0) {
                return Err(invalid(format!("{key}.pool_size"), "must be at least 1"));
            }
            match &user.password {
                None if method != AuthMethod::Trust => {
                    return Err(invalid(
                        format!("{key}.password"),
                        format!(
                            "missing for user \"{}\" (required unless auth_type = \"trust\")",
                            user.name
                        ),
                    ));
                }
                Some(p) => {
                    let secret = Secret::parse(&user.name, p)
                        .map_err(|e| invalid(format!("{key}.password"), e.to_string()))?;
                    match (&secret, method) {
                        (Secret::Scram(_), AuthMethod::Md5) => {
                            return Err(invalid(
                                format!("{key}.password"),
                                "a SCRAM verifier cannot answer md5 authentication: give the plain password or an md5 hash",
                            ))
                        }
                        (Secret::Md5Hash(_), AuthMethod::ScramSha256) => {
                            return Err(invalid(
                                format!("{key}.password"),
                                "an md5 hash cannot answer SCRAM authentication: give the plain password or a SCRAM verifier",
                            ))
                        }
                        _ => {}
                    }
                }
                None => {}
            }
        }
        if self.nodes.is_empty() {
            return Err(invalid("nodes", "at least one [[nodes]] entry is required"));
        }
        let mut node_names = HashSet::new();
        let mut endpoints = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let key = format!("nodes[{i}]");
            if node.name.is_empty() {
                return Err(invalid(format!("{key}.name"), "must not be empty"));
            }
            if !node_names.insert(node.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("duplicate node name \"{}\"", node.name),
                ));
            }
            if node.host.is_empty() {
                return Err(invalid(format!("{key}.host"), "must not be empty"));
            }
            if node.port == 0 {
                return Err(invalid(
                    format!("{key}.port"),
                    "must be between 1 and 65535",
                ));
            }
            // Hosts compare as paths (host names hold no '/'): a socket directory written
            // with a trailing slash or a doubled one is still the same directory.
            if !endpoints.insert((std::path::Path::new(&node.host), node.port)) {
                return Err(invalid(
                    format!("{key}.port"),
                    format!(
                        "{}:{} is already used by another node",
                        node.host, node.port
                    ),
                ));
            }
        }
        if self.coordination.mode == CoordinationMode::Etcd {
            if self.coordination.etcd_endpoints.is_empty() {
                return Err(invalid(
                    "coordination.etcd_endpoints",
                    "at least one endpoint is required in etcd mode",
                ));
            }
            if self.coordination.lease_ttl_ms < 1000 {
                return Err(invalid(
                    "coordination.lease_ttl_ms",
                    "must be at least 1000",
                ));
            }
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("listen", &self.listen)
    }

    pub fn admin_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("admin_listen", &self.admin_listen)
    }

    pub fn auth_method(&self) -> AuthMethod {
        self.auth_type.parse().unwrap_or(AuthMethod::ScramSha256)
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn pool_size_for(&self, user: &str) -> usize {
        self.user(user)
            .and_then(|u| u.pool_size)
            .unwrap_or(self.default_pool_size)
    }

    pub fn hold(&self) -> Duration {
        Duration::from_millis(self.failover.hold_ms)
    }

    pub fn pool_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_timeout_ms)
    }

    pub fn server_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.server_connect_timeout_ms)
    }

    pub fn server_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.server_idle_timeout_ms)
    }

    pub fn client_login_timeout(&self) -> Duration {
        Duration::from_millis(self.client_login_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// The effective configuration as TOML, with passwords masked.
    pub fn to_effective_toml(&self) -> String {
        let mut shown = self.clone();
        for user in &mut shown.users {
            if user.password.is_some() {
                user.password = Some("********".into());
            }
            if user.server_password.is_some() {
                user.server_password = Some("********".into());
            }
        }
        if !shown.admin_token.is_empty() {
            shown.admin_token = "********".into();
        }
        if !shown.control.password.is_empty() {
            shown.control.password = "********".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

impl UserConfig {
    /// The password pgswitch sends to PostgreSQL for this user, if it has one.
    pub fn server_login_password(&self) -> Option<&str> {
        if let Some(p) = &self.server_password {
            return Some(p);
        }
        match self.password.as_deref() {
            Some(p) if matches!(Secret::parse(&self.name, p), Ok(Secret::Plain(_))) => Some(p),
            _ => None,
        }
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("\"{value}\" is not an address of the form IP:PORT (e.g. 127.0.0.1:6432)"),
        )
    })
}

/// toml's errors span several lines with a source excerpt; make one line that names the key
/// (with its table, e.g. `failover.hold_ms`) and the line number.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return format!("invalid config: {message}");
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    // The table the line belongs to: the last `[table]` / `[[table]]` header above it.
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}: {message} (line {line_no})"),
        (None, Some(k)) => format!("{k}: {message} (line {line_no})"),
        _ => format!("invalid config (line {line_no}): {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[users]]
name = "app"
password = "secret"

[[nodes]]
name = "n0"
host = "127.0.0.1"
port = 5432
"#;

    fn err(text: &str) -> String {
        Config::parse(text)
            .expect_err("config must be rejected")
            .to_string()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:6432");
        assert_eq!(c.pool_mode, PoolMode::Transaction);
        assert_eq!(c.default_pool_size, 20);
        assert_eq!(c.diagnosis.failures, 3);
        assert_eq!(c.failover.hold_ms, 30_000);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("bogus_key = 1\n{MINIMAL}"));
        assert!(e.contains("bogus_key"), "{e}");
    }

    #[test]
    fn bad_enum_value_names_its_key() {
        let e = err(&format!("pool_mode = \"statement\"\n{MINIMAL}"));
        assert!(e.starts_with("pool_mode:"), "{e}");
        let e = err(&format!("{MINIMAL}\n[failover]\nhold_ms = \"soon\"\n"));
        assert!(e.starts_with("failover.hold_ms:"), "{e}");
    }

    #[test]
    fn bad_listen_address_is_named() {
        let e = err(&format!("listen = \"localhost\"\n{MINIMAL}"));
        assert!(e.starts_with("listen:"), "{e}");
    }

    #[test]
    fn duplicate_node_is_named() {
        let e = err(&format!(
            "{MINIMAL}\n[[nodes]]\nname = \"n0\"\nhost = \"127.0.0.1\"\nport = 5433\n"
        ));
        assert!(
            e.contains("nodes[1].name") && e.contains("duplicate"),
            "{e}"
        );
    }

    #[test]
    fn one_socket_directory_written_two_ways_is_one_endpoint() {
        let text = format!(
            "{MINIMAL}\n[[nodes]]\nname = \"a\"\nhost = \"/run/pg\"\nport = 5432\n\
             [[nodes]]\nname = \"b\"\nhost = \"/run/pg/\"\nport = 5432\n"
        );
        let e = err(&text);
        assert!(
            e.contains("nodes[2].port") && e.contains("already used"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_user_is_named() {
        let e = err(&format!(
            "{MINIMAL}\n[[users]]\nname = \"app\"\npassword = \"x\"\n"
        ));
        assert!(
            e.contains("users[1].name") && e.contains("duplicate"),
            "{e}"
        );
    }

    #[test]
    fn missing_password_is_named() {
        let e = err("[[users]]\nname = \"app\"\n[[nodes]]\nname=\"n0\"\nhost=\"h\"\nport=1\n");
        assert!(e.contains("users[0].password"), "{e}");
    }

    #[test]
    fn zero_pool_size_is_rejected() {
        let e = err(&format!("default_pool_size = 0\n{MINIMAL}"));
        assert!(e.starts_with("default_pool_size:"), "{e}");
    }

    #[test]
    fn masked_passwords_in_effective_config() {
        let c = Config::parse(MINIMAL).expect("valid");
        let shown = c.to_effective_toml();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("********"));
    }
}
