//! End to end: the real `weft-cp` and `weftctl` binaries, a sled store on disk.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use weft_e2e::{Cp, bin, client, ok, wait_for};

const RESOURCES: &str = r#"
type: Mesh
name: shop
mtls:
  enabledBackend: ca-1
  backends:
    - name: ca-1
      type: builtin
      dpCert:
        rotation:
          expiration: 24h
---
type: Dataplane
mesh: shop
name: web-01
networking:
  address: 10.77.0.12
  inbound:
    - port: 10001
      servicePort: 8080
      serviceAddress: 127.0.0.1
      tags:
        kuma.io/service: web
        kuma.io/protocol: http
  outbound:
    - port: 20001
      tags:
        kuma.io/service: backend
---
type: MeshTrafficPermission
mesh: shop
name: allow-web-to-backend
spec:
  targetRef:
    kind: MeshService
    name: backend
  from:
    - targetRef:
        kind: MeshService
        name: web
      default:
        action: Allow
"#;

fn docs() -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(RESOURCES)
        .map(|d| {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .collect()
}

fn strip(mut v: Value) -> Value {
    for f in ["creationTime", "modificationTime", "resourceVersion"] {
        v.as_object_mut().unwrap().remove(f);
    }
    v
}

#[test]
fn apply_read_back_delete_and_survive_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let file = tmp.path().join("shop.yaml");
    std::fs::write(&file, RESOURCES).unwrap();

    let out = ok(&cp.weftctl(&["apply", "-f", file.to_str().unwrap()]));
    assert!(out.contains("MeshTrafficPermission"), "{out}");

    let applied = docs();
    let targets = [
        ("meshes", "shop"),
        ("dataplanes", "web-01"),
        ("meshtrafficpermissions", "allow-web-to-backend"),
    ];
    let read_all = |cp: &Cp| {
        targets
            .iter()
            .map(|(kind, name)| {
                let json_out = ok(&cp.weftctl(&["get", kind, name, "-m", "shop", "-o", "json"]));
                let yaml_out = ok(&cp.weftctl(&["get", kind, name, "-m", "shop", "-o", "yaml"]));
                let from_json: Value = serde_json::from_str(&json_out).unwrap();
                let from_yaml: Value = serde_json::to_value(
                    serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&yaml_out).unwrap(),
                )
                .unwrap();
                assert_eq!(
                    from_json, from_yaml,
                    "YAML and JSON views agree for {kind}/{name}"
                );
                from_json
            })
            .collect::<Vec<_>>()
    };
    let got = read_all(&cp);
    for (a, g) in applied.iter().zip(&got) {
        assert_eq!(a, &strip(g.clone()), "read back equals what was applied");
        assert!(g["creationTime"].is_string());
    }

    // Applying the same file again changes nothing.
    let again = ok(&cp.weftctl(&["apply", "-f", file.to_str().unwrap()]));
    assert_eq!(again.matches("unchanged").count(), 3, "{again}");

    // The table view lists it too.
    let table = ok(&cp.weftctl(&["get", "dataplanes", "-m", "shop"]));
    assert!(
        table.contains("web-01") && table.contains("kuma.io/service=web"),
        "{table}"
    );

    // Restart on the same data dir: everything is still there, with the same versions.
    cp.stop().unwrap();
    cp.restart().unwrap();
    assert_eq!(read_all(&cp), got, "state after restart");

    // Delete; deleting the mesh first is refused while it still holds resources.
    let refused = cp.weftctl(&["delete", "mesh", "shop"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("shop"),
        "{refused:?}"
    );
    ok(&cp.weftctl(&[
        "delete",
        "meshtrafficpermission",
        "allow-web-to-backend",
        "-m",
        "shop",
    ]));
    ok(&cp.weftctl(&["delete", "dataplane", "web-01", "-m", "shop"]));
    ok(&cp.weftctl(&["delete", "mesh", "shop"]));
    let gone = cp.weftctl(&["get", "mesh", "shop"]);
    assert!(!gone.status.success(), "mesh is gone");
    cp.stop().unwrap();
    cp.restart().unwrap();
    assert!(
        !cp.weftctl(&["get", "mesh", "shop"]).status.success(),
        "deletion is durable"
    );
}

