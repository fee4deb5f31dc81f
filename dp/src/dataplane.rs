//! The Dataplane resource file (Kuma universal YAML) as the dataplane itself needs it.
//!
//! `{{ var }}` templates are substituted from `--dataplane-var` first (as Kuma does), then
//! only what the dataplane needs is extracted: its name and mesh (to certify and say hello),
//! the services of its inbounds (its SPIFFE ids) and where each inbound's local service
//! listens (for health probes). The control plane validates the whole resource; the
//! substituted text is what the dataplane sends it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

#[cfg(test)]
mod tests;

/// The tag naming an inbound's service.
pub const SERVICE_TAG: &str = "kuma.io/service";
/// weft's spelling of [`SERVICE_TAG`], accepted as a synonym.
pub const WEFT_SERVICE_TAG: &str = "weft.io/service";
/// The mesh of a Dataplane that names none.
pub const DEFAULT_MESH: &str = "default";

/// A dataplane file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read dataplane file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A template names a variable that no `--dataplane-var` defines.
    #[error("line {line}: undefined variable {name:?} (set it with --dataplane-var {name}=VALUE)")]
    UndefinedVar {
        /// The variable.
        name: String,
        /// 1-based line of the template.
        line: usize,
    },
    /// A `{{` without its `}}`, or a template that is not a variable name.
    #[error("line {line}: malformed template: {message}")]
    Template {
        /// 1-based line of the template.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The text is not YAML.
    #[error("not valid YAML: {0}")]
    Yaml(String),
    /// Any of the above, found in a file.
    #[error("dataplane file {path}: {source}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<Error>,
    },
    /// A field the dataplane needs is missing or wrong.
    #[error("{field}: {message}")]
    Field {
        /// Path of the field, e.g. `networking.inbound[0].port`.
        field: String,
        /// Why.
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the dataplane knows about itself from its Dataplane file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataplane {
    /// The Dataplane resource's name.
    pub name: String,
    /// Its mesh (trust domain).
    pub mesh: String,
    /// `networking.address`: where inbounds listen unless they name their own address.
    pub address: String,
    /// Its inbounds, in file order.
    pub inbounds: Vec<InboundSpec>,
    /// The file's text after template substitution: sent to the CP.
    pub yaml: String,
}

/// One inbound as the file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSpec {
    /// The port the dataplane listens on.
    pub port: u16,
    /// The address the dataplane listens on, when the inbound names one.
    pub address: Option<String>,
    /// Where the local service listens (default 127.0.0.1).
    pub service_address: String,
    /// The local service's port (default `port`).
    pub service_port: u16,
    /// The `kuma.io/service` tag.
    pub service: String,
}

impl Dataplane {
    /// Reads `path`, substitutes `vars` and extracts the dataplane's view of it.
    pub fn load(path: &Path, vars: &BTreeMap<String, String>) -> Result<Dataplane> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_template(&text, vars).map_err(|e| Error::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// Substitutes `vars` into `text` and parses the result.
    pub fn from_template(text: &str, vars: &BTreeMap<String, String>) -> Result<Dataplane> {
        Self::parse(substitute(text, vars)?)
    }

    /// Parses substituted YAML (or JSON) text.
    pub fn parse(yaml: String) -> Result<Dataplane> {
        let doc: Value = serde_yaml_ng::from_str(&yaml).map_err(|e| Error::Yaml(e.to_string()))?;
        let field = |field: &str, message: &str| Error::Field {
            field: field.to_owned(),
            message: message.to_owned(),
        };
        if !doc.is_object() {
            return Err(field("(document)", "must be a mapping"));
        }
        match doc.get("type") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "Dataplane" => {}
            Some(other) => return Err(field("type", &format!("must be Dataplane, not {other}"))),
        }
        let name = match doc.get("name") {
            Some(Value::String(n)) if !n.trim().is_empty() => n.clone(),
            _ => return Err(field("name", "is required (a non-empty string)")),
        };
        let mesh = match doc.get("mesh") {
            None | Some(Value::Null) => DEFAULT_MESH.to_owned(),
            Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
            Some(_) => return Err(field("mesh", "must be a non-empty string")),
        };
        let inbounds = match doc.pointer("/networking/inbound") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, v)| inbound(&format!("networking.inbound[{i}]"), v))
                .collect::<Result<_>>()?,
            Some(_) => return Err(field("networking.inbound", "must be a list")),
        };
        let address = match doc.pointer("/networking/address") {
            Some(Value::String(a)) if !a.trim().is_empty() => a.clone(),
            _ => return Err(field("networking.address", "is required (an IP address)")),
        };
        Ok(Dataplane {
            name,
            mesh,
            address,
            inbounds,
            yaml,
        })
    }

    /// The distinct services of the inbounds, sorted.
    pub fn services(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.inbounds.iter().map(|i| i.service.as_str()).collect();
        set.into_iter().map(str::to_owned).collect()
    }

    /// The SPIFFE ids the dataplane's certificate must carry, `spiffe://<mesh>/<service>`,
    /// sorted.
    pub fn spiffe_ids(&self) -> Vec<String> {
        self.services()
            .iter()
            .map(|s| format!("spiffe://{}/{s}", self.mesh))
            .collect()
    }
}

fn inbound(base: &str, v: &Value) -> Result<InboundSpec> {
    let err = |f: &str, message: String| Error::Field {
        field: format!("{base}.{f}"),
        message,
    };
    let port_of = |f: &str, v: &Value| -> Result<u16> {
        v.as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| err(f, format!("{v} is not a port (1-65535)")))
    };
    let string_of = |f: &str| -> Result<Option<String>> {
        match v.get(f) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(err(f, format!("{other} is not a string"))),
        }
    };
    let port = port_of(
        "port",
        v.get("port")
            .ok_or_else(|| err("port", "is required".into()))?,
    )?;
    let service_port = match v.get("servicePort") {
        None | Some(Value::Null) => port,
        Some(p) => port_of("servicePort", p)?,
    };
    let tags = v.get("tags").and_then(Value::as_object);
    let service = tags
        .and_then(|t| t.get(SERVICE_TAG).or_else(|| t.get(WEFT_SERVICE_TAG)))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err("tags", format!("must contain {SERVICE_TAG:?}")))?;
    Ok(InboundSpec {
        port,
        address: string_of("address")?,
        service_address: string_of("serviceAddress")?.unwrap_or_else(|| "127.0.0.1".into()),
        service_port,
        service: service.to_owned(),
    })
}

/// Replaces every `{{ name }}` (or `{{name}}`) in `text` with `vars[name]`.
///
/// An undefined variable is an error naming it and its line: a half-substituted Dataplane
/// would register something nobody meant.
pub fn substitute(text: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut consumed = 0usize;
    while let Some(start) = rest.find("{{") {
        let line = 1 + text[..consumed + start].matches('\n').count();
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| Error::Template {
            line,
            message: "`{{` without a closing `}}`".into(),
        })?;
        let name = after[..end].trim();
        if !crate::config::is_var_name(name) {
            return Err(Error::Template {
                line,
                message: format!("{:?} is not a variable name", &after[..end]),
            });
        }
        let value = vars.get(name).ok_or_else(|| Error::UndefinedVar {
            name: name.to_owned(),
            line,
        })?;
        out.push_str(value);
        let skip = start + 2 + end + 2;
        consumed += skip;
        rest = &rest[skip..];
    }
    out.push_str(rest);
    Ok(out)
}
