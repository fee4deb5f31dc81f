//! The `Mesh` resource: a trust domain, its mTLS backends and its dataplane constraints.
//!
//! Fields are kept as written (durations as strings, optional sections as `Option`) so that
//! a parsed resource serialises back to exactly what was accepted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::validate::{Errors, check_object, check_positive_duration, check_tags, parse_at};

/// The flat fields of a `Mesh`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSpec {
    /// mTLS settings; without them traffic in the mesh is plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Which dataplanes may join the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Constraints>,
    /// Kuma's logging backends (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<serde_json::Value>,
    /// Kuma's metrics backends (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
    /// Kuma's tracing backends (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<serde_json::Value>,
    /// Kuma's mesh networking settings (kept as written), plus weft's `transport`
    /// (`tls`, `pooled`, `quic` or `auto`; see [`MeshSpec::transport`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networking: Option<serde_json::Value>,
    /// Kuma's routing settings (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<serde_json::Value>,
    /// Kuma's MeshService settings (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_services: Option<serde_json::Value>,
    /// Default policies Kuma would not create (e.g. `["*"]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_creating_initial_policies: Option<Vec<String>>,
}

/// `mtls`: the enabled CA backend and the list of backends.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mtls {
    /// Name of the backend in use; mTLS is off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_backend: Option<String>,
    /// The CA backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<MtlsBackend>>,
    /// Kuma's `skipValidation` for provided CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_validation: Option<bool>,
}

/// One CA backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MtlsBackend {
    /// Unique backend name.
    pub name: String,
    /// Where the CA comes from.
    #[serde(rename = "type")]
    pub backend_type: BackendType,
    /// Dataplane certificate settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_cert: Option<DpCert>,
    /// Type-specific configuration: see [`MtlsBackend::builtin_conf`] and
    /// [`MtlsBackend::provided_conf`]. Kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<serde_json::Value>,
    /// `STRICT` (default) or `PERMISSIVE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
}

/// CA backend type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendType {
    /// weft generates and keeps the CA.
    Builtin,
    /// The user supplies the CA certificate and key.
    Provided,
}

/// mTLS enforcement mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only mTLS traffic is accepted.
    Strict,
    /// Plaintext is accepted too (migration).
    Permissive,
}

/// How dataplanes of the mesh reach each other (`networking.transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TLS over TCP, one connection per proxied connection.
    #[default]
    Tls,
    /// QUIC: one connection per peer dataplane, a stream per proxied connection.
    Quic,
    /// QUIC, with pooled TLS for peers UDP does not reach.
    Auto,
    /// TLS over TCP, one connection per peer carrying a stream per proxied connection.
    Pooled,
}

/// `dpCert`: dataplane certificate settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DpCert {
    /// How long certificates live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
    /// How long a dataplane waits for a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
}

/// `dpCert.rotation`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rotation {
    /// Certificate lifetime, a duration such as `24h` or `1d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
}

/// `conf` of a builtin backend.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BuiltinConf {
    /// CA certificate parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<CaCert>,
}

/// `conf.caCert` of a builtin backend.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaCert {
    /// RSA key size.
    #[serde(default, rename = "RSAbits", skip_serializing_if = "Option::is_none")]
    pub rsa_bits: Option<i64>,
    /// CA lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
}

/// `conf` of a provided backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProvidedConf {
    /// The CA certificate (PEM).
    pub cert: DataSource,
    /// The CA key (PEM).
    pub key: DataSource,
}

/// Kuma's data source: exactly one of `secret`, `file`, `inline` (base64), `inlineString`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataSource {
    /// Name of a secret in the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Path on the control plane host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Base64 content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// Plain content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline_string: Option<String>,
}

/// `constraints`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Constraints {
    /// Constraints on dataplanes joining the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane_proxy: Option<DataplaneProxyConstraints>,
}

/// `constraints.dataplaneProxy`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataplaneProxyConstraints {
    /// A dataplane must match one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<Vec<TagsRule>>,
    /// A dataplane must match none of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restrictions: Option<Vec<TagsRule>>,
}

/// A tag selector in `constraints` (`*` matches any value).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TagsRule {
    /// Tags to match.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl MtlsBackend {
    /// The effective mode (`STRICT` when unset).
    pub fn effective_mode(&self) -> MtlsMode {
        self.mode.unwrap_or(MtlsMode::Strict)
    }

    /// The builtin configuration, if this is a builtin backend (defaults when `conf` is absent).
    pub fn builtin_conf(&self) -> Option<BuiltinConf> {
        if self.backend_type != BackendType::Builtin {
            return None;
        }
        match &self.conf {
            None => Some(BuiltinConf::default()),
            Some(v) => parse_at(v, "").ok(),
        }
    }

    /// The provided configuration, if this is a provided backend with a valid `conf`.
    pub fn provided_conf(&self) -> Option<ProvidedConf> {
        if self.backend_type != BackendType::Provided {
            return None;
        }
        self.conf.as_ref().and_then(|v| parse_at(v, "").ok())
    }
}

