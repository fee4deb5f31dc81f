//! `weft-cp`'s TOML configuration: parsed strictly (unknown keys are errors), with `WEFT_CP_…`
//! environment overrides (not `WEFT_…`: `WEFT_API_ADDRESS` is weftctl's), and checked before anything is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What can go wrong loading the configuration. `weft-cp` exits 64 on any of these.
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
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("invalid config{}: {message}", .path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    Parse {
        /// The file, when there is one.
        path: Option<PathBuf>,
        /// The TOML parser's message, with line and column.
        message: String,
    },
    /// A value is well-formed TOML but not acceptable.
    #[error("invalid config: {field}: {message}")]
    Invalid {
        /// The key, e.g. `api.address` or `WEFT_CP_API_ADDRESS`.
        field: String,
        /// Why.
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The control plane's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One control plane for one zone: the only mode implemented so far.
    Standalone,
}

/// Which store backs the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreType {
    /// sled on disk (the default).
    Sled,
    /// In memory: everything is lost on exit. For tests and demos.
    Memory,
}

/// The whole configuration, after defaults and environment overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[general]`.
    pub mode: Mode,
    /// `[store] type`.
    pub store_type: StoreType,
    /// `[store] path`.
    pub store_path: PathBuf,
    /// `[api] address`: REST API and GUI.
    pub api_address: SocketAddr,
    /// `[api] danger_allow_unauthenticated_remote`: serve the API, which has no authentication
    /// yet, on a non-loopback address. Anyone who reaches it controls the mesh.
    pub danger_allow_unauthenticated_remote_api: bool,
    /// `[dp_server] address`: where dataplanes connect.
    pub dp_server_address: SocketAddr,
    /// `[dp_server] tls_cert_file` and `tls_key_file`: the serving certificate chain and key.
    /// When absent, one is generated into `dp_server_tls_dir`.
    pub dp_server_tls_files: Option<(PathBuf, PathBuf)>,
    /// `[dp_server] tls_dir`: where the generated CA (`ca.pem`, pinned by dataplanes) and
    /// serving certificate live. Default: `tls` beside the store path.
    pub dp_server_tls_dir: PathBuf,
    /// `[dp_server] tls_sans`: names and addresses dataplanes use to reach this CP, added to
    /// the generated certificate (localhost, loopback and the host name are always in it).
    pub dp_server_tls_sans: Vec<String>,
    /// `[dp_server] dataplane_cleanup_after`: remove a dataplane offline for longer than this.
    pub dataplane_cleanup_after: Duration,
    /// `[dp_server] store_calls`: store calls (registrations, insight records) the dataplane
    /// server runs at once, each on a thread of the blocking pool. Writes take the store's lock
    /// and flush in turn, so more at once only wait longer for it, while every extra thread
    /// keeps its stack and, with glibc, a malloc arena of its own.
    pub dp_server_store_calls: usize,
    /// `[diagnostics] address`: `/ready` and `/metrics`.
    pub diagnostics_address: SocketAddr,
    /// `[defaults] skip_mesh_creation`.
    pub skip_mesh_creation: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Standalone,
            store_type: StoreType::Sled,
            store_path: PathBuf::from("/var/lib/weft/cp"),
            api_address: SocketAddr::from(([127, 0, 0, 1], 5681)),
            danger_allow_unauthenticated_remote_api: false,
            dp_server_address: SocketAddr::from(([0, 0, 0, 0], 5678)),
            dp_server_tls_files: None,
            dp_server_tls_dir: PathBuf::from("/var/lib/weft/tls"),
            dp_server_tls_sans: Vec::new(),
            dataplane_cleanup_after: Duration::from_secs(72 * 3600),
            dp_server_store_calls: 16,
            diagnostics_address: SocketAddr::from(([127, 0, 0, 1], 5680)),
            skip_mesh_creation: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    general: RawGeneral,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    dp_server: RawDpServer,
    #[serde(default)]
    diagnostics: RawAddress,
    #[serde(default)]
    defaults: RawDefaults,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGeneral {
    mode: Option<Mode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(rename = "type")]
    store_type: Option<StoreType>,
    path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAddress {
    address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDpServer {
    address: Option<String>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    tls_sans: Option<Vec<String>>,
    dataplane_cleanup_after: Option<String>,
    store_calls: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    address: Option<String>,
    danger_allow_unauthenticated_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    skip_mesh_creation: Option<bool>,
}

/// The environment variables that override the file, with the key each one overrides.
pub const ENV_OVERRIDES: [(&str, &str); 9] = [
    ("WEFT_CP_GENERAL_MODE", "general.mode"),
    ("WEFT_CP_STORE_TYPE", "store.type"),
    ("WEFT_CP_STORE_PATH", "store.path"),
    ("WEFT_CP_API_ADDRESS", "api.address"),
    ("WEFT_CP_DP_SERVER_ADDRESS", "dp_server.address"),
    ("WEFT_CP_DP_SERVER_TLS_DIR", "dp_server.tls_dir"),
    ("WEFT_CP_DP_SERVER_STORE_CALLS", "dp_server.store_calls"),
    ("WEFT_CP_DIAGNOSTICS_ADDRESS", "diagnostics.address"),
    (
        "WEFT_CP_DEFAULTS_SKIP_MESH_CREATION",
        "defaults.skip_mesh_creation",
    ),
];

impl Config {
    /// Reads `path` (or only defaults when `None`) and applies the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| Error::Read {
                path: p.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::from_str_with_env(&text, &env).map_err(|e| match e {
            Error::Parse { message, .. } => Error::Parse {
                path: path.map(Path::to_owned),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text and applies the `WEFT_CP_…` variables found in `env`.
    pub fn from_str_with_env(text: &str, env: &[(String, String)]) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| Error::Parse {
            path: None,
            message: e.to_string(),
        })?;
        let mut c = Config::default();
        if let Some(m) = raw.general.mode {
            c.mode = m;
        }
        if let Some(t) = raw.store.store_type {
            c.store_type = t;
        }
        if let Some(p) = raw.store.path {
            c.store_path = p;
        }
        if let Some(a) = raw.api.address {
            c.api_address = parse_addr("api.address", &a)?;
        }
        if let Some(d) = raw.api.danger_allow_unauthenticated_remote {
            c.danger_allow_unauthenticated_remote_api = d;
        }
        if let Some(a) = raw.dp_server.address {
            c.dp_server_address = parse_addr("dp_server.address", &a)?;
        }
        let tls_dir_set = raw.dp_server.tls_dir.is_some();
        if let Some(d) = raw.dp_server.tls_dir {
            c.dp_server_tls_dir = d;
        }
        match (raw.dp_server.tls_cert_file, raw.dp_server.tls_key_file) {
            (Some(cert), Some(key)) => c.dp_server_tls_files = Some((cert, key)),
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(Error::Invalid {
                    field: "dp_server.tls_cert_file".into(),
                    message: "tls_cert_file and tls_key_file must be set together".into(),
                });
            }
        }
        if let Some(sans) = raw.dp_server.tls_sans {
            c.dp_server_tls_sans = sans;
        }
        if let Some(a) = raw.dp_server.dataplane_cleanup_after {
            c.dataplane_cleanup_after =
                crate::model::parse_duration(&a).map_err(|m| Error::Invalid {
                    field: "dp_server.dataplane_cleanup_after".into(),
                    message: m,
                })?;
        }
        if let Some(n) = raw.dp_server.store_calls {
            c.dp_server_store_calls = n;
        }
        if let Some(a) = raw.diagnostics.address {
            c.diagnostics_address = parse_addr("diagnostics.address", &a)?;
        }
        if let Some(s) = raw.defaults.skip_mesh_creation {
            c.skip_mesh_creation = s;
        }
        for (name, value) in env {
            c.apply_env(name, value)?;
        }
        if !tls_dir_set && !env.iter().any(|(k, _)| k == "WEFT_CP_DP_SERVER_TLS_DIR") {
            // Beside the store, so that one data directory holds everything.
            c.dp_server_tls_dir = c
                .store_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .join("tls");
        }
        c.check()?;
        Ok(c)
    }

    fn apply_env(&mut self, name: &str, value: &str) -> Result<()> {
        let invalid = |message: String| Error::Invalid {
            field: name.to_owned(),
            message,
        };
        match name {
            "WEFT_CP_GENERAL_MODE" => {
                self.mode = match value {
                    "standalone" => Mode::Standalone,
                    other => {
                        return Err(invalid(format!(
                            "unknown mode {other:?}, expected \"standalone\""
                        )));
                    }
                }
            }
            "WEFT_CP_STORE_TYPE" => {
                self.store_type = match value {
                    "sled" => StoreType::Sled,
                    "memory" => StoreType::Memory,
                    other => {
                        return Err(invalid(format!(
                            "unknown store type {other:?}, expected \"sled\" or \"memory\""
                        )));
                    }
                }
            }
            "WEFT_CP_STORE_PATH" => self.store_path = PathBuf::from(value),
            "WEFT_CP_DP_SERVER_STORE_CALLS" => {
                self.dp_server_store_calls = value
                    .parse()
                    .map_err(|_| invalid(format!("expected a number, got {value:?}")))?
            }
            "WEFT_CP_API_ADDRESS" => self.api_address = parse_addr(name, value)?,
            "WEFT_CP_DP_SERVER_ADDRESS" => self.dp_server_address = parse_addr(name, value)?,
            "WEFT_CP_DP_SERVER_TLS_DIR" => self.dp_server_tls_dir = PathBuf::from(value),
            "WEFT_CP_DIAGNOSTICS_ADDRESS" => self.diagnostics_address = parse_addr(name, value)?,
            "WEFT_CP_DEFAULTS_SKIP_MESH_CREATION" => {
                self.skip_mesh_creation = match value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    other => return Err(invalid(format!("expected true or false, got {other:?}"))),
                }
            }
            _ if name.starts_with("WEFT_CP_") => {
                return Err(invalid(
                    "unknown WEFT_CP_ variable (a typo would silently change nothing)".to_owned(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        if !self.api_address.ip().is_loopback() && !self.danger_allow_unauthenticated_remote_api {
            return Err(Error::Invalid {
                field: "api.address".into(),
                message: format!(
                    "{} is not a loopback address, and the API has no authentication yet: \
                     bind it to 127.0.0.1, or set api.danger_allow_unauthenticated_remote = true \
                     if you accept that anyone who reaches it controls the mesh",
                    self.api_address
                ),
            });
        }
        if self.dp_server_store_calls == 0 {
            return Err(Error::Invalid {
                field: "dp_server.store_calls".into(),
                message: "must be at least 1".into(),
            });
        }
        if self.store_type == StoreType::Sled && self.store_path.as_os_str().is_empty() {
            return Err(Error::Invalid {
                field: "store.path".into(),
                message: "must not be empty with the sled store".into(),
            });
        }
        Ok(())
    }
}

fn parse_addr(field: &str, s: &str) -> Result<SocketAddr> {
    s.parse().map_err(|_| Error::Invalid {
        field: field.to_owned(),
        message: format!("{s:?} is not an IP:port address"),
    })
}

#[cfg(test)]
mod tests;
