//! `weftctl`: the command-line client of the control plane's REST API, with kumactl's look
//! and feel.
//!
//! Everything but argument parsing's process exit lives here so that it is testable: [`run`]
//! takes the parsed [`Cli`] and the two output streams, and returns a typed [`Error`] that
//! `main` prints as `Error: …` before exiting 1. Usage errors exit 2 through clap.

mod apply;
mod client;
mod config;
mod render;

#[cfg(test)]
mod tests;

use std::io::{self, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use weft_api::kind::Kind;

pub use apply::{DocError, Document};
pub use client::{ApiError, Cause, Client};
pub use config::{ControlPlane, CtlConfig};

/// The control plane used when neither `--api-address` nor a configured one says otherwise.
pub const DEFAULT_API_ADDRESS: &str = "http://127.0.0.1:5681";

/// The mesh used by mesh-scoped commands without `--mesh`.
const DEFAULT_MESH: &str = "default";

/// Everything `weftctl` can fail on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A document given to `apply` could not be read or understood.
    #[error(transparent)]
    Document(#[from] DocError),
    /// weftctl's own configuration could not be read, written or changed.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// The control plane could not be reached, or its answer was not understood.
    #[error(transparent)]
    Client(#[from] client::Error),
    /// Writing to stdout or stderr failed.
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
    /// The arguments are well-formed but do not make sense together.
    #[error("{0}")]
    Usage(String),
}

/// `Result` with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// weftctl: manage a weft (Kuma-compatible) control plane.
#[derive(Debug, Parser)]
#[command(name = "weftctl", version, propagate_version = true)]
pub struct Cli {
    /// URL of the control plane's REST API; overrides the configured control plane
    /// [default: the current control plane of the config file, else http://127.0.0.1:5681]
    #[arg(long, env = "WEFT_API_ADDRESS", global = true, value_name = "URL")]
    pub api_address: Option<String>,
    /// Path of weftctl's config file [default: <config dir>/weft/weftctl.toml]
    #[arg(long, env = "WEFTCTL_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update resources from YAML or JSON files
    Apply(ApplyArgs),
    /// Show resources
    Get(GetArgs),
    /// Delete a resource
    Delete(DeleteArgs),
    /// Show resources with their runtime insight
    Inspect(InspectArgs),
    /// Manage weftctl's configuration
    Config {
        /// What to configure.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Generate dataplane tokens and token signing keys
    Generate {
        /// What to generate.
        #[command(subcommand)]
        command: GenerateCommand,
    },
    /// Revoke a dataplane token
    Revoke {
        /// What to revoke.
        #[command(subcommand)]
        command: RevokeCommand,
    },
    /// Print the version of weftctl and of the control plane
    Version,
}

/// `weftctl generate …`.
#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Print a signed token that lets a dataplane join a mesh as the given services
    DataplaneToken {
        /// Mesh the dataplane joins
        #[arg(short, long, default_value = DEFAULT_MESH)]
        mesh: String,
        /// Bind the token to this dataplane name
        #[arg(long)]
        name: Option<String>,
        /// Allowed tag, KEY=VALUE (repeatable); at least one kuma.io/service is required
        #[arg(long = "tag", value_name = "KEY=VALUE", required = true)]
        tags: Vec<String>,
        /// Lifetime, e.g. 30m, 1h, 7d [default: 1h; at most 1y]
        #[arg(long, value_name = "DURATION")]
        valid_for: Option<String>,
    },
    /// Add a new token signing key to a mesh; new tokens use it, older tokens stay valid
    SigningKey {
        /// Mesh whose tokens the key signs
        #[arg(short, long, default_value = DEFAULT_MESH)]
        mesh: String,
    },
}

/// `weftctl revoke …`.
#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// Revoke a dataplane token, given the token itself or its id
    DataplaneToken {
        /// Mesh of the token
        #[arg(short, long, default_value = DEFAULT_MESH)]
        mesh: String,
        /// The token
        #[arg(required_unless_present = "id", conflicts_with = "id")]
        token: Option<String>,
        /// The token's id (its `jti`), as printed by `generate dataplane-token`
        #[arg(long)]
        id: Option<String>,
    },
}

/// Arguments of `weftctl apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// File, directory (its *.yaml, *.yml and *.json files, by name) or `-` for stdin;
    /// repeatable. Files may hold several YAML documents separated by `---`
    #[arg(short = 'f', long = "file", required = true, value_name = "FILE|DIR|-")]
    pub files: Vec<String>,
    /// Validate on the server without writing anything
    #[arg(long)]
    pub dry_run: bool,
}

