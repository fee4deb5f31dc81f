//! Tests of the network-namespace testbed itself and of `weft-testapp`: hosts reach each other
//! over the bridge, a cut link really drops traffic and comes back, teardown leaves nothing
//! behind, and the test workloads behave as the mesh tests will rely on.
//!
//! Every client runs inside a testbed host: 10.77.0.x must never be contacted from the root
//! namespace (it would leave the machine through the default route).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_e2e::netns::{Host, Proc, Testbed, cpus_allowed, parse_cpu_list};
use weft_e2e::{bin, ok, wait_for};

const READY: Duration = Duration::from_secs(5);

/// A testbed, failing loudly (not skipping) where namespaces cannot be made: CI runs as root.
fn testbed(hosts: usize) -> Testbed {
    assert!(
        Testbed::available(),
        "network namespaces are unavailable: these tests need root and a working `ip netns add`"
    );
    Testbed::new(hosts).expect("building the testbed")
}

fn http_echo(host: &Host, name: &str) -> Proc {
    let mut cmd = host.command(bin("weft-testapp"));
    cmd.args(["http-echo", "--listen", &host.sock(8080).to_string()])
        .args(["--name", name]);
    let p = host.spawn(name, cmd).expect("spawn http-echo");
    let addr = p.wait_listening(READY).expect("http-echo listening");
    assert_eq!(addr, host.sock(8080));
    p
}

/// `curl` inside `from`, giving up after `max_time` seconds.
fn curl(from: &Host, url: &str, max_time: &str) -> Output {
    from.run([
        "curl",
        "-sS",
        "-i",
        "--max-time",
        max_time,
        "--connect-timeout",
        max_time,
        url,
    ])
}

#[test]
fn hosts_reach_each_other_over_the_bridge() {
    let tb = testbed(2);
    let (h1, h2) = (tb.host(1), tb.host(2));
    assert_eq!(h1.addr.to_string(), "10.77.0.11");
    assert_eq!(h2.addr.to_string(), "10.77.0.12");
    let _echo = http_echo(h2, "h2-echo");

    let resp = ok(&curl(h1, "http://10.77.0.12:8080/hello/there", "3"));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("x-served-by: h2-echo\r\n"),
        "{resp}"
    );
    assert!(
        resp.ends_with("\r\n\r\nh2-echo GET /hello/there\n"),
        "{resp}"
    );

    // Keep-alive: curl reuses one connection for both requests (and says so).
    let out = h1.run([
        "curl",
        "-sS",
        "-v",
        "--max-time",
        "3",
        "http://10.77.0.12:8080/a",
        "http://10.77.0.12:8080/b",
    ]);
    assert_eq!(ok(&out), "h2-echo GET /a\nh2-echo GET /b\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Re-using existing connection"), "{err}");

    // /big streams exactly N bytes.
    let size = ok(&h1.run([
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        "http://10.77.0.12:8080/big?bytes=3000001",
    ]));
    assert_eq!(size, "200 3000001");
}

