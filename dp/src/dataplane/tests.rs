use super::*;

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const DP: &str = "type: Dataplane\nmesh: {{ mesh }}\nname: web-{{idx}}\nnetworking:\n  \
address: 10.0.0.1\n  inbound:\n    - port: 15000\n      servicePort: {{ port }}\n      \
tags: {kuma.io/service: web}\n    - port: 15001\n      serviceAddress: 10.0.0.2\n      \
tags: {weft.io/service: admin}\n    - port: 15002\n      tags: {kuma.io/service: web}\n";

#[test]
fn templates_with_and_without_spaces_are_substituted() {
    let out = substitute(
        "a: {{ x }}\nb: {{y}}\nc: {{  x}}-{{y  }}\n",
        &vars(&[("x", "1"), ("y", "two")]),
    )
    .unwrap();
    assert_eq!(out, "a: 1\nb: two\nc: 1-two\n");
    assert_eq!(
        substitute("no templates", &vars(&[])).unwrap(),
        "no templates"
    );
}

#[test]
fn undefined_variable_names_the_variable_and_line() {
    let err = substitute("a: 1\nb: {{ x }}\nc: {{ missing }}\n", &vars(&[("x", "1")])).unwrap_err();
    assert!(
        matches!(&err, Error::UndefinedVar { name, line: 3 } if name == "missing"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("missing") && msg.contains("line 3"), "{msg}");

    let err = substitute("a: 1\n\nb: {{ x\n", &vars(&[("x", "1")])).unwrap_err();
    assert!(matches!(err, Error::Template { line: 3, .. }), "{err:?}");
    let err = substitute("{{ a b }}", &vars(&[])).unwrap_err();
    assert!(matches!(err, Error::Template { line: 1, .. }), "{err:?}");
}

#[test]
fn dataplane_file_is_parsed_after_substitution() {
    let dp = Dataplane::from_template(
        DP,
        &vars(&[("mesh", "prod"), ("idx", "1"), ("port", "8080")]),
    )
    .unwrap();
    assert_eq!(dp.name, "web-1");
    assert_eq!(dp.mesh, "prod");
    assert!(dp.yaml.contains("servicePort: 8080") && !dp.yaml.contains("{{"));
    assert_eq!(dp.inbounds.len(), 3);
    assert_eq!(dp.inbounds[0].service_port, 8080);
    assert_eq!(dp.inbounds[0].service_address, "127.0.0.1");
    assert_eq!(dp.inbounds[1].service_address, "10.0.0.2");
    assert_eq!(dp.inbounds[1].service_port, 15001, "defaults to the port");
    assert_eq!(dp.services(), vec!["admin", "web"]);
    assert_eq!(
        dp.spiffe_ids(),
        vec!["spiffe://prod/admin", "spiffe://prod/web"],
        "distinct and sorted"
    );
}

#[test]
fn mesh_defaults_and_bad_fields_are_named() {
    let dp = Dataplane::parse("name: a\nnetworking:\n  address: 10.0.0.1\n".into()).unwrap();
    assert_eq!(dp.mesh, "default");
    assert_eq!(dp.address, "10.0.0.1");
    assert!(dp.inbounds.is_empty());
    let e = Dataplane::parse("name: a\n".into()).unwrap_err();
    assert!(e.to_string().contains("networking.address"), "{e}");

    for (text, field) in [
        ("mesh: m\n", "name"),
        ("name: a\ntype: Mesh\n", "type"),
        (
            "name: a\nnetworking:\n  inbound:\n    - port: 70000\n      tags: {kuma.io/service: w}\n",
            "networking.inbound[0].port",
        ),
        (
            "name: a\nnetworking:\n  inbound:\n    - port: 1\n      servicePort: 0\n      tags: {kuma.io/service: w}\n",
            "networking.inbound[0].servicePort",
        ),
        (
            "name: a\nnetworking:\n  inbound:\n    - port: 1\n      tags: {version: v1}\n",
            "networking.inbound[0].tags",
        ),
    ] {
        let err = Dataplane::parse(text.into()).unwrap_err();
        assert!(
            matches!(&err, Error::Field { field: f, .. } if f == field),
            "{text}: {err:?}"
        );
    }
    let err = Dataplane::parse("name: [unclosed\n".into()).unwrap_err();
    assert!(
        matches!(err, Error::Yaml(ref m) if m.contains("line")),
        "{err:?}"
    );
}
