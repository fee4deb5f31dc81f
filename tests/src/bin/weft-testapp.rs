//! `weft-testapp`: the workloads and clients of the end-to-end tests. It runs inside testbed
//! hosts (`ip netns exec HOST weft-testapp …`), so it is one static-ish binary with no runtime
//! dependencies on the host (no python, nc or curl needed for the checks it does).
//!
//! Servers print `listening on ADDR` (the bound address, so `:0` works) on stdout once they
//! accept connections; tests wait for that line.
//!
//! - `http-echo --listen ADDR --name NAME`: HTTP/1.1 with keep-alive. Every request gets 200,
//!   header `x-served-by: NAME` and body `NAME <METHOD> <PATH>\n`; `GET /big?bytes=N` answers N
//!   bytes of `x` instead (streamed, for throughput checks); `GET /slow?ms=N` answers as usual
//!   after N ms (requests in flight for a while, for drain checks).
//! - `tcp-echo --listen ADDR`: echoes bytes until the peer's EOF, then shuts down its own write
//!   side (a half-close is passed on, not turned into a reset).
//! - `tcp-reset --listen ADDR`: reads from each connection until some bytes arrived, then
//!   resets it (RST, not FIN).
//! - `tcp-send --to ADDR --data STR [--timeout 5s]`: connects, writes STR, shuts down its write
//!   side, reads until EOF and prints exactly what it read (no newline added). Exits 1 on an
//!   error or when the timeout passes before EOF.
//! - `tcp-check --to ADDR --bytes N [--timeout 30s]`: connects to an echo, writes N
//!   pseudo-random bytes (a fixed sequence) while reading the echo back, half-closes, and
//!   checks that exactly those bytes came back before EOF. Prints one JSON line
//!   `{"bytes":N,"secs":S}` and exits 0, or exits 1 naming the first byte that differs.
//! - `tcp-chat --to ADDR --every 200ms --duration 15s [--timeout 2s]`: ONE connection for the
//!   whole duration; every interval it writes a line and reads it back, checking the echo.
//!   Prints `connected to ADDR` once connected, and at the end one JSON line
//!   `{"sent":N,"echoed":M,"error":null|"..."}` (stopping at the first error) and exits 0.
//! - `load --url http://HOST:PORT/PATH --duration 30s --interval 20ms [--timeout 2s]`: starts one
//!   `GET` every interval, each on a fresh TCP connection, and at the end prints one JSON line
//!   `{"ok":N,"failed":M,"errors":["..."],"served_by":{"NAME":count}}` and exits 0; the test
//!   judges the numbers.
//! - `quic-get --to IP:PORT --service S --mesh M --cert C --key K --ca BUNDLE [--path P]`: one
//!   HTTP/1.0 GET over weft's QUIC transport (weft-dp's own client code) presenting the given
//!   certificate; prints the response, or exits 1 naming why the stream was refused.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(
    name = "weft-testapp",
    about = "Workloads and clients for weft's end-to-end tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP/1.1 server answering `NAME <METHOD> <PATH>` with `x-served-by: NAME`.
    HttpEcho {
        /// Address to listen on (port 0 picks one; the bound address is printed).
        #[arg(long)]
        listen: SocketAddr,
        /// The name put in bodies and in `x-served-by`.
        #[arg(long)]
        name: String,
    },
    /// TCP echo that passes a half-close on.
    TcpEcho {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Resets every connection once it has received some bytes.
    TcpReset {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Writes DATA, half-closes, prints everything read until EOF.
    TcpSend {
        /// Where to connect (IP:PORT or HOST:PORT).
        #[arg(long)]
        to: String,
        /// What to send.
        #[arg(long)]
        data: String,
        /// Deadline for the whole exchange.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Writes N pseudo-random bytes to an echo while reading them back; checks every byte.
    TcpCheck {
        /// Where to connect (IP:PORT or HOST:PORT).
        #[arg(long)]
        to: String,
        /// How many bytes to send (and expect back).
        #[arg(long)]
        bytes: u64,
        /// Deadline for the whole exchange.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// One connection for the whole duration, a line echoed every interval; prints a JSON
    /// summary.
    TcpChat {
        /// Where to connect (IP:PORT or HOST:PORT).
        #[arg(long)]
        to: String,
        /// Time between lines.
        #[arg(long, value_parser = humantime::parse_duration)]
        every: Duration,
        /// How long to keep the connection and send lines.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Deadline of the connect and of each echo.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// One request per interval on fresh connections; prints a JSON summary.
    Load {
        /// `http://HOST:PORT/PATH`.
        #[arg(long)]
        url: Uri,
        /// How long to keep starting requests.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Time between request starts.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Deadline of one request (connect + response + body).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// One HTTP/1.0 GET over weft's QUIC transport with the given certificate.
    QuicGet {
        /// The inbound (IP:PORT).
        #[arg(long)]
        to: SocketAddr,
        /// The service whose SPIFFE id the server must hold.
        #[arg(long)]
        service: String,
        /// The mesh (trust domain).
        #[arg(long)]
        mesh: String,
        /// Client certificate chain (PEM).
        #[arg(long)]
        cert: std::path::PathBuf,
        /// Its key (PEM).
        #[arg(long)]
        key: std::path::PathBuf,
        /// Roots the server's certificate must chain to (PEM).
        #[arg(long)]
        ca: std::path::PathBuf,
        /// Request path.
        #[arg(long, default_value = "/")]
        path: String,
        /// Deadline of the whole exchange.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-testapp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::HttpEcho { listen, name } => http_echo(listen, name).await,
            Cmd::TcpEcho { listen } => tcp_echo(listen).await,
            Cmd::TcpReset { listen } => tcp_reset(listen).await,
            Cmd::TcpSend { to, data, timeout } => tcp_send(&to, &data, timeout).await,
            Cmd::TcpCheck { to, bytes, timeout } => tcp_check(&to, bytes, timeout).await,
            Cmd::TcpChat {
                to,
                every,
                duration,
                timeout,
            } => tcp_chat(&to, every, duration, timeout).await,
            Cmd::Load {
                url,
                duration,
                interval,
                timeout,
            } => load(url, duration, interval, timeout).await,
            Cmd::QuicGet {
                to,
                service,
                mesh,
                cert,
                key,
                ca,
                path,
                timeout,
            } => {
                let files = QuicFiles {
                    cert: std::fs::read_to_string(cert)?,
                    key: std::fs::read_to_string(key)?,
                    ca: std::fs::read_to_string(ca)?,
                };
                tokio::time::timeout(timeout, quic_get(to, &service, &mesh, files, &path))
                    .await
                    .context("timed out")?
            }
        }
    })
}

/// Binds and announces the bound address on stdout (flushed: stdout is usually a log file).
async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {}", l.local_addr()?)?;
    out.flush()?;
    Ok(l)
}

type Body = BoxBody<Bytes, Infallible>;

async fn http_echo(listen: SocketAddr, name: String) -> anyhow::Result<()> {
    let listener = bind(listen).await?;
    let name: Arc<str> = name.into();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let name = name.clone();
                async move {
                    if req.uri().path() == "/slow" {
                        let ms = query_u64(req.uri(), "ms").unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Ok::<_, Infallible>(echo_response(&name, &req))
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
}

fn echo_response(name: &str, req: &Request<Incoming>) -> Response<Body> {
    let body = if req.uri().path() == "/big" {
        match big_bytes(req.uri()) {
            Some(n) => big_body(n),
            None => {
                return Response::builder()
                    .status(400)
                    .header("x-served-by", name)
                    .body(Full::from("/big needs ?bytes=N\n").boxed())
                    .unwrap_or_default();
            }
        }
    } else {
        Full::from(format!("{name} {} {}\n", req.method(), req.uri().path())).boxed()
    };
    Response::builder()
        .header("x-served-by", name)
        .body(body)
        .unwrap_or_default()
}

fn big_bytes(uri: &Uri) -> Option<u64> {
    query_u64(uri, "bytes")
}

/// The value of `key=N` in the query.
fn query_u64(uri: &Uri, key: &str) -> Option<u64> {
    uri.query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find_map(|(k, v)| (k == key).then_some(v))?
        .parse()
        .ok()
}

/// N bytes of `x`, streamed in 64 KiB frames (one shared buffer) with a content-length.
fn big_body(n: u64) -> Body {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let frames = (0..n.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(n - i * CHUNK) as usize;
        Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
    });
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

async fn tcp_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = bind(listen).await?;
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let res = async {
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await
            }
            .await;
            if let Err(e) = res {
                eprintln!("echo for {peer}: {e}");
            }
        });
    }
}

