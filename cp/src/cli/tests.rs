//! Unit tests of weftctl: document parsing, rendering, config, and whole commands against a
//! tiny in-test HTTP server that answers canned responses and records requests.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use clap::Parser;
use serde_json::{Value, json};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use weft_api::kind::Kind;

use super::apply::{dir_files, load_all, parse_documents};
use super::render::{dataplane_overview_table, format_age, mesh_insights_table, resources_table};
use super::*;

/// A recorded request: method, path with query, body.
type Recorded = (String, String, String);

/// Answers each connection with the next canned `(status, body)`, then stops.
struct FakeServer {
    address: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    handle: Option<JoinHandle<()>>,
}

impl FakeServer {
    fn start(responses: Vec<(u16, String)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let handle = std::thread::spawn(move || {
            for (status, body) in responses {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_string();
                let path = parts.next().unwrap_or_default().to_string();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut req_body = vec![0; len];
                reader.read_exact(&mut req_body).unwrap();
                recorded
                    .lock()
                    .unwrap()
                    .push((method, path, String::from_utf8(req_body).unwrap()));
                let mut stream = stream;
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
        });
        FakeServer {
            address,
            requests,
            handle: Some(handle),
        }
    }

    /// Waits for every canned response to be served; the recorded requests.
    fn finish(mut self) -> Vec<Recorded> {
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.requests.lock().unwrap().clone()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// Runs weftctl with `args` (after the program name); Ok(stdout, stderr) or the error.
fn weftctl(args: &[&str]) -> (Result<()>, String, String) {
    let mut argv = vec!["weftctl"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let res = run(cli, &mut out, &mut err);
    (
        res,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

const MIXED: &str = "\
type: Dataplane
mesh: demo
name: web-1
networking:
  address: 10.0.0.1
  inbound:
    - port: 8080
      tags:
        kuma.io/service: web
---
type: Mesh
name: demo
---
type: MeshTrafficPermission
name: allow-all
mesh: demo
spec:
  targetRef:
    kind: Mesh
---
";

#[test]
fn multi_document_meshes_first() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.yaml");
    std::fs::write(&file, MIXED).unwrap();
    let docs = load_all(&[file.display().to_string()], &mut io::empty()).unwrap();
    let got: Vec<(Kind, &str, &str, usize)> = docs
        .iter()
        .map(|d| (d.kind, d.name.as_str(), d.mesh.as_str(), d.number))
        .collect();
    assert_eq!(
        got,
        vec![
            (Kind::Mesh, "demo", "demo", 2),
            (Kind::Dataplane, "web-1", "demo", 1),
            (Kind::MeshTrafficPermission, "allow-all", "demo", 3),
        ]
    );
    assert_eq!(docs[1].body["networking"]["inbound"][0]["port"], 8080);
}

#[test]
fn json_documents_and_default_mesh() {
    let docs = parse_documents(
        "x.json",
        r#"{"type": "Dataplane", "name": "a", "networking": {"address": "1.2.3.4"}}"#,
    )
    .unwrap();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].mesh, "default");
    assert_eq!(docs[0].body["networking"]["address"], "1.2.3.4");
}

#[test]
fn bad_documents_name_file_number_and_line() {
    let syntax = "type: Mesh\nname: a\n---\ntype: Mesh\nname: [unclosed\n";
    let e = parse_documents("m.yaml", syntax).unwrap_err().to_string();
    assert!(e.starts_with("m.yaml: document 2 (line "), "{e}");

    let e = parse_documents("m.yaml", "type: Mesh\n")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "m.yaml: document 1: missing field `name`");

    let e = parse_documents("m.yaml", "name: a\n")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "m.yaml: document 1: missing field `type`");

    let e = parse_documents("m.yaml", "type: Mesh\nname: a\n---\ntype: Gizmo\nname: b\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("m.yaml: document 2: unknown type \"Gizmo\""),
        "{e}"
    );

    let e = parse_documents("m.yaml", "- 1\n- 2\n")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "m.yaml: document 1: a resource must be a mapping");
}

