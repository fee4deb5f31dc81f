use super::*;

fn minimal() -> FileConfig {
    FileConfig::parse(
        "cp_address = \"https://cp:5678\"\nca_cert_file = \"/etc/weft/ca.pem\"\n\
         dataplane_file = \"/etc/weft/dp/web.yaml\"\nstate_dir = \"/var/lib/weft/dp/web\"\n",
    )
    .unwrap()
}

#[test]
fn full_file_and_flag_overlay() {
    let c = minimal()
        .overlay(FileConfig {
            state_dir: Some("/tmp/s".into()),
            ..Default::default()
        })
        .check()
        .unwrap();
    assert_eq!(c.state_dir, PathBuf::from("/tmp/s"));
    assert!(c.admin_address.ip().is_loopback());
    assert_eq!(
        c.admin_address.port(),
        0,
        "a free port by default: dataplanes on one host never clash"
    );
    assert_eq!(c.reconnect_max_backoff, Duration::from_secs(3));
    assert_eq!(c.status_interval, Duration::from_secs(10));
    assert!(c.dataplane_vars.is_empty());
    assert!(c.tls_resumption, "TLS sessions resume by default");
    let off = FileConfig::parse("tls_resumption = false\n").unwrap();
    assert!(!minimal().overlay(off).check().unwrap().tls_resumption);
    assert_eq!(c.quic_congestion, Congestion::Cubic, "CUBIC unless asked");
    let bbr = FileConfig::parse("quic_congestion = \"bbr\"\n").unwrap();
    assert_eq!(
        minimal().overlay(bbr).check().unwrap().quic_congestion,
        Congestion::Bbr
    );
}

#[test]
fn an_unknown_congestion_controller_is_named() {
    let reno = FileConfig::parse("quic_congestion = \"reno\"\n").unwrap();
    let e = minimal().overlay(reno).check().unwrap_err().to_string();
    assert!(
        e.contains("quic_congestion") && e.contains("\"reno\"") && e.contains("cubic or bbr"),
        "{e}"
    );
}

#[test]
fn unknown_key_and_missing_values_are_named() {
    let e = FileConfig::parse("cp_adress = \"x\"\n").unwrap_err();
    assert!(e.to_string().contains("cp_adress"), "{e}");
    let e = FileConfig::default().check().unwrap_err();
    assert!(e.to_string().contains("cp_address"), "{e}");
    let e = FileConfig {
        cp_address: Some("http://cp:5678".into()),
        ..Default::default()
    }
    .check()
    .unwrap_err();
    assert!(e.to_string().contains("https://"), "{e}");
    let e = FileConfig {
        ca_cert_file: None,
        ..minimal()
    }
    .check()
    .unwrap_err();
    assert!(e.to_string().contains("ca_cert_file"), "{e}");
}

#[test]
fn durations_parse_and_bad_ones_are_named() {
    let c =
        FileConfig::parse("reconnect_max_backoff = \"500ms\"\nstatus_interval = \"1m\"\n").unwrap();
    let c = minimal().overlay(c).check().unwrap();
    assert_eq!(c.reconnect_max_backoff, Duration::from_millis(500));
    assert_eq!(c.status_interval, Duration::from_secs(60));

    for (field, bad) in [
        ("reconnect_max_backoff", "three seconds"),
        ("status_interval", "0s"),
    ] {
        let over = FileConfig::parse(&format!("{field} = \"{bad}\"\n")).unwrap();
        let e = minimal().overlay(over).check().unwrap_err();
        assert!(e.to_string().contains(field), "{e}");
    }
    // Durations are strings, not numbers.
    let e = FileConfig::parse("status_interval = 10\n").unwrap_err();
    assert!(e.to_string().contains("status_interval"), "{e}");
}

#[test]
fn dataplane_vars_from_file_and_flags_merge() {
    let file = FileConfig::parse("[dataplane_vars]\nport = \"8080\"\nname = \"web-1\"\n").unwrap();
    let (k, v) = parse_var("name=web-2").unwrap();
    let flags = FileConfig {
        dataplane_vars: Some(BTreeMap::from([(k, v)])),
        ..Default::default()
    };
    let c = minimal().overlay(file).overlay(flags).check().unwrap();
    assert_eq!(c.dataplane_vars["port"], "8080");
    assert_eq!(c.dataplane_vars["name"], "web-2", "flags win over the file");

    assert_eq!(parse_var("a=b=c").unwrap(), ("a".into(), "b=c".into()));
    let e = parse_var("novalue").unwrap_err();
    assert!(e.to_string().contains("key=value"), "{e}");
    let e = parse_var("bad key=1").unwrap_err();
    assert!(e.to_string().contains("bad key"), "{e}");
    let file = FileConfig::parse("[dataplane_vars]\n\"a b\" = \"1\"\n").unwrap();
    let e = minimal().overlay(file).check().unwrap_err();
    assert!(e.to_string().contains("dataplane_vars"), "{e}");
}
