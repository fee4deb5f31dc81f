//! Reading the documents of `weftctl apply`: files, directories and stdin, each holding one or
//! more YAML (or JSON) documents.
//!
//! Everything is parsed and checked before anything is sent, so that a typo in the fifth
//! document does not leave the first four applied. Meshes come first so that one file can
//! hold a mesh and the resources in it.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use weft_api::kind::Kind;

/// Where an input came from, for error messages.
const STDIN: &str = "<stdin>";

/// A document or input file that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// A file or directory could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file, directory or `<stdin>`.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A directory holds no `*.yaml`, `*.yml` or `*.json` file.
    #[error("{0}: no *.yaml, *.yml or *.json files in this directory")]
    EmptyDir(String),
    /// A document is not valid or lacks what apply needs.
    #[error("{file}: document {number}{}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        /// The file it is in.
        file: String,
        /// Its 1-based position in the file.
        number: usize,
        /// The 1-based line of the problem, when the parser knows it.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

/// One parsed document, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The file it came from.
    pub file: String,
    /// Its 1-based position in that file.
    pub number: usize,
    /// Its `type`.
    pub kind: Kind,
    /// Its `name`.
    pub name: String,
    /// Its `mesh` (`default` when absent; for a `Mesh`, its own name).
    pub mesh: String,
    /// The document as JSON, sent as the PUT body.
    pub body: Value,
}

impl Document {
    /// `Dataplane "web-1" (app.yaml, document 2)`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} {:?} ({}, document {})",
            self.kind, self.name, self.file, self.number
        )
    }
}

/// Expands the `-f` arguments into (name, text) pairs: a directory becomes its
/// `*.yaml|*.yml|*.json` files sorted by name, `-` is `stdin`.
pub(crate) fn read_inputs(
    args: &[String],
    stdin: &mut dyn Read,
) -> Result<Vec<(String, String)>, DocError> {
    let mut inputs = Vec::new();
    for arg in args {
        if arg == "-" {
            let mut text = String::new();
            stdin
                .read_to_string(&mut text)
                .map_err(|source| DocError::Read {
                    path: STDIN.into(),
                    source,
                })?;
            inputs.push((STDIN.to_string(), text));
            continue;
        }
        let path = Path::new(arg);
        let files = if path.is_dir() {
            let files = dir_files(path)?;
            if files.is_empty() {
                return Err(DocError::EmptyDir(arg.clone()));
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        for file in files {
            let name = file.display().to_string();
            let text = fs::read_to_string(&file).map_err(|source| DocError::Read {
                path: name.clone(),
                source,
            })?;
            inputs.push((name, text));
        }
    }
    Ok(inputs)
}

/// The `*.yaml|*.yml|*.json` files directly in `dir`, sorted by file name.
pub(crate) fn dir_files(dir: &Path) -> Result<Vec<PathBuf>, DocError> {
    let rerr = |source| DocError::Read {
        path: dir.display().to_string(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(rerr)? {
        let path = entry.map_err(rerr)?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Parses every document of one input. Empty documents (a leading or trailing `---`) are
/// skipped but still counted, so numbers match what an editor shows.
pub(crate) fn parse_documents(file: &str, text: &str) -> Result<Vec<Document>, DocError> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let number = i + 1;
        let invalid = |line, message: String| DocError::Invalid {
            file: file.to_string(),
            number,
            line,
            message,
        };
        let value = Value::deserialize(de)
            .map_err(|e| invalid(e.location().map(|l| l.line()), e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let Value::Object(map) = &value else {
            return Err(invalid(None, "a resource must be a mapping".into()));
        };
        let field = |name: &str| -> Result<Option<String>, DocError> {
            match map.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => {
                    Err(invalid(None, format!("`{name}` must not be empty")))
                }
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(invalid(None, format!("`{name}` must be a string"))),
            }
        };
        let type_name =
            field("type")?.ok_or_else(|| invalid(None, "missing field `type`".into()))?;
        let kind = Kind::from_type_name(&type_name).ok_or_else(|| {
            let known: Vec<&str> = Kind::ALL.iter().map(|k| k.type_name()).collect();
            invalid(
                None,
                format!("unknown type {type_name:?} (known: {})", known.join(", ")),
            )
        })?;
        let name = field("name")?.ok_or_else(|| invalid(None, "missing field `name`".into()))?;
        let mesh = if kind.is_mesh_scoped() {
            field("mesh")?.unwrap_or_else(|| super::DEFAULT_MESH.to_string())
        } else {
            name.clone()
        };
        docs.push(Document {
            file: file.to_string(),
            number,
            kind,
            name,
            mesh,
            body: value,
        });
    }
    Ok(docs)
}

/// Reads and parses every input, meshes first (otherwise in input order).
pub(crate) fn load_all(args: &[String], stdin: &mut dyn Read) -> Result<Vec<Document>, DocError> {
    let mut docs = Vec::new();
    for (file, text) in read_inputs(args, stdin)? {
        docs.extend(parse_documents(&file, &text)?);
    }
    order_meshes_first(&mut docs);
    Ok(docs)
}

/// Stable-sorts `Mesh` documents before all others.
pub(crate) fn order_meshes_first(docs: &mut [Document]) {
    docs.sort_by_key(|d| d.kind.is_mesh_scoped());
}
