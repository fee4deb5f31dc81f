//! `weft-dp`'s configuration: `/etc/weft/dp/<name>.toml`, strictly parsed (unknown keys are
//! errors), each key overridable by the flag of the same name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::proxy::quic::Congestion;

#[cfg(test)]
mod tests;

/// Default cap of the reconnect backoff: a dataplane is back in sync within a few seconds of
/// the control plane returning.
pub const DEFAULT_RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(3);
/// Default period of the status report on the discovery stream.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Default of `drain_timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A bad configuration. `weft-dp` exits 64 on any of these, before binding anything.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Malformed TOML, an unknown key, or a value of the wrong type.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A required setting is missing or a value is unacceptable.
    #[error("invalid config: {field}: {message}")]
    Invalid {
        /// The key (and the flag that sets it).
        field: String,
        /// Why.
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The file's shape. Every key is optional in the file; `check` says what must be set somewhere.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `https://HOST:5678` of the control plane's dataplane server.
    pub cp_address: Option<String>,
    /// PEM file of the CA that signed the control plane's serving certificate.
    pub ca_cert_file: Option<PathBuf>,
    /// The Dataplane resource (Kuma universal YAML).
    pub dataplane_file: Option<PathBuf>,
    /// The dataplane token for the first join.
    pub dataplane_token_file: Option<PathBuf>,
    /// Where the key and certificate are kept (0600).
    pub state_dir: Option<PathBuf>,
    /// Admin listener (`/ready`, `/config`, `/metrics`); default 127.0.0.1 on a free port.
    pub admin_address: Option<SocketAddr>,
    /// Values for `{{ var }}` templates in the dataplane file (`[dataplane_vars]`,
    /// `--dataplane-var k=v`). Flags add to (and override single keys of) the file's table.
    pub dataplane_vars: Option<BTreeMap<String, String>>,
    /// Cap of the exponential reconnect backoff, a duration such as `"3s"`.
    pub reconnect_max_backoff: Option<String>,
    /// How often the dataplane reports its status on the discovery stream, e.g. `"10s"`.
    pub status_interval: Option<String>,
    /// How long SIGTERM waits for open connections to finish, e.g. `"10s"`.
    pub drain_timeout: Option<String>,
    /// Threads of the async runtime (default: one per CPU; 1: a single-threaded runtime).
    pub worker_threads: Option<usize>,
    /// Resume TLS sessions between dataplanes (TLS 1.3 tickets; default true). `false` makes
    /// every TLS connection a full handshake.
    pub tls_resumption: Option<bool>,
    /// Congestion controller of the QUIC connections between dataplanes, for what this
    /// dataplane sends: `cubic` (default) or `bbr` (for lossy links).
    pub quic_congestion: Option<String>,
}

/// A checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Control plane URL (https).
    pub cp_address: String,
    /// CA bundle pinning the control plane.
    pub ca_cert_file: PathBuf,
    /// The Dataplane resource file.
    pub dataplane_file: PathBuf,
    /// Token file for the first join.
    pub dataplane_token_file: Option<PathBuf>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Admin listener.
    pub admin_address: SocketAddr,
    /// Values for `{{ var }}` templates in the dataplane file.
    pub dataplane_vars: BTreeMap<String, String>,
    /// Cap of the exponential reconnect backoff.
    pub reconnect_max_backoff: Duration,
    /// Period of the status report.
    pub status_interval: Duration,
    /// How long a drain waits for open connections.
    pub drain_timeout: Duration,
    /// Threads of the async runtime; `None`: one per CPU.
    pub worker_threads: Option<usize>,
    /// Resume TLS sessions between dataplanes.
    pub tls_resumption: bool,
    /// Congestion controller of this dataplane's QUIC connections.
    pub quic_congestion: Congestion,
}

impl FileConfig {
    /// Reads and strictly parses a config file.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            Error::Parse(m) => Error::Parse(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Strictly parses TOML text.
    pub fn parse(text: &str) -> Result<FileConfig> {
        toml::from_str(text).map_err(|e| Error::Parse(e.to_string()))
    }

