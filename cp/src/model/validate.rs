//! Shared validation helpers: error collection, names, tags, addresses, durations, and the
//! translation of serde errors into field paths.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::FieldError;

/// Tags that Kuma gives a meaning to, and the values `kuma.io/protocol` may take.
pub(crate) const SERVICE_TAG: &str = "kuma.io/service";
pub(crate) const PROTOCOL_TAG: &str = "kuma.io/protocol";
const PROTOCOLS: [&str; 5] = ["tcp", "http", "http2", "grpc", "kafka"];

/// Collects every problem found in one document.
#[derive(Debug, Default)]
pub(crate) struct Errors(pub(crate) Vec<FieldError>);

impl Errors {
    pub(crate) fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Joins a parent path and a child field (`a` + `b` = `a.b`, `` + `b` = `b`).
pub(crate) fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}.{child}")
    }
}

/// Deserializes `value` into `T`, turning serde's error into a [`FieldError`] whose path is
/// prefixed by `prefix`. The path always names the offending field itself (for a missing
/// field too), so `mtls.backends[0].name: is required`.
pub(crate) fn parse_at<T: DeserializeOwned>(
    value: &serde_json::Value,
    prefix: &str,
) -> Result<T, FieldError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let segments = e.path().to_string();
        let segments = if segments == "." {
            String::new()
        } else {
            segments
        };
        let message = e.inner().to_string();
        let mut path = match (prefix.is_empty(), segments.is_empty()) {
            (true, _) => segments,
            (false, true) => prefix.to_owned(),
            (false, false) if segments.starts_with('[') => format!("{prefix}{segments}"),
            (false, false) => format!("{prefix}.{segments}"),
        };
        // serde_path_to_error's path already ends with an unknown field's name, but stops at
        // the parent of a missing one.
        let message = if let Some((_, rest)) = backticked(&message, "unknown field `") {
            format!("unknown field{rest}")
        } else if let Some((name, _)) = backticked(&message, "missing field `") {
            path = join(&path, &name);
            "is required".to_owned()
        } else {
            message
        };
        FieldError {
            field: path,
            message,
        }
    })
}

/// Splits "`lead`name`rest" into (name, rest).
fn backticked<'a>(message: &'a str, lead: &str) -> Option<(String, &'a str)> {
    let rest = message.strip_prefix(lead)?;
    let end = rest.find('`')?;
    Some((rest[..end].to_owned(), &rest[end + 1..]))
}

/// Checks a resource or mesh name: 1–253 chars of `[a-z0-9._-]`, alphanumeric at both ends.
pub(crate) fn check_name(field: &str, name: &str, errs: &mut Errors) {
    if name.is_empty() || name.len() > 253 {
        errs.add(field, "must be between 1 and 253 characters");
        return;
    }
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !ok_chars || !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        errs.add(
            field,
            "must consist of lower case alphanumerics, '.', '-' or '_', and start and end with an alphanumeric",
        );
    }
}

/// Maps a `weft.io/` tag key to its `kuma.io/` spelling; other keys are returned unchanged.
pub fn normalise_key(key: &str) -> String {
    match key.strip_prefix("weft.io/") {
        Some(rest) => format!("kuma.io/{rest}"),
        None => key.to_owned(),
    }
}

/// Validates a tag map and returns it with normalised keys.
pub(crate) fn check_tags(
    field: &str,
    tags: &BTreeMap<String, String>,
    errs: &mut Errors,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (key, value) in tags {
        let f = format!("{field}[\"{key}\"]");
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            errs.add(&f, "tag key must be non-empty and contain no whitespace");
        }
        if value.is_empty() || value.chars().any(char::is_whitespace) {
            errs.add(&f, "tag value must be non-empty and contain no whitespace");
        }
        let norm = normalise_key(key);
        if norm == PROTOCOL_TAG && !PROTOCOLS.contains(&value.as_str()) {
            errs.add(
                &f,
                format!("protocol must be one of {}", PROTOCOLS.join(", ")),
            );
        }
        if let Some(prev) = out.insert(norm.clone(), value.clone()) {
            if prev != *value {
                errs.add(
                    &f,
                    format!("conflicts with another spelling of {norm} (kuma.io/ and weft.io/ mean the same)"),
                );
            }
        }
    }
    out
}

/// Checks a port number: 1..=65535.
pub(crate) fn check_port(field: &str, port: i64, errs: &mut Errors) {
    if !(1..=65535).contains(&port) {
        errs.add(field, "must be between 1 and 65535");
    }
}

/// Checks an IP address.
pub(crate) fn check_ip(field: &str, addr: &str, errs: &mut Errors) {
    if addr.parse::<IpAddr>().is_err() {
        errs.add(field, format!("'{addr}' is not a valid IP address"));
    }
}

/// Checks an IP address or a DNS hostname (RFC 1123).
pub(crate) fn check_address(field: &str, addr: &str, errs: &mut Errors) {
    if addr.parse::<IpAddr>().is_ok() || is_hostname(addr) {
        return;
    }
    errs.add(
        field,
        format!("'{addr}' is not a valid IP address or hostname"),
    );
}

fn is_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    // An all-numeric dotted name would be a malformed IP, not a hostname.
    if s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return false;
    }
    s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    })
}

/// Parses a Go-style duration (`24h`, `1h30m`, `500ms`, `1.5s`), plus `d`, `w` and `y`
/// (365 days) as Kuma's examples use. Signs are refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.starts_with('-') || s.starts_with('+') {
        return Err(format!("'{s}' must not have a sign"));
    }
    let bad = || format!("'{s}' is not a duration (e.g. 90s, 1h30m, 500ms, 1d)");
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "w" => 7.0 * 86400.0,
            "y" => 365.0 * 86400.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// Checks a duration field that must be strictly positive.
pub(crate) fn check_positive_duration(field: &str, s: &str, errs: &mut Errors) {
    match parse_duration(s) {
        Ok(d) if d.is_zero() => errs.add(field, "must be greater than zero"),
        Ok(_) => {}
        Err(e) => errs.add(field, e),
    }
}

/// Checks that an opaque section is a JSON object.
pub(crate) fn check_object(field: &str, v: &serde_json::Value, errs: &mut Errors) {
    if !v.is_object() {
        errs.add(field, "must be an object");
    }
}