/// Arguments of `weftctl get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Kind of resource: meshes, dataplanes or meshtrafficpermissions (singular and type
    /// names work too)
    #[arg(value_parser = parse_kind, value_name = "TYPE")]
    pub kind: Kind,
    /// Show only this resource
    pub name: Option<String>,
    /// Mesh of the resources (ignored for meshes)
    #[arg(short, long, default_value = DEFAULT_MESH)]
    pub mesh: String,
    /// List the resources of every mesh
    #[arg(short = 'A', long, conflicts_with_all = ["name", "mesh"])]
    pub all_meshes: bool,
    /// Output format
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// Arguments of `weftctl delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kind of resource: meshes, dataplanes or meshtrafficpermissions (singular and type
    /// names work too)
    #[arg(value_parser = parse_kind, value_name = "TYPE")]
    pub kind: Kind,
    /// Name of the resource
    pub name: String,
    /// Mesh of the resource (ignored for meshes)
    #[arg(short, long, default_value = DEFAULT_MESH)]
    pub mesh: String,
}

/// Arguments of `weftctl inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// What to inspect
    #[arg(value_enum)]
    pub target: InspectTarget,
    /// Mesh of the dataplanes
    #[arg(short, long, default_value = DEFAULT_MESH)]
    pub mesh: String,
    /// Inspect the dataplanes of every mesh
    #[arg(short = 'A', long, conflicts_with = "mesh")]
    pub all_meshes: bool,
}

/// What `weftctl inspect` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InspectTarget {
    /// Meshes with their mTLS backend and dataplane and policy counts
    #[value(alias = "mesh")]
    Meshes,
    /// Dataplanes with their connection status and certificate expiry
    #[value(alias = "dataplane")]
    Dataplanes,
}

/// Output format of `weftctl get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns
    Table,
    /// YAML
    Yaml,
    /// JSON
    Json,
}

/// `weftctl config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Manage the known control planes
    ControlPlanes {
        /// What to do with them.
        #[command(subcommand)]
        command: ControlPlanesCommand,
    },
}

/// `weftctl config control-planes …`.
#[derive(Debug, Subcommand)]
pub enum ControlPlanesCommand {
    /// Add a control plane (the first one added becomes current)
    Add {
        /// Name of the control plane
        #[arg(long)]
        name: String,
        /// URL of its REST API, e.g. http://127.0.0.1:5681
        #[arg(long)]
        address: String,
        /// Replace a control plane of the same name
        #[arg(long)]
        overwrite: bool,
    },
    /// List the control planes, marking the current one
    List,
    /// Make a control plane current
    Switch {
        /// Name of the control plane
        #[arg(long)]
        name: String,
    },
    /// Forget a control plane
    Remove {
        /// Name of the control plane
        #[arg(long)]
        name: String,
    },
}

/// Parses what a user types for a kind: plural, singular or type name, any case.
pub fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::from_user_input(s).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
        format!("unknown resource type {s:?} (known: {})", known.join(", "))
    })
}