#[test]
fn cut_drops_traffic_and_restore_brings_it_back() {
    let tb = testbed(2);
    let (h1, h2) = (tb.host(1), tb.host(2));
    let _echo = http_echo(h2, "h2");
    ok(&curl(h1, "http://10.77.0.12:8080/", "2"));

    tb.cut(2).unwrap();
    let start = Instant::now();
    let out = curl(h1, "http://10.77.0.12:8080/", "1");
    let took = start.elapsed();
    // 28 is curl's "operation timed out": packets vanish, nothing refuses or resets.
    assert_eq!(
        out.status.code(),
        Some(28),
        "expected a timeout while cut: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(3), "curl took {took:?}");

    tb.restore(2).unwrap();
    wait_for("h1 -> h2 to work again", Duration::from_secs(10), || {
        curl(h1, "http://10.77.0.12:8080/", "1")
            .status
            .success()
            .then_some(())
    })
    .unwrap();
}

fn net_ns_inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

#[test]
fn netns_exec_keeps_the_pid() {
    let tb = testbed(1);
    let h1 = tb.host(1);
    let echo = http_echo(h1, "echo");
    let proc_dir = Path::new("/proc").join(echo.pid().to_string());
    // The PID we hold is weft-testapp itself, not an `ip` wrapper…
    assert_eq!(
        std::fs::read_link(proc_dir.join("exe")).unwrap(),
        bin("weft-testapp")
    );
    // …and it lives in the host's network namespace, not ours.
    let ns = net_ns_inode(&proc_dir.join("ns/net"));
    assert_eq!(ns, net_ns_inode(&Path::new("/run/netns").join(&h1.ns)));
    assert_ne!(ns, net_ns_inode(Path::new("/proc/self/ns/net")));

    // So SIGTERM reaches the program: it exits by that signal.
    let status = echo.term(Duration::from_secs(5)).unwrap();
    assert_eq!(status.signal(), Some(15), "{status:?}");
    assert!(!echo.is_running());
}

#[test]
fn a_pinned_host_runs_what_it_starts_on_its_cpus() {
    let tb = testbed(2);
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let all = cpus_allowed(&own).unwrap().to_owned();
    let rps = |h: usize| {
        let out = ok(&tb
            .host(h)
            .run(["cat", "/sys/class/net/eth0/queues/rx-0/rps_cpus"]));
        u128::from_str_radix(&out.trim().replace(',', ""), 16).unwrap()
    };
    assert_eq!(rps(1), 0, "receive steering is off before pinning");
    tb.pin(1, "0").unwrap();
    // The kernel's receive processing for host 1 goes to CPU 0 too; host 2 is left alone.
    assert_eq!(rps(1), 1);
    assert_eq!(rps(2), 0);
    // Spawned: still the program's own PID (taskset execs in place), on CPU 0 only.
    let echo = http_echo(tb.host(1), "echo");
    let proc_dir = Path::new("/proc").join(echo.pid().to_string());
    assert_eq!(
        std::fs::read_link(proc_dir.join("exe")).unwrap(),
        bin("weft-testapp")
    );
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    assert_eq!(cpus_allowed(&status), Some("0"));
    // Run: the same.
    let ran = ok(&tb.host(1).run(["cat", "/proc/self/status"]));
    assert_eq!(cpus_allowed(&ran), Some("0"));
    // The other host is not pinned.
    let ran = ok(&tb.host(2).run(["cat", "/proc/self/status"]));
    assert_eq!(cpus_allowed(&ran), Some(all.as_str()));
    // Pinning again replaces the list.
    tb.pin(1, &all).unwrap();
    let ran = ok(&tb.host(1).run(["cat", "/proc/self/status"]));
    assert_eq!(cpus_allowed(&ran), Some(all.as_str()));
    let every: u128 = parse_cpu_list(&all)
        .unwrap()
        .iter()
        .map(|c| 1u128 << c)
        .sum();
    assert_eq!(rps(1), every);
    // A list that is not one is refused, and changes nothing.
    assert!(tb.pin(1, "0-x").is_err());
    assert!(tb.pin(1, "3-1").is_err());
    assert_eq!(rps(1), every);
}

/// `ping` from host `from` to `to`: `count` echo requests 5 ms apart; the loss it reports, in %.
fn ping_loss(from: &Host, to: &Host, count: u32) -> f64 {
    let out = from.run([
        "ping",
        "-n",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        "0.005",
        "-W",
        "1",
        &to.addr.to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(", ")
        .find_map(|part| part.strip_suffix("% packet loss"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no loss figure in ping's output: {text}"))
}

#[test]
fn a_lossy_path_drops_a_share_of_its_packets_each_way_and_nothing_else() {
    let tb = testbed(3);
    let (h1, h2, h3) = (tb.host(1), tb.host(2), tb.host(3));
    assert_eq!(tb.lost(1).unwrap(), 0);
    tb.set_loss(1, 2, 30.0).unwrap();
    // 30 % each way: an echo and its answer both get through 49 % of the time.
    let loss = ping_loss(h1, h2, 200);
    assert!((25.0..=75.0).contains(&loss), "{loss} % lost");
    // Both directions drop, and count what they drop.
    assert!(tb.lost(1).unwrap() > 0 && tb.lost(2).unwrap() > 0);
    // Other paths are untouched.
    assert_eq!(ping_loss(h1, h3, 50), 0.0);
    assert_eq!(ping_loss(h3, h2, 50), 0.0);
    // Setting it again replaces it: 0 loses nothing.
    tb.set_loss(1, 2, 0.0).unwrap();
    assert_eq!(ping_loss(h1, h2, 50), 0.0);
    // Paths are set one by one: another path into host 2 leaves 1 -> 2 as it is.
    tb.set_loss(1, 2, 30.0).unwrap();
    tb.set_loss(3, 2, 0.0).unwrap();
    let lost = tb.lost(2).unwrap();
    assert!(ping_loss(h1, h2, 100) > 0.0);
    assert!(tb.lost(2).unwrap() > lost);
    assert_eq!(ping_loss(h3, h2, 50), 0.0);
    for bad in [100.0, 99.999, 0.001, -1.0, f64::NAN] {
        let e = tb.set_loss(1, 2, bad).unwrap_err().to_string();
        assert!(
            e.contains("0.01 %") || e.contains("percentage"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn drop_kills_processes_and_deletes_namespaces() {
    let tb = testbed(2);
    let namespaces = tb.namespaces().to_vec();
    assert_eq!(namespaces.len(), 3, "{namespaces:?}");
    let listed = ok(&std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap());
    for ns in &namespaces {
        assert!(listed.contains(ns.as_str()), "{ns} not in {listed}");
    }
    let echo = http_echo(tb.host(1), "echo");
    let mut cmd = tb.host(2).command(bin("weft-testapp"));
    cmd.args(["tcp-echo", "--listen", "10.77.0.12:9000"]);
    let tcp = tb.host(2).spawn("tcp-echo", cmd).unwrap();
    tcp.wait_listening(READY).unwrap();
    let pids = [echo.pid(), tcp.pid()];
    for pid in pids {
        assert!(Path::new(&format!("/proc/{pid}")).exists());
    }

    // The Procs are still alive (not dropped): the testbed must kill them itself.
    drop(tb);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived the testbed"
        );
    }
    assert!(!echo.is_running() && !tcp.is_running());
    let listed = ok(&std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap());
    for ns in &namespaces {
        assert!(!listed.contains(ns.as_str()), "{ns} still in {listed}");
    }
}

#[test]
fn parallel_testbeds_reuse_addresses_in_isolation() {
    let (a, b) = (testbed(2), testbed(2));
    assert!(
        a.namespaces().iter().all(|n| !b.namespaces().contains(n)),
        "{:?} {:?}",
        a.namespaces(),
        b.namespaces()
    );
    let _ea = http_echo(a.host(2), "in-a");
    let _eb = http_echo(b.host(2), "in-b");
    let body = |tb: &Testbed| {
        ok(&tb
            .host(1)
            .run(["curl", "-sS", "--max-time", "3", "http://10.77.0.12:8080/x"]))
    };
    assert_eq!(body(&a), "in-a GET /x\n");
    assert_eq!(body(&b), "in-b GET /x\n");
}

#[test]
fn tcp_echo_passes_half_close_on() {
    let tb = testbed(2);
    let (h1, h2) = (tb.host(1), tb.host(2));
    let mut cmd = h2.command(bin("weft-testapp"));
    cmd.args(["tcp-echo", "--listen", "10.77.0.12:0"]);
    let echo = h2.spawn("tcp-echo", cmd).unwrap();
    let addr = echo.wait_listening(READY).unwrap();
    assert_eq!(addr.ip(), h2.addr);

    let data = "half-close: bytes back, then EOF";
    // tcp-send only exits 0 once it has read EOF; without the echo's shutdown it times out.
    let out = h1.run([
        bin("weft-testapp").to_str().unwrap(),
        "tcp-send",
        "--to",
        &addr.to_string(),
        "--data",
        data,
        "--timeout",
        "3s",
    ]);
    assert_eq!(ok(&out), data);
}

#[test]
fn load_counts_successes_and_failures() {
    let tb = testbed(2);
    let (h1, h2) = (tb.host(1), tb.host(2));
    let _echo = http_echo(h2, "h2");
    let load = |url: &str| -> Value {
        let out = h1.run([
            bin("weft-testapp").to_str().unwrap(),
            "load",
            "--url",
            url,
            "--duration",
            "1s",
            "--interval",
            "20ms",
            "--timeout",
            "500ms",
        ]);
        serde_json::from_str(ok(&out).trim()).expect("one JSON line")
    };

    let v = load("http://10.77.0.12:8080/ping");
    let n = v["ok"].as_u64().unwrap();
    assert!(n >= 20, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    assert_eq!(v["served_by"], serde_json::json!({ "h2": n }), "{v}");

    // Nothing listens on 8081: every request fails, and the reason is reported.
    let v = load("http://10.77.0.12:8081/");
    assert_eq!(v["ok"], 0, "{v}");
    assert!(v["failed"].as_u64().unwrap() >= 20, "{v}");
    let errors = v["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("Connection refused")),
        "{v}"
    );
}
