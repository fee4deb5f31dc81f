//! `weft-dp`'s configuration: `/etc/weft/dp/<name>.toml`, strictly parsed (unknown keys are
//! errors), each key overridable by the flag of the same name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
}

/// A checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Control plane URL (https).
    pub cp_address: String,
    /// CA bundle pinning the control plane.
    pub ca_cert_file: Option<PathBuf>,
    /// The Dataplane resource file.
    pub dataplane_file: PathBuf,
    /// Token file for the first join.
    pub dataplane_token_file: Option<PathBuf>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Admin listener.
    pub admin_address: SocketAddr,
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

    /// Fills every key that `over` sets (flags win over the file).
    pub fn overlay(mut self, over: FileConfig) -> FileConfig {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            cp_address,
            ca_cert_file,
            dataplane_file,
            dataplane_token_file,
            state_dir,
            admin_address
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
        Ok(Config {
            cp_address,
            ca_cert_file: self.ca_cert_file,
            dataplane_file: self
                .dataplane_file
                .ok_or_else(|| missing("dataplane_file"))?,
            dataplane_token_file: self.dataplane_token_file,
            state_dir: self.state_dir.ok_or_else(|| missing("state_dir"))?,
            admin_address: self
                .admin_address
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_and_flag_overlay() {
        let f = FileConfig::parse(
            "cp_address = \"https://cp:5678\"\ndataplane_file = \"/etc/weft/dp/web.yaml\"\nstate_dir = \"/var/lib/weft/dp/web\"\n",
        )
        .unwrap();
        let c = f
            .overlay(FileConfig {
                state_dir: Some("/tmp/s".into()),
                ..Default::default()
            })
            .check()
            .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/s"));
        assert!(c.admin_address.ip().is_loopback());
        assert_eq!(
            c.admin_address.port(),
            0,
            "a free port by default: dataplanes on one host never clash"
        );
    }

    #[test]
    fn unknown_key_and_missing_values_are_named() {
        let e = FileConfig::parse("cp_adress = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("cp_adress"), "{e}");
        let e = FileConfig::default().check().unwrap_err();
        assert!(e.to_string().contains("cp_address"), "{e}");
        let e = FileConfig {
            cp_address: Some("http://cp:5678".into()),
            ..Default::default()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
    }
}