/// Runs one parsed command, writing results to `out` and warnings to `err`.
pub fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let config_path = cli.config.clone().or_else(config::default_path);
    match cli.command {
        Command::Config { command } => {
            let path = config_path.ok_or_else(|| {
                Error::Usage("no config directory on this system: pass --config FILE".into())
            })?;
            config_command(&path, command, out)
        }
        Command::Apply(args) => {
            // Parse everything before the first request: a bad document sends nothing.
            let docs = apply::load_all(&args.files, &mut io::stdin().lock())?;
            let client = client_for(cli.api_address, config_path)?;
            apply_documents(&client, &docs, args.dry_run, out, err)
        }
        Command::Get(args) => {
            let client = client_for(cli.api_address, config_path)?;
            get(&client, &args, out)
        }
        Command::Delete(args) => {
            let client = client_for(cli.api_address, config_path)?;
            let path = resource_path(args.kind, &args.mesh, &args.name);
            client.delete(&path)?;
            writeln!(out, "deleted {} {:?}", args.kind, args.name)?;
            Ok(())
        }
        Command::Inspect(args) => {
            let client = client_for(cli.api_address, config_path)?;
            inspect(&client, &args, out)
        }
        Command::Generate { command } => {
            let client = client_for(cli.api_address, config_path)?;
            generate(&client, command, out, err)
        }
        Command::Revoke { command } => {
            let client = client_for(cli.api_address, config_path)?;
            let RevokeCommand::DataplaneToken { mesh, token, id } = command;
            let answer = client.post(
                "/tokens/dataplane/revocations",
                &serde_json::json!({ "mesh": mesh, "token": token, "id": id }),
            )?;
            let jti = answer.get("revoked").and_then(Value::as_str).unwrap_or("?");
            writeln!(out, "revoked dataplane token {jti} in mesh {mesh:?}")?;
            Ok(())
        }
        Command::Version => {
            writeln!(out, "weftctl: {}", env!("CARGO_PKG_VERSION"))?;
            match client_for(cli.api_address, config_path) {
                Ok(client) => match client.get("/") {
                    Ok(v) => writeln!(out, "server: {}", render::server_version(&v))?,
                    Err(e) => writeln!(out, "server: unreachable ({e})")?,
                },
                Err(e) => writeln!(out, "server: unreachable ({e})")?,
            }
            Ok(())
        }
    }
}

fn generate(
    client: &Client,
    command: GenerateCommand,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    match command {
        GenerateCommand::DataplaneToken {
            mesh,
            name,
            tags,
            valid_for,
        } => {
            let mut by_key: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for t in &tags {
                let (k, v) = t
                    .split_once('=')
                    .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                    .ok_or_else(|| Error::Usage(format!("--tag {t:?}: expected KEY=VALUE")))?;
                by_key.entry(k.to_owned()).or_default().push(v.to_owned());
            }
            let answer = client.post(
                "/tokens/dataplane",
                &serde_json::json!({ "mesh": mesh, "name": name, "tags": by_key, "validFor": valid_for }),
            )?;
            let token = answer
                .get("token")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let id = answer.get("id").and_then(Value::as_str).unwrap_or_default();
            writeln!(out, "{token}")?;
            writeln!(
                err,
                "token id {id}; revoke with: weftctl revoke dataplane-token --mesh {mesh} --id {id}"
            )?;
            Ok(())
        }
        GenerateCommand::SigningKey { mesh } => {
            let answer = client.post(
                &format!("/meshes/{mesh}/signing-keys"),
                &serde_json::json!({}),
            )?;
            let kid = answer
                .get("kid")
                .and_then(Value::as_str)
                .unwrap_or_default();
            writeln!(
                out,
                "created signing key {kid} for mesh {mesh:?}; new tokens are signed with it"
            )?;
            Ok(())
        }
    }
}

/// Picks the control plane: `--api-address`, else the config's current one, else the default.
pub fn resolve_address(flag: Option<String>, config: &CtlConfig) -> String {
    flag.or_else(|| config.current_control_plane().map(|cp| cp.address.clone()))
        .unwrap_or_else(|| DEFAULT_API_ADDRESS.to_string())
}

fn client_for(flag: Option<String>, config_path: Option<PathBuf>) -> Result<Client> {
    let config = match (&flag, config_path) {
        (Some(_), _) | (None, None) => CtlConfig::default(),
        (None, Some(path)) => CtlConfig::load(&path)?,
    };
    Ok(Client::new(&resolve_address(flag, &config))?)
}

/// The REST path of one resource.
pub fn resource_path(kind: Kind, mesh: &str, name: &str) -> String {
    if kind.is_mesh_scoped() {
        format!("/meshes/{mesh}/{}/{name}", kind.plural())
    } else {
        format!("/meshes/{name}")
    }
}