async fn tcp_reset(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = bind(listen).await?;
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            // Linger 0: close sends a RST.
            let _ = stream.set_zero_linger();
            drop(stream);
        });
    }
}

async fn tcp_send(to: &str, data: &str, timeout: Duration) -> anyhow::Result<()> {
    let got = tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(to)
            .await
            .with_context(|| format!("connecting to {to}"))?;
        s.write_all(data.as_bytes()).await.context("writing")?;
        s.shutdown().await.context("shutting down the write side")?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.context("reading until EOF")?;
        anyhow::Ok(got)
    })
    .await
    .with_context(|| format!("no EOF from {to} within {timeout:?}"))??;
    let mut out = std::io::stdout().lock();
    out.write_all(&got)?;
    out.flush()?;
    Ok(())
}

/// The `tcp-check` sequence: xorshift64 from a fixed seed, 8 bytes per step, so that a
/// byte lost, repeated or moved shows.
struct Pattern(u64);

impl Pattern {
    fn new() -> Pattern {
        Pattern(0x9e37_79b9_7f4a_7c15)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

async fn tcp_check(to: &str, bytes: u64, timeout: Duration) -> anyhow::Result<()> {
    const CHUNK: usize = 64 * 1024;
    let start = std::time::Instant::now();
    tokio::time::timeout(timeout, async {
        let s = TcpStream::connect(to)
            .await
            .with_context(|| format!("connecting to {to}"))?;
        let (mut r, mut w) = s.into_split();
        let write = async move {
            let (mut pattern, mut buf) = (Pattern::new(), vec![0u8; CHUNK]);
            let mut left = bytes;
            while left > 0 {
                // Chunks are whole multiples of 8 bytes but the last, so the sequence does
                // not depend on where writes are cut.
                let n = CHUNK.min(usize::try_from(left).unwrap_or(CHUNK));
                pattern.fill(&mut buf[..n]);
                w.write_all(&buf[..n]).await.context("writing")?;
                left -= n as u64;
            }
            w.shutdown().await.context("shutting down the write side")
        };
        let read = async move {
            let (mut pattern, mut want, mut got) =
                (Pattern::new(), vec![0u8; CHUNK], vec![0u8; CHUNK]);
            let mut at = 0u64;
            loop {
                let n = r
                    .read(&mut got)
                    .await
                    .with_context(|| format!("reading the echo after {at} of {bytes} bytes"))?;
                if n == 0 {
                    break;
                }
                let mut seen = 0;
                while seen < n {
                    // Compare against the sequence in the writer's chunking.
                    let in_chunk = (at % CHUNK as u64) as usize;
                    if in_chunk == 0 {
                        let len =
                            CHUNK.min(usize::try_from(bytes - at.min(bytes)).unwrap_or(CHUNK));
                        pattern.fill(&mut want[..len]);
                    }
                    let take = (n - seen).min(CHUNK - in_chunk);
                    if at + take as u64 > bytes {
                        bail!("the echo is longer than the {bytes} bytes sent");
                    }
                    if let Some(k) = (0..take).find(|&k| got[seen + k] != want[in_chunk + k]) {
                        bail!(
                            "byte {} of the echo differs from what was sent",
                            at + k as u64
                        );
                    }
                    seen += take;
                    at += take as u64;
                }
            }
            ensure!(at == bytes, "EOF after {at} of {bytes} bytes");
            anyhow::Ok(())
        };
        tokio::try_join!(write, read)?;
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("{to}: the echo of {bytes} bytes took longer than {timeout:?}"))??;
    println!(
        "{}",
        serde_json::json!({"bytes": bytes, "secs": start.elapsed().as_secs_f64()})
    );
    Ok(())
}

async fn tcp_chat(
    to: &str,
    every: Duration,
    duration: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    let (mut sent, mut echoed) = (0u64, 0u64);
    let result = async {
        let s = tokio::time::timeout(timeout, TcpStream::connect(to))
            .await
            .map_err(|_| format!("connect {to}: timed out after {timeout:?}"))?
            .map_err(|e| format!("connect {to}: {e}"))?;
        let _ = s.set_nodelay(true);
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "connected to {to}");
            let _ = out.flush();
        }
        let (r, mut w) = s.into_split();
        let mut r = tokio::io::BufReader::new(r);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = tokio::time::Instant::now() + duration;
        let mut line = String::new();
        loop {
            tick.tick().await;
            if tokio::time::Instant::now() >= end {
                return Ok(());
            }
            let msg = format!("line {sent}\n");
            w.write_all(msg.as_bytes())
                .await
                .map_err(|e| format!("write of line {sent}: {e}"))?;
            sent += 1;
            line.clear();
            let n = tokio::time::timeout(timeout, r.read_line(&mut line))
                .await
                .map_err(|_| format!("no echo of line {} within {timeout:?}", sent - 1))?
                .map_err(|e| format!("read of line {}: {e}", sent - 1))?;
            if n == 0 {
                return Err(format!("EOF instead of the echo of line {}", sent - 1));
            }
            if line != msg {
                return Err(format!("echo {line:?} instead of {msg:?}"));
            }
            echoed += 1;
        }
    }
    .await;
    let summary = serde_json::json!({
        "sent": sent,
        "echoed": echoed,
        "error": result.err(),
    });
    println!("{summary}");
    Ok(())
}

/// Tallies of `load`.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// Distinct error messages in first-seen order (at most [`MAX_ERRORS`]).
    errors: Vec<String>,
    served_by: BTreeMap<String, u64>,
}

