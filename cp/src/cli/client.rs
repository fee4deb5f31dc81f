//! A small blocking client of the REST API (docs/rest-api.md): JSON in, JSON out, errors
//! decoded from the API's `{status, title, details, causes}` body, and every network failure
//! naming the URL it was for.

use std::fmt;
use std::time::Duration;

use reqwest::Method;
use reqwest::Url;
use reqwest::blocking::{self, Response};
use serde::Deserialize;
use serde_json::Value;

/// How long one request may take before weftctl gives up.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The most pages a list is followed for, a guard against a server whose `next` loops.
const MAX_PAGES: usize = 10_000;

/// What can go wrong talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured address is not a URL.
    #[error("invalid API address {address:?}: {reason}")]
    Address {
        /// What was configured.
        address: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
    /// The request did not get an answer.
    #[error("{method} {url} failed: {}", chain(.source))]
    Network {
        /// The method.
        method: Method,
        /// The URL that failed.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The answer was not the JSON the contract promises.
    #[error("{method} {url}: unexpected answer: {message}")]
    BadResponse {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// The API answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// `Result` with this module's [`Error`].
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// One entry of an API error's `causes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Cause {
    /// The path of the offending field, e.g. `networking.inbound[1].port`.
    #[serde(default)]
    pub field: String,
    /// What is wrong with it.
    #[serde(default)]
    pub message: String,
}

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Short title, e.g. `Could not process a resource`.
    pub title: String,
    /// The details line.
    pub details: String,
    /// One entry per invalid field.
    pub causes: Vec<Cause>,
    /// The method and URL that answered.
    pub request: String,
}

#[derive(Deserialize)]
struct RawApiError {
    #[serde(default)]
    title: String,
    #[serde(default)]
    details: String,
    #[serde(default)]
    causes: Vec<Cause>,
}

impl ApiError {
    /// Decodes an error answer; a body that is not the API's JSON becomes the details.
    pub fn from_body(status: u16, request: String, body: &str) -> Self {
        match serde_json::from_str::<RawApiError>(body) {
            Ok(raw) => ApiError {
                status,
                title: raw.title,
                details: raw.details,
                causes: raw.causes,
                request,
            },
            Err(_) => ApiError {
                status,
                title: String::new(),
                details: body.trim().to_string(),
                causes: Vec::new(),
                request,
            },
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let details = [self.details.as_str(), self.title.as_str()]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or("request failed");
        write!(f, "{details} ({} from {})", self.status, self.request)?;
        for c in &self.causes {
            write!(f, "\n  * {}: {}", c.field, c.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

/// `a: b: c` from an error and its sources (reqwest hides "connection refused" in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        src = inner.source();
    }
    s
}

/// A client of one control plane.
#[derive(Debug, Clone)]
pub struct Client {
    base: Url,
    http: blocking::Client,
}

impl Client {
    /// A client of the API at `address`, e.g. `http://127.0.0.1:5681`.
    pub fn new(address: &str) -> Result<Self> {
        let mut base = Url::parse(address).map_err(|e| Error::Address {
            address: address.to_string(),
            reason: e.to_string(),
        })?;
        // So that joining "meshes" keeps a path prefix such as `/api`.
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let http = blocking::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("weftctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::Build)?;
        Ok(Client { base, http })
    }

    /// The absolute URL of an API path such as `/meshes/default?dryRun=true`.
    pub fn url(&self, path: &str) -> String {
        let mut s = self.base.as_str().trim_end_matches('/').to_string();
        s.push_str(path);
        s
    }

    fn send(&self, method: Method, url: String, body: Option<&Value>) -> Result<(u16, Value)> {
        let mut req = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().map_err(|source| Error::Network {
            method: method.clone(),
            url: url.clone(),
            source,
        })?;
        decode(method, url, resp)
    }

    /// `GET path`, the JSON answer.
    pub fn get(&self, path: &str) -> Result<Value> {
        Ok(self.send(Method::GET, self.url(path), None)?.1)
    }

    /// `PUT path` with a JSON body; the status (201 created, 200 updated) and the answer.
    pub fn put(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.send(Method::PUT, self.url(path), Some(body))
    }

    /// `POST path` with a JSON body; the JSON answer.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        Ok(self.send(Method::POST, self.url(path), Some(body))?.1)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<()> {
        self.send(Method::DELETE, self.url(path), None).map(drop)
    }

    /// Every item of a list, following `next` from page to page.
    pub fn list_all(&self, path: &str) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut url = self.url(path);
        for _ in 0..MAX_PAGES {
            let (_, page) = self.send(Method::GET, url.clone(), None)?;
            let (page_items, next) = split_page(&page).map_err(|message| Error::BadResponse {
                method: Method::GET,
                url: url.clone(),
                message,
            })?;
            let empty = page_items.is_empty();
            items.extend(page_items);
            match next {
                Some(next) if !empty => url = self.resolve_next(&url, &next),
                _ => return Ok(items),
            }
        }
        Ok(items)
    }

    /// `next` may be absolute or relative to the API.
    fn resolve_next(&self, current: &str, next: &str) -> String {
        if next.starts_with("http://") || next.starts_with("https://") {
            return next.to_string();
        }
        Url::parse(current)
            .and_then(|u| u.join(next))
            .map_or_else(|_| self.url(next), |u| u.to_string())
    }
}

/// The items and the `next` link of one list page; a bare array is accepted too.
pub(crate) fn split_page(page: &Value) -> Result<(Vec<Value>, Option<String>), String> {
    match page {
        Value::Array(items) => Ok((items.clone(), None)),
        Value::Object(map) => {
            let items = match map.get("items") {
                Some(Value::Array(items)) => items.clone(),
                Some(Value::Null) | None => Vec::new(),
                Some(_) => return Err("`items` is not an array".into()),
            };
            let next = map
                .get("next")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string);
            Ok((items, next))
        }
        _ => Err("a list must be a JSON object with `items`".into()),
    }
}

fn decode(method: Method, url: String, resp: Response) -> Result<(u16, Value)> {
    let status = resp.status();
    let text = resp.text().map_err(|source| Error::Network {
        method: method.clone(),
        url: url.clone(),
        source,
    })?;
    if !status.is_success() {
        return Err(ApiError::from_body(status.as_u16(), format!("{method} {url}"), &text).into());
    }
    if text.trim().is_empty() {
        return Ok((status.as_u16(), Value::Object(Default::default())));
    }
    let value = serde_json::from_str(&text).map_err(|e| Error::BadResponse {
        method,
        url,
        message: format!("body is not JSON: {e}"),
    })?;
    Ok((status.as_u16(), value))
}