fn apply_documents(
    client: &Client,
    docs: &[Document],
    dry_run: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    let suffix = if dry_run { " (dry run)" } else { "" };
    let mut applied: Vec<String> = Vec::new();
    for doc in docs {
        let mut path = resource_path(doc.kind, &doc.mesh, &doc.name);
        if dry_run {
            path.push_str("?dryRun=true");
        }
        match client.put(&path, &doc.body) {
            Ok((status, body)) => {
                let unchanged = body.get("unchanged").and_then(Value::as_bool) == Some(true);
                let verb = match status {
                    201 => "created",
                    _ if unchanged => "unchanged",
                    _ => "updated",
                };
                writeln!(out, "{verb} {} {:?}{suffix}", doc.kind, doc.name)?;
                if let Some(warnings) = body.get("warnings").and_then(Value::as_array) {
                    for w in warnings {
                        let w = w.as_str().map_or_else(|| w.to_string(), str::to_string);
                        writeln!(err, "warning: {}: {w}", doc.describe())?;
                    }
                }
                applied.push(doc.describe());
            }
            Err(e) => {
                writeln!(err, "failed to apply {}", doc.describe())?;
                if applied.is_empty() {
                    writeln!(err, "nothing was applied")?;
                } else {
                    writeln!(err, "already applied{suffix}: {}", applied.join(", "))?;
                }
                return Err(e.into());
            }
        }
    }
    Ok(())
}

fn get(client: &Client, args: &GetArgs, out: &mut dyn Write) -> Result<()> {
    let items;
    let single;
    if let Some(name) = &args.name {
        let v = client.get(&resource_path(args.kind, &args.mesh, name))?;
        items = vec![v.clone()];
        single = Some(v);
    } else {
        let path = if !args.kind.is_mesh_scoped() {
            "/meshes".to_string()
        } else if args.all_meshes {
            format!("/{}", args.kind.plural())
        } else {
            format!("/meshes/{}/{}", args.mesh, args.kind.plural())
        };
        items = client.list_all(&path)?;
        single = None;
    }
    match args.output {
        Format::Table => {
            let now = time::OffsetDateTime::now_utc();
            out.write_all(render::resources_table(args.kind, &items, now).as_bytes())?;
        }
        Format::Json | Format::Yaml => {
            let value = single.unwrap_or_else(|| json!({"total": items.len(), "items": items}));
            out.write_all(render::structured(&value, args.output)?.as_bytes())?;
        }
    }
    Ok(())
}

fn inspect(client: &Client, args: &InspectArgs, out: &mut dyn Write) -> Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let table = match args.target {
        InspectTarget::Meshes => render::mesh_insights_table(&client.list_all("/mesh-insights")?),
        InspectTarget::Dataplanes => {
            let path = if args.all_meshes {
                "/dataplanes/_overview".to_string()
            } else {
                format!("/meshes/{}/dataplanes/_overview", args.mesh)
            };
            render::dataplane_overview_table(&client.list_all(&path)?, now)
        }
    };
    out.write_all(table.as_bytes())?;
    Ok(())
}

fn config_command(
    path: &std::path::Path,
    command: ConfigCommand,
    out: &mut dyn Write,
) -> Result<()> {
    let ConfigCommand::ControlPlanes { command } = command;
    let mut cfg = CtlConfig::load(path)?;
    match command {
        ControlPlanesCommand::Add {
            name,
            address,
            overwrite,
        } => {
            let became_current = cfg.add(&name, &address, overwrite)?;
            cfg.save(path)?;
            writeln!(out, "added Control Plane {name:?}")?;
            if became_current {
                writeln!(out, "switched active Control Plane to {name:?}")?;
            }
        }
        ControlPlanesCommand::List => {
            out.write_all(render::control_planes_table(&cfg).as_bytes())?;
        }
        ControlPlanesCommand::Switch { name } => {
            cfg.switch(&name)?;
            cfg.save(path)?;
            writeln!(out, "switched active Control Plane to {name:?}")?;
        }
        ControlPlanesCommand::Remove { name } => {
            cfg.remove(&name)?;
            cfg.save(path)?;
            writeln!(out, "removed Control Plane {name:?}")?;
        }
    }
    Ok(())
}
