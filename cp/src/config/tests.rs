use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn empty_file_gives_secure_defaults() {
    let c = Config::from_str_with_env("", &[]).unwrap();
    assert_eq!(c, Config::default());
    assert!(
        c.api_address.ip().is_loopback(),
        "API binds localhost by default"
    );
}

#[test]
fn full_file_parses() {
    let c = Config::from_str_with_env(
        r#"
[general]
mode = "standalone"
[store]
type = "memory"
path = "/tmp/x"
[api]
address = "127.0.0.1:1"
danger_allow_unauthenticated_remote = false
[dp_server]
address = "0.0.0.0:2"
[diagnostics]
address = "127.0.0.1:3"
[defaults]
skip_mesh_creation = true
"#,
        &[],
    )
    .unwrap();
    assert_eq!(c.store_type, StoreType::Memory);
    assert_eq!(c.api_address.port(), 1);
    assert_eq!(c.dp_server_address.port(), 2);
    assert_eq!(c.diagnostics_address.port(), 3);
    assert!(c.skip_mesh_creation);
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let e = Config::from_str_with_env("[api]\nadress = \"127.0.0.1:1\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("adress"), "{e}");
    let e = Config::from_str_with_env("[apii]\n", &[]).unwrap_err();
    assert!(e.to_string().contains("apii"), "{e}");
}

#[test]
fn bad_values_name_the_field() {
    let e = Config::from_str_with_env("[api]\naddress = \"localhost\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("api.address"), "{e}");
    let e = Config::from_str_with_env("[store]\ntype = \"postgres\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("postgres"), "{e}");
    let e = Config::from_str_with_env("[general]\nmode = \"global\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("global"), "{e}");
}

#[test]
fn environment_overrides_the_file() {
    let c = Config::from_str_with_env(
        "[api]\naddress = \"127.0.0.1:1\"\n",
        &env(&[
            ("WEFT_CP_API_ADDRESS", "127.0.0.1:9"),
            ("WEFT_CP_STORE_TYPE", "memory"),
            ("WEFT_CP_DEFAULTS_SKIP_MESH_CREATION", "true"),
            ("PATH", "/usr/bin"),
        ]),
    )
    .unwrap();
    assert_eq!(c.api_address.port(), 9);
    assert_eq!(c.store_type, StoreType::Memory);
    assert!(c.skip_mesh_creation);
}

#[test]
fn bad_environment_names_the_variable() {
    let e = Config::from_str_with_env("", &env(&[("WEFT_CP_API_ADDRESS", "nope")])).unwrap_err();
    assert!(e.to_string().contains("WEFT_CP_API_ADDRESS"), "{e}");
    let e = Config::from_str_with_env("", &env(&[("WEFT_CP_API_ADRESS", "x")])).unwrap_err();
    assert!(e.to_string().contains("WEFT_CP_API_ADRESS"), "{e}");
    // weftctl's variable is not ours: a URL there must not stop the CP.
    Config::from_str_with_env("", &env(&[("WEFT_API_ADDRESS", "http://cp:5681")])).unwrap();
}

#[test]
fn remote_api_without_authentication_needs_the_danger_flag() {
    let e = Config::from_str_with_env("[api]\naddress = \"0.0.0.0:5681\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("api.address"), "{e}");
    assert!(
        e.to_string()
            .contains("danger_allow_unauthenticated_remote"),
        "{e}"
    );
    let e = Config::from_str_with_env("", &env(&[("WEFT_CP_API_ADDRESS", "10.0.0.1:5681")]))
        .unwrap_err();
    assert!(e.to_string().contains("loopback"), "{e}");
    let c = Config::from_str_with_env(
        "[api]\naddress = \"0.0.0.0:5681\"\ndanger_allow_unauthenticated_remote = true\n",
        &[],
    )
    .unwrap();
    assert!(c.danger_allow_unauthenticated_remote_api);
}