const MAX_ERRORS: usize = 20;

async fn load(
    url: Uri,
    duration: Duration,
    interval: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    if url.scheme_str() != Some("http") {
        bail!("--url must be http://HOST:PORT/PATH, got {url}");
    }
    let Some(authority) = url.authority().cloned() else {
        bail!("--url has no host: {url}");
    };
    let target = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let path = url
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = tokio::time::Instant::now() + duration;
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        tick.tick().await;
        if tokio::time::Instant::now() >= end {
            break;
        }
        let (target, path, host) = (target.clone(), path.clone(), authority.to_string());
        let tally = tally.clone();
        inflight.spawn(async move {
            let r = tokio::time::timeout(timeout, one_request(&target, &host, &path)).await;
            let r = r.unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")));
            // Poisoning needs a panic while holding the lock; none of the code below panics.
            let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
            match r {
                Ok(served_by) => {
                    t.ok += 1;
                    *t.served_by.entry(served_by).or_default() += 1;
                }
                Err(e) => {
                    t.failed += 1;
                    if t.errors.len() < MAX_ERRORS && !t.errors.contains(&e) {
                        t.errors.push(e);
                    }
                }
            }
        });
        // Reap finished tasks so the set does not grow for the whole run.
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let summary = serde_json::json!({
        "ok": t.ok,
        "failed": t.failed,
        "errors": t.errors,
        "served_by": t.served_by,
    });
    println!("{summary}");
    Ok(())
}