#[test]
fn bad_document_sends_nothing() {
    let server = FakeServer::start(vec![(201, "{}".into())]);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("a.yaml");
    let bad = dir.path().join("b.yaml");
    std::fs::write(&good, "type: Mesh\nname: demo\n").unwrap();
    std::fs::write(&bad, "type: Dataplane\nname: x\n---\ntype: Dataplane\n").unwrap();
    let (res, out, _) = weftctl(&[
        "--api-address",
        &server.address,
        "apply",
        "-f",
        &dir.path().display().to_string(),
    ]);
    let e = res.unwrap_err().to_string();
    assert!(e.contains("b.yaml: document 2"), "{e}");
    assert!(out.is_empty());
    assert!(server.requests().is_empty());
}

#[test]
fn directory_expansion_is_sorted_and_filtered() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["c.json", "b.yaml", "a.yml", "d.txt", "0.yaml.bak"] {
        std::fs::write(dir.path().join(f), "").unwrap();
    }
    std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    let names: Vec<String> = dir_files(dir.path())
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.yml", "b.yaml", "c.json"]);
}

#[test]
fn apply_prints_results_and_warnings() {
    let server = FakeServer::start(vec![
        (201, r#"{"resourceVersion": 1, "warnings": []}"#.into()),
        (
            200,
            r#"{"resourceVersion": 4, "warnings": ["port 80 is privileged"]}"#.into(),
        ),
        (201, r#"{"resourceVersion": 1}"#.into()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.yaml");
    std::fs::write(&file, MIXED).unwrap();
    let (res, out, err) = weftctl(&[
        "--api-address",
        &server.address,
        "apply",
        "--dry-run",
        "-f",
        &file.display().to_string(),
    ]);
    res.unwrap();
    assert_eq!(
        out,
        "created Mesh \"demo\" (dry run)\nupdated Dataplane \"web-1\" (dry run)\n\
         created MeshTrafficPermission \"allow-all\" (dry run)\n"
    );
    assert!(err.contains("warning: "), "{err}");
    assert!(err.contains("port 80 is privileged"), "{err}");
    let reqs = server.finish();
    let paths: Vec<(&str, &str)> = reqs
        .iter()
        .map(|(m, p, _)| (m.as_str(), p.as_str()))
        .collect();
    assert_eq!(
        paths,
        [
            ("PUT", "/meshes/demo?dryRun=true"),
            ("PUT", "/meshes/demo/dataplanes/web-1?dryRun=true"),
            (
                "PUT",
                "/meshes/demo/meshtrafficpermissions/allow-all?dryRun=true"
            ),
        ]
    );
    let body: Value = serde_json::from_str(&reqs[0].2).unwrap();
    assert_eq!(body, json!({"type": "Mesh", "name": "demo"}));
}

#[test]
fn apply_stops_at_api_error_with_causes() {
    let server = FakeServer::start(vec![
        (201, "{}".into()),
        (
            422,
            r#"{"status": 422, "title": "Could not process a resource",
                "details": "Resource is not valid",
                "causes": [{"field": "networking.inbound[0].port", "message": "must be between 1 and 65535"}]}"#
                .into(),
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.yaml");
    std::fs::write(&file, MIXED).unwrap();
    let (res, out, err) = weftctl(&[
        "--api-address",
        &server.address,
        "apply",
        "-f",
        &file.display().to_string(),
    ]);
    let e = res.unwrap_err().to_string();
    assert!(
        e.starts_with("Resource is not valid (422 from PUT http://"),
        "{e}"
    );
    assert!(
        e.ends_with("\n  * networking.inbound[0].port: must be between 1 and 65535"),
        "{e}"
    );
    assert_eq!(out, "created Mesh \"demo\"\n");
    assert!(err.contains("already applied: Mesh \"demo\""), "{err}");
    assert_eq!(server.finish().len(), 2);
}

#[test]
fn get_follows_next_and_renders_json() {
    let server = FakeServer::start(vec![
        (
            200,
            r#"{"total": 2, "items": [{"type": "Mesh", "name": "a"}], "next": "/meshes?offset=1"}"#
                .into(),
        ),
        (
            200,
            r#"{"total": 2, "items": [{"type": "Mesh", "name": "b"}], "next": null}"#.into(),
        ),
    ]);
    let (res, out, _) = weftctl(&[
        "--api-address",
        &server.address,
        "get",
        "mesh",
        "-o",
        "json",
    ]);
    res.unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 2);
    assert_eq!(v["items"][1]["name"], "b");
    let reqs = server.finish();
    assert_eq!(reqs[0].1, "/meshes");
    assert_eq!(reqs[1].1, "/meshes?offset=1");
}

#[test]
fn get_single_yaml_and_all_meshes_path() {
    let server = FakeServer::start(vec![
        (
            200,
            r#"{"type": "Dataplane", "mesh": "m", "name": "d"}"#.into(),
        ),
        (200, r#"{"total": 0, "items": [], "next": null}"#.into()),
    ]);
    let (res, out, _) = weftctl(&[
        "--api-address",
        &server.address,
        "get",
        "Dataplane",
        "d",
        "-m",
        "m",
        "-o",
        "yaml",
    ]);
    res.unwrap();
    assert_eq!(out, "type: Dataplane\nmesh: m\nname: d\n");
    let (res, out, _) = weftctl(&[
        "--api-address",
        &server.address,
        "get",
        "meshtrafficpermissions",
        "-A",
    ]);
    res.unwrap();
    assert_eq!(out, "MESH   NAME   TARGETREF   AGE\n");
    let reqs = server.finish();
    assert_eq!(reqs[0].1, "/meshes/m/dataplanes/d");
    assert_eq!(reqs[1].1, "/meshtrafficpermissions");
}

#[test]
fn delete_prints_and_404_fails() {
    let server = FakeServer::start(vec![
        (200, "{}".into()),
        (
            404,
            r#"{"status": 404, "title": "Not found", "details": "no Dataplane \"x\""}"#.into(),
        ),
    ]);
    let (res, out, _) = weftctl(&["--api-address", &server.address, "delete", "dataplane", "d"]);
    res.unwrap();
    assert_eq!(out, "deleted Dataplane \"d\"\n");
    let (res, _, _) = weftctl(&[
        "--api-address",
        &server.address,
        "delete",
        "dataplanes",
        "x",
    ]);
    let e = res.unwrap_err();
    assert!(matches!(
        e,
        Error::Client(client::Error::Api(ApiError { status: 404, .. }))
    ));
    let reqs = server.finish();
    assert_eq!(reqs[0].0, "DELETE");
    assert_eq!(reqs[0].1, "/meshes/default/dataplanes/d");
}

#[test]
fn version_survives_unreachable_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (res, out, _) = weftctl(&["--api-address", &addr, "version"]);
    res.unwrap();
    assert!(out.starts_with("weftctl: "), "{out}");
    assert!(out.contains("server: unreachable ("), "{out}");
    assert!(out.contains(&addr), "{out}");
}

#[test]
fn network_errors_name_the_url() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (res, _, _) = weftctl(&["--api-address", &addr, "get", "meshes"]);
    let e = res.unwrap_err().to_string();
    assert!(e.starts_with(&format!("GET {addr}/meshes failed")), "{e}");
}

#[test]
fn ages() {
    assert_eq!(format_age(Duration::seconds(-5)), "0s");
    assert_eq!(format_age(Duration::seconds(59)), "59s");
    assert_eq!(format_age(Duration::minutes(5)), "5m");
    assert_eq!(format_age(Duration::seconds(3599)), "59m");
    assert_eq!(format_age(Duration::hours(2)), "2h");
    assert_eq!(format_age(Duration::days(3) + Duration::hours(23)), "3d");
    let now = datetime!(2025-01-10 12:00:00 UTC);
    assert_eq!(render::age(Some(&json!("2025-01-10T11:55:00Z")), now), "5m");
    assert_eq!(render::age(Some(&json!("nonsense")), now), "-");
    assert_eq!(render::age(None, now), "-");
}

const NOW: OffsetDateTime = datetime!(2025-01-10 12:00:00 UTC);

#[test]
fn mesh_table() {
    let items = vec![
        json!({"type": "Mesh", "name": "default", "creationTime": "2025-01-07T12:00:00Z"}),
        json!({"type": "Mesh", "name": "secure", "creationTime": "2025-01-10T10:00:00Z",
               "mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}}),
    ];
    assert_eq!(
        resources_table(Kind::Mesh, &items, NOW),
        "NAME      MTLS           AGE\n\
         default   off            3d\n\
         secure    builtin/ca-1   2h\n"
    );
}

#[test]
fn dataplane_table() {
    let items = vec![json!({
        "type": "Dataplane", "mesh": "default", "name": "web-1",
        "creationTime": "2025-01-10T11:59:30Z",
        "networking": {"address": "10.0.0.1", "inbound": [
            {"port": 8080, "tags": {"kuma.io/service": "web", "version": "v1"}},
            {"port": 9090, "tags": {"kuma.io/service": "web-admin"}}
        ]}
    })];
    assert_eq!(
        resources_table(Kind::Dataplane, &items, NOW),
        [
            "MESH      NAME    TAGS                                                       AGE",
            "default   web-1   kuma.io/service=web,kuma.io/service=web-admin,version=v1   30s",
            "",
        ]
        .join("\n")
    );
}

#[test]
fn policy_table() {
    let items = vec![
        json!({"type": "MeshTrafficPermission", "mesh": "default", "name": "allow",
               "creationTime": "2025-01-10T11:00:00Z",
               "spec": {"targetRef": {"kind": "MeshService", "name": "web"}}}),
        json!({"type": "MeshTrafficPermission", "mesh": "default", "name": "mesh-wide",
               "spec": {}}),
    ];
    assert_eq!(
        resources_table(Kind::MeshTrafficPermission, &items, NOW),
        "MESH      NAME        TARGETREF         AGE\n\
         default   allow       MeshService/web   1h\n\
         default   mesh-wide   Mesh              -\n"
    );
}

#[test]
fn inspect_tables() {
    let insights = vec![json!({
        "name": "default", "mtls": "builtin/ca-1",
        "dataplanes": {"total": 3, "online": 2},
        "policies": {"MeshTrafficPermission": {"total": 4}}
    })];
    assert_eq!(
        mesh_insights_table(&insights),
        "NAME      MTLS           DATAPLANES   POLICIES\n\
         default   builtin/ca-1   2/3          4\n"
    );
    let overview = vec![
        json!({"mesh": "default", "name": "web-1",
               "dataplane": {"networking": {"inbound": [{"tags": {"kuma.io/service": "web"}}]}},
               "dataplaneInsight": {"status": "Online", "connectedSince": "2025-01-10T11:58:00Z",
                                    "certExpiry": "2025-01-11T12:00:00Z", "certRenewals": 3,
                                    "dpVersion": "0.1.0", "inboundHealth": {"20001": true, "20002": false},
                                    "config": {"acked": "0123456789abcdef0123", "acks": 2}}}),
        json!({"mesh": "default", "name": "web-2",
               "dataplane": {"networking": {"inbound": [{"tags": {"kuma.io/service": "web"}}]}},
               "dataplaneInsight": {"status": "Offline",
                                    "config": {"acked": "aaaa", "nacked": "bbbb", "nackError": "port 0"}}}),
        json!({"mesh": "default", "name": "web-3",
               "dataplane": {"networking": {"inbound": [{"tags": {"kuma.io/service": "web"}}]}}}),
    ];
    assert_eq!(
        dataplane_overview_table(&overview, NOW),
        "MESH      NAME    TAGS                  STATUS    LAST-CONNECTED   INBOUNDS    CERT-EXPIRY           CERT-RENEWALS   DP-VERSION   CONFIG\n\
         default   web-1   kuma.io/service=web   Online    2m ago           1/2 ready   2025-01-11 12:00:00   3               0.1.0        0123456789ab\n\
         default   web-2   kuma.io/service=web   Offline   -                -           -                     -               -            NACKED bbbb: port 0\n\
         default   web-3   kuma.io/service=web   Offline   -                -           -                     -               -            -\n"
    );
}

#[test]
fn control_plane_config_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("weft").join("weftctl.toml");
    let p = path.display().to_string();
    let cfg = |args: &[&str]| {
        let mut a = vec!["--config", p.as_str(), "config", "control-planes"];
        a.extend_from_slice(args);
        weftctl(&a)
    };

    let (res, out, _) = cfg(&[
        "add",
        "--name",
        "local",
        "--address",
        "http://127.0.0.1:5681",
    ]);
    res.unwrap();
    assert!(
        out.contains("switched active Control Plane to \"local\""),
        "{out}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (res, out, _) = cfg(&[
        "add",
        "--name",
        "prod",
        "--address",
        "https://cp.example:5682",
    ]);
    res.unwrap();
    assert!(!out.contains("switched"), "{out}");

    let (res, _, _) = cfg(&["add", "--name", "prod", "--address", "https://other:1"]);
    assert!(res.unwrap_err().to_string().contains("already exists"));
    let (res, _, _) = cfg(&["add", "--name", "bad", "--address", "not a url"]);
    assert!(res.unwrap_err().to_string().contains("invalid address"));
    let (res, _, _) = cfg(&["add", "--name", "bad", "--address", "ftp://x"]);
    assert!(res.is_err());
    let (res, _, _) = cfg(&[
        "add",
        "--name",
        "prod",
        "--address",
        "https://cp2:5682",
        "--overwrite",
    ]);
    res.unwrap();

    let (res, out, _) = cfg(&["list"]);
    res.unwrap();
    assert_eq!(
        out,
        [
            "ACTIVE   NAME    ADDRESS",
            "*        local   http://127.0.0.1:5681",
            "         prod    https://cp2:5682",
            "",
        ]
        .join("\n")
    );

    cfg(&["switch", "--name", "prod"]).0.unwrap();
    let loaded = CtlConfig::load(&path).unwrap();
    assert_eq!(loaded.current.as_deref(), Some("prod"));
    assert_eq!(resolve_address(None, &loaded), "https://cp2:5682");
    assert_eq!(
        resolve_address(Some("http://x:1".into()), &loaded),
        "http://x:1"
    );
    assert!(cfg(&["switch", "--name", "nope"]).0.is_err());

    cfg(&["remove", "--name", "prod"]).0.unwrap();
    let loaded = CtlConfig::load(&path).unwrap();
    assert_eq!(loaded.current.as_deref(), Some("local"));
    assert_eq!(loaded.control_planes.len(), 1);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("current = \"local\""), "{text}");
    assert!(text.contains("[[control_planes]]"), "{text}");

    cfg(&["remove", "--name", "local"]).0.unwrap();
    let loaded = CtlConfig::load(&path).unwrap();
    assert_eq!(loaded, CtlConfig::default());
    assert_eq!(resolve_address(None, &loaded), DEFAULT_API_ADDRESS);
    assert!(cfg(&["remove", "--name", "local"]).0.is_err());
    // No temporary files left behind.
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );
}

#[test]
fn kind_names() {
    for (input, kind) in [
        ("meshes", Kind::Mesh),
        ("mesh", Kind::Mesh),
        ("Mesh", Kind::Mesh),
        ("dataplanes", Kind::Dataplane),
        ("dataplane", Kind::Dataplane),
        ("DATAPLANE", Kind::Dataplane),
        ("meshtrafficpermissions", Kind::MeshTrafficPermission),
        ("MeshTrafficPermission", Kind::MeshTrafficPermission),
    ] {
        assert_eq!(parse_kind(input), Ok(kind), "{input}");
    }
    assert!(
        parse_kind("gizmos")
            .unwrap_err()
            .contains("unknown resource type")
    );
    assert!(Cli::try_parse_from(["weftctl", "get", "gizmos"]).is_err());
}

#[test]
fn usage_errors_are_clap_errors() {
    let e = Cli::try_parse_from(["weftctl", "apply"]).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    let e = Cli::try_parse_from(["weftctl", "get", "meshes", "x", "-A"]).unwrap_err();
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn api_error_without_json_body() {
    let e = ApiError::from_body(502, "GET http://x/".into(), "bad gateway\n");
    assert_eq!(e.to_string(), "bad gateway (502 from GET http://x/)");
}