#[test]
fn default_mesh_is_secure_and_created_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let m: Value =
        serde_json::from_str(&ok(&cp.weftctl(&["get", "mesh", "default", "-o", "json"]))).unwrap();
    let backend = m["mtls"]["enabledBackend"].as_str().unwrap();
    let b = m["mtls"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap();
    assert_eq!(b["type"], "builtin");
    assert_eq!(b["mode"], "STRICT");
    // An operator who deletes it does not get it back on restart.
    ok(&cp.weftctl(&["delete", "mesh", "default"]));
    cp.stop().unwrap();
    cp.restart().unwrap();
    assert!(!cp.weftctl(&["get", "mesh", "default"]).status.success());
}

#[test]
fn validation_errors_name_the_field_and_nothing_is_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let bad = r#"
type: Dataplane
mesh: default
name: broken
networking:
  address: 10.0.0.1
  inbound:
    - port: 10001
      tags: {kuma.io/service: a}
    - port: 70000
      tags: {kuma.io/service: b}
"#;
    let out = cp.weftctl_stdin(&["apply", "-f", "-"], Some(bad));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("networking.inbound[1].port"), "{err}");
    assert!(!cp.weftctl(&["get", "dataplane", "broken"]).status.success());
}

#[test]
fn cp_config_is_checked_before_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("bad.toml");
    std::fs::write(&f, "[api]\naddress = \"127.0.0.1:5681\"\nbogus = 1\n").unwrap();
    let v = Command::new(bin("weft-cp"))
        .args(["validate", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&v.stderr).contains("bogus"));
    let r = Command::new(bin("weft-cp"))
        .args(["run", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(64), "run refuses bad config with 64");
    std::fs::write(&f, "[store]\npath = \"/tmp/x\"\n").unwrap();
    let v = Command::new(bin("weft-cp"))
        .args(["validate", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(v.status.success());
}

#[test]
fn diagnostics_serve_metrics_and_sigterm_is_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = Cp::start(&tmp.path().join("cp")).unwrap();
    ok(&cp.weftctl(&["get", "meshes"]));
    let body = client()
        .get(format!("http://{}/metrics", cp.diagnostics))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.contains("weft_cp_api_requests_total"), "{body}");
    assert!(body.contains("weft_cp_up 1"), "{body}");
    let status = cp.stop().unwrap();
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status}\n{}",
        cp.log()
    );
}

/// `kill -9` while a client makes 1000 sequential PUTs: every PUT answered 2xx survives.
#[test]
fn acknowledged_writes_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let url = cp.url();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let failed = Arc::new(AtomicBool::new(false));
    let writer = {
        let acked = acked.clone();
        let failed = failed.clone();
        std::thread::spawn(move || {
            let c = client();
            for i in 0..1000 {
                let name = format!("p-{i:04}");
                let body = json!({
                    "type": "MeshTrafficPermission", "mesh": "default", "name": name,
                    "spec": {"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]}
                });
                match c
                    .put(format!(
                        "{url}/meshes/default/meshtrafficpermissions/{name}"
                    ))
                    .json(&body)
                    .send()
                {
                    Ok(r) if r.status().is_success() => {
                        acked.lock().unwrap().insert(name);
                    }
                    _ => {
                        failed.store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
    };
    wait_for("300 acknowledged PUTs", Duration::from_secs(60), || {
        (acked.lock().unwrap().len() >= 300).then_some(())
    })
    .unwrap();
    cp.kill9();
    wait_for(
        "the writer to see the crash",
        Duration::from_secs(10),
        || failed.load(Ordering::SeqCst).then_some(()),
    )
    .unwrap();
    cp.restart().unwrap();
    writer.join().unwrap();

    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 300 && acked.len() < 1000,
        "the crash interrupted the run ({} acked)",
        acked.len()
    );
    let c = client();
    let mut present = BTreeSet::new();
    let mut next = Some(format!(
        "{}/meshes/default/meshtrafficpermissions?size=1000",
        cp.url()
    ));
    while let Some(u) = next {
        let page: Value = c.get(&u).send().unwrap().json().unwrap();
        for it in page["items"].as_array().unwrap() {
            present.insert(it["name"].as_str().unwrap().to_owned());
        }
        next = page["next"].as_str().map(str::to_owned);
    }
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost after kill -9: {lost:?}"
    );
}
