//! weftctl's own configuration: the known control planes and which one is current.
//!
//! Stored as TOML (`current = "name"` and `[[control_planes]]` tables). Writes go to a
//! temporary file in the same directory which is then renamed over the old one, so a crash
//! never leaves half a file; the file is created with mode 0600 because addresses of private
//! control planes are nobody else's business.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What can go wrong with the config file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file exists but could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is not weftctl's TOML.
    #[error("parsing config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// The file could not be written.
    #[error("writing config {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The configuration could not be serialized (should not happen).
    #[error("serializing config: {0}")]
    Serialize(#[from] toml::ser::Error),
    /// `add` without `--overwrite` of a name that exists.
    #[error("Control Plane {0:?} already exists (use --overwrite to replace it)")]
    Duplicate(String),
    /// `switch` or `remove` of a name that does not exist.
    #[error("there is no Control Plane {0:?}")]
    NotFound(String),
    /// `add` with an address that is not an http(s) URL.
    #[error("invalid address {address:?}: {reason}")]
    Address {
        /// What was given.
        address: String,
        /// Why it is refused.
        reason: String,
    },
    /// `add` with an empty name.
    #[error("the control plane name must not be empty")]
    EmptyName,
}

/// `Result` with this module's [`Error`].
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// One known control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    /// The name the user gave it.
    pub name: String,
    /// URL of its REST API.
    pub address: String,
}

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    /// Name of the control plane used when `--api-address` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Every known control plane.
    #[serde(default)]
    pub control_planes: Vec<ControlPlane>,
}

/// `<config dir>/weft/weftctl.toml`, when the system has a config dir.
pub(crate) fn default_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("weft").join("weftctl.toml"))
}

impl CtlConfig {
    /// Reads the file; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self> {
        match fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text).map_err(|source| Error::Parse {
                path: path.to_path_buf(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(Error::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses the TOML text of a config file.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Writes the file atomically with mode 0600, creating its directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string(self)?;
        let werr = |source| Error::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(werr)?;
        }
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let _ = fs::remove_file(&tmp);
        let result = (|| {
            let mut opts = fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut file = opts.open(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(werr)
    }

    /// The current control plane, if one is set and known.
    pub fn current_control_plane(&self) -> Option<&ControlPlane> {
        let current = self.current.as_deref()?;
        self.control_planes.iter().find(|cp| cp.name == current)
    }

    /// Adds (or with `overwrite` replaces) a control plane; returns whether it became current,
    /// which the first one does.
    pub fn add(&mut self, name: &str, address: &str, overwrite: bool) -> Result<bool> {
        if name.is_empty() {
            return Err(Error::EmptyName);
        }
        validate_address(address)?;
        let cp = ControlPlane {
            name: name.to_string(),
            address: address.to_string(),
        };
        match self.control_planes.iter_mut().find(|c| c.name == name) {
            Some(_) if !overwrite => return Err(Error::Duplicate(name.to_string())),
            Some(existing) => *existing = cp,
            None => self.control_planes.push(cp),
        }
        if self.current_control_plane().is_none() {
            self.current = Some(name.to_string());
            return Ok(true);
        }
        Ok(false)
    }

    /// Makes a known control plane current.
    pub fn switch(&mut self, name: &str) -> Result<()> {
        if !self.control_planes.iter().any(|c| c.name == name) {
            return Err(Error::NotFound(name.to_string()));
        }
        self.current = Some(name.to_string());
        Ok(())
    }

    /// Forgets a control plane; if it was current, the first remaining one becomes current.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let before = self.control_planes.len();
        self.control_planes.retain(|c| c.name != name);
        if self.control_planes.len() == before {
            return Err(Error::NotFound(name.to_string()));
        }
        if self.current.as_deref() == Some(name) {
            self.current = self.control_planes.first().map(|c| c.name.clone());
        }
        Ok(())
    }
}

/// Accepts absolute `http`/`https` URLs with a host.
pub(crate) fn validate_address(address: &str) -> Result<()> {
    let bad = |reason: &str| Error::Address {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    let url = reqwest::Url::parse(address).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("a host is required"));
    }
    Ok(())
}