/// `GET path` on a fresh connection; the `x-served-by` of a 2xx answer whose body arrived whole.
async fn one_request(target: &str, host: &str, path: &str) -> Result<String, String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let served_by = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    Ok(served_by)
}

/// PEM inputs of `quic-get`.
struct QuicFiles {
    cert: String,
    key: String,
    ca: String,
}

async fn quic_get(
    to: SocketAddr,
    service: &str,
    mesh: &str,
    files: QuicFiles,
    path: &str,
) -> anyhow::Result<()> {
    use weft_dp::identity::manager::Credentials;
    use weft_dp::proxy::{quic::QuicClient, tls::TlsState};
    let creds = Credentials {
        cert_chain_pem: files.cert,
        key_pem: files.key,
        trust_bundle_pem: files.ca.clone(),
        not_before: 0,
        not_after: 0,
        spiffe_ids: Vec::new(),
    };
    let tls = TlsState::new(1, mesh, &creds, &files.ca)?;
    let client = QuicClient::default();
    eprintln!("quic-get: connecting to {to}");
    let mut s = client
        .open(to, service, &tls, Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!("quic-get: stream accepted");
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    // HTTP/1.0: the server closes after the response. No half-close before it: hyper (the
    // http-echo server) drops a response when it reads EOF first.
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    s.shutdown().await?;
    std::io::stdout().write_all(&out)?;
    Ok(())
}