impl MeshSpec {
    /// The enabled mTLS backend, if mTLS is on.
    pub fn enabled_backend(&self) -> Option<&MtlsBackend> {
        let mtls = self.mtls.as_ref()?;
        let name = mtls.enabled_backend.as_deref()?;
        mtls.backends.as_ref()?.iter().find(|b| b.name == name)
    }

    /// `networking.transport` (TLS when unset; a wrong value was refused on apply).
    pub fn transport(&self) -> Transport {
        self.networking
            .as_ref()
            .and_then(|n| n.get("transport"))
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .unwrap_or_default()
    }

    pub(crate) fn validate(&self, errs: &mut Errors) {
        if let Some(t) = self.networking.as_ref().and_then(|n| n.get("transport")) {
            if serde_json::from_value::<Transport>(t.clone()).is_err() {
                errs.add(
                    "networking.transport",
                    format!("must be one of tls, pooled, quic, auto (got {t})"),
                );
            }
        }
        if let Some(mtls) = &self.mtls {
            validate_mtls(mtls, errs);
        }
        if let Some(dpp) = self
            .constraints
            .as_ref()
            .and_then(|c| c.dataplane_proxy.as_ref())
        {
            let base = "constraints.dataplaneProxy";
            for (list, rules) in [
                ("requirements", &dpp.requirements),
                ("restrictions", &dpp.restrictions),
            ] {
                for (i, rule) in rules.iter().flatten().enumerate() {
                    check_tags(&format!("{base}.{list}[{i}].tags"), &rule.tags, errs);
                }
            }
        }
        for (name, v) in [
            ("logging", &self.logging),
            ("metrics", &self.metrics),
            ("tracing", &self.tracing),
            ("networking", &self.networking),
            ("routing", &self.routing),
            ("meshServices", &self.mesh_services),
        ] {
            if let Some(v) = v {
                check_object(name, v, errs);
            }
        }
    }
}

fn validate_mtls(mtls: &Mtls, errs: &mut Errors) {
    let backends = mtls.backends.as_deref().unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    for (i, b) in backends.iter().enumerate() {
        let base = format!("mtls.backends[{i}]");
        if b.name.is_empty() {
            errs.add(format!("{base}.name"), "must not be empty");
        } else if !seen.insert(b.name.as_str()) {
            errs.add(
                format!("{base}.name"),
                format!("backend name '{}' is used more than once", b.name),
            );
        }
        if let Some(dp) = &b.dp_cert {
            if let Some(exp) = dp.rotation.as_ref().and_then(|r| r.expiration.as_ref()) {
                check_positive_duration(&format!("{base}.dpCert.rotation.expiration"), exp, errs);
            }
            if let Some(t) = &dp.request_timeout {
                check_positive_duration(&format!("{base}.dpCert.requestTimeout"), t, errs);
            }
        }
        let conf_path = format!("{base}.conf");
        match (b.backend_type, &b.conf) {
            (BackendType::Builtin, None) => {}
            (BackendType::Builtin, Some(v)) => match parse_at::<BuiltinConf>(v, &conf_path) {
                Err(e) => errs.0.push(e),
                Ok(c) => {
                    if let Some(ca) = c.ca_cert {
                        if let Some(bits) = ca.rsa_bits {
                            if !(2048..=8192).contains(&bits) {
                                errs.add(
                                    format!("{conf_path}.caCert.RSAbits"),
                                    "must be between 2048 and 8192",
                                );
                            }
                        }
                        if let Some(exp) = &ca.expiration {
                            check_positive_duration(
                                &format!("{conf_path}.caCert.expiration"),
                                exp,
                                errs,
                            );
                        }
                    }
                }
            },
            (BackendType::Provided, None) => {
                errs.add(conf_path, "is required for a provided backend");
            }
            (BackendType::Provided, Some(v)) => match parse_at::<ProvidedConf>(v, &conf_path) {
                Err(e) => errs.0.push(e),
                Ok(c) => {
                    check_source(&format!("{conf_path}.cert"), &c.cert, errs);
                    check_source(&format!("{conf_path}.key"), &c.key, errs);
                }
            },
        }
    }
    if let Some(enabled) = &mtls.enabled_backend {
        if !backends.iter().any(|b| &b.name == enabled) {
            errs.add(
                "mtls.enabledBackend",
                format!("'{enabled}' does not name a backend in mtls.backends"),
            );
        }
    }
}

fn check_source(field: &str, s: &DataSource, errs: &mut Errors) {
    let set = [&s.secret, &s.file, &s.inline, &s.inline_string]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set != 1 {
        errs.add(
            field,
            "exactly one of secret, file, inline, inlineString must be set",
        );
    }
}
