//! Every error a client sees from pgswitch itself, each with its SQLSTATE, built in one place.

use bytes::BytesMut;

use crate::backend::ServerError;
use crate::pool::PoolError;
use crate::wire::{self, Severity, WireError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub severity: Severity,
    pub code: String,
    pub message: String,
}

impl ClientError {
    fn new(severity: Severity, code: &str, message: impl Into<String>) -> ClientError {
        ClientError {
            severity,
            code: code.to_string(),
            message: message.into(),
        }
    }

    /// Wrong password or unknown user: PostgreSQL's own text, so users cannot be enumerated.
    pub fn password_failed(user: &str) -> ClientError {
        Self::new(
            Severity::Fatal,
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        )
    }

    pub fn too_many_clients() -> ClientError {
        Self::new(Severity::Fatal, "53300", "sorry, too many clients already")
    }

    pub fn protocol_violation(message: impl Into<String>) -> ClientError {
        Self::new(Severity::Fatal, "08P01", message)
    }

    pub fn from_wire(e: &WireError) -> ClientError {
        Self::protocol_violation(e.to_string())
    }

    pub fn no_user_name() -> ClientError {
        Self::new(
            Severity::Fatal,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
    }

    pub fn unsupported_startup_parameter(name: &str) -> ClientError {
        Self::new(
            Severity::Fatal,
            "08P01",
            format!("unsupported startup parameter: {name}"),
        )
    }

    pub fn replication_not_supported() -> ClientError {
        Self::new(
            Severity::Fatal,
            "08P01",
            "pgswitch does not proxy replication connections; connect to PostgreSQL directly",
        )
    }

    /// The connection to PostgreSQL broke under a running session.
    pub fn server_connection_lost(severity: Severity) -> ClientError {
        Self::new(
            severity,
            "08006",
            "server connection lost: the transaction was aborted",
        )
    }

    /// The server went away right after a transaction that set session parameters, before
    /// pgswitch could read their values back: the client cannot go on with them elsewhere.
    pub fn session_parameters_lost() -> ClientError {
        Self::new(
            Severity::Fatal,
            "08006",
            "server connection lost before pgswitch could read back the session parameters \
             the last transaction set; reconnect and set them again",
        )
    }

    /// The server went away while the client's COMMIT was in flight.
    pub fn commit_outcome_unknown() -> ClientError {
        Self::new(
            Severity::Error,
            "08007",
            "server connection lost while COMMIT was in flight: the transaction may or may not have committed",
        )
    }

    pub fn no_server_while_paused() -> ClientError {
        Self::new(
            Severity::Error,
            "57P03",
            "pgswitch is paused and was not resumed within failover.hold_ms",
        )
    }

    /// `idle_transaction_timeout_ms`: PostgreSQL's words for its own such timeout.
    pub fn idle_in_transaction_timeout() -> ClientError {
        Self::new(
            Severity::Fatal,
            "25P03",
            "terminating connection due to idle-in-transaction timeout",
        )
    }

    /// `client_idle_timeout_ms`: PostgreSQL's words for its `idle_session_timeout`.
    pub fn idle_session_timeout() -> ClientError {
        Self::new(
            Severity::Fatal,
            "57P05",
            "terminating connection due to idle-session timeout",
        )
    }

    pub fn shutting_down() -> ClientError {
        Self::new(Severity::Fatal, "57P01", "pgswitch is shutting down")
    }

    pub fn from_server(e: &ServerError, severity: Severity) -> ClientError {
        match e {
            ServerError::Postgres { code, message, .. } => {
                Self::new(severity, code, message.as_str())
            }
            other => Self::new(severity, other.sqlstate(), other.to_string()),
        }
    }

    pub fn from_pool(e: &PoolError, severity: Severity) -> ClientError {
        match e {
            PoolError::Timeout { .. } => Self::new(severity, "53300", e.to_string()),
            PoolError::NoPrimary(_) => Self::new(
                severity,
                "57P03",
                format!("{e}: the cluster has no writable primary"),
            ),
            PoolError::PrimaryUnreachable { .. } => Self::new(severity, "57P03", e.to_string()),
            PoolError::Server(s) => Self::from_server(s, severity),
        }
    }

    /// The ErrorResponse bytes.
    pub fn encode(&self, buf: &mut BytesMut) {
        wire::error_response(buf, self.severity, &self.code, &self.message);
    }
}