    /// Fills every key that `over` sets (flags win over the file). `dataplane_vars` are merged
    /// key by key.
    pub fn overlay(mut self, over: FileConfig) -> FileConfig {
        if let Some(vars) = over.dataplane_vars {
            self.dataplane_vars
                .get_or_insert_with(BTreeMap::new)
                .extend(vars);
        }
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            cp_address,
            ca_cert_file,
            dataplane_file,
            dataplane_token_file,
            state_dir,
            admin_address,
            reconnect_max_backoff,
            status_interval,
            drain_timeout,
            worker_threads,
            tls_resumption,
            quic_congestion
        );
        self
    }

    /// Checks that everything required is set and well-formed.
    pub fn check(self) -> Result<Config> {
        let missing = |field: &str| Error::Invalid {
            field: field.to_owned(),
            message: "is required (in the config file or as --".to_owned()
                + &field.replace('_', "-")
                + ")",
        };
        let cp_address = self.cp_address.ok_or_else(|| missing("cp_address"))?;
        if !cp_address.starts_with("https://") {
            return Err(Error::Invalid {
                field: "cp_address".into(),
                message: format!(
                    "{cp_address:?} must be an https:// URL (the dataplane server speaks TLS only)"
                ),
            });
        }
        let ca_cert_file = self.ca_cert_file.ok_or_else(|| Error::Invalid {
            field: "ca_cert_file".into(),
            message: "is required (in the config file or as --ca-cert-file): the dataplane \
                      verifies the control plane's certificate against it"
                .into(),
        })?;
        let reconnect_max_backoff = duration(
            "reconnect_max_backoff",
            self.reconnect_max_backoff.as_deref(),
            DEFAULT_RECONNECT_MAX_BACKOFF,
        )?;
        let status_interval = duration(
            "status_interval",
            self.status_interval.as_deref(),
            DEFAULT_STATUS_INTERVAL,
        )?;
        let drain_timeout = duration(
            "drain_timeout",
            self.drain_timeout.as_deref(),
            DEFAULT_DRAIN_TIMEOUT,
        )?;
        let dataplane_vars = self.dataplane_vars.unwrap_or_default();
        if let Some(k) = dataplane_vars.keys().find(|k| !is_var_name(k)) {
            return Err(Error::Invalid {
                field: "dataplane_vars".into(),
                message: format!(
                    "{k:?} is not a variable name (letters, digits, `_`, `-` and `.` only)"
                ),
            });
        }
        Ok(Config {
            cp_address,
            ca_cert_file,
            dataplane_file: self
                .dataplane_file
                .ok_or_else(|| missing("dataplane_file"))?,
            dataplane_token_file: self.dataplane_token_file,
            state_dir: self.state_dir.ok_or_else(|| missing("state_dir"))?,
            admin_address: self
                .admin_address
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            dataplane_vars,
            reconnect_max_backoff,
            status_interval,
            drain_timeout,
            worker_threads: match self.worker_threads {
                Some(0) => {
                    return Err(Error::Invalid {
                        field: "worker_threads".into(),
                        message: "must be at least 1".into(),
                    });
                }
                n => n,
            },
            tls_resumption: self.tls_resumption.unwrap_or(true),
            quic_congestion: match self.quic_congestion {
                None => Congestion::default(),
                Some(c) => c.parse().map_err(|message| Error::Invalid {
                    field: "quic_congestion".into(),
                    message,
                })?,
            },
        })
    }
}

/// Whether `name` can be used as a `{{ name }}` template variable.
pub fn is_var_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Parses a `--dataplane-var` flag value, `key=value`.
pub fn parse_var(flag: &str) -> Result<(String, String)> {
    let invalid = |message: String| Error::Invalid {
        field: "dataplane_vars".into(),
        message,
    };
    let (k, v) = flag
        .split_once('=')
        .ok_or_else(|| invalid(format!("{flag:?} is not of the form key=value")))?;
    let k = k.trim();
    if !is_var_name(k) {
        return Err(invalid(format!(
            "{k:?} is not a variable name (letters, digits, `_`, `-` and `.` only)"
        )));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn duration(field: &str, value: Option<&str>, default: Duration) -> Result<Duration> {
    let Some(text) = value else {
        return Ok(default);
    };
    let d = humantime::parse_duration(text).map_err(|e| Error::Invalid {
        field: field.to_owned(),
        message: format!("{text:?} is not a duration such as \"3s\" or \"500ms\": {e}"),
    })?;
    if d.is_zero() {
        return Err(Error::Invalid {
            field: field.to_owned(),
            message: "must be greater than zero".into(),
        });
    }
    Ok(d)
}
