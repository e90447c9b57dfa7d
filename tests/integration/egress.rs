//! Egress: payloads through a real forward proxy (Debian's tinyproxy) on loopback, with
//! credentials that never show, a no-proxy list that bypasses it, and the Agent's names
//! beating the standard ones; and an intake behind an internal CA made by openssl, trusted
//! with `--ca-bundle` (or SSL_CERT_FILE) and refused with the bundled roots.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use whippet::intake::{Intake, IntakeConfig};

use crate::support::{binary, intake, TempDir, Whippet, DEADLINE};

const PROXY_USER: &str = "whippet";
const PROXY_PASSWORD: &str = "pr0xy-s3cret";

/// A tinyproxy on loopback that asks for basic credentials, logging each request.
struct Tinyproxy {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Tinyproxy {
    /// tinyproxy takes no port 0: a port the OS just gave out is tried until one binds.
    fn start() -> Tinyproxy {
        let dir = TempDir::new();
        let log = dir.path("tinyproxy.log");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let conf = dir.path("tinyproxy.conf");
            std::fs::write(
                &conf,
                format!(
                    "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 20\nLogLevel Connect\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\n"
                ),
            )
            .unwrap();
            let out = std::fs::File::create(&log).unwrap();
            let mut child = Command::new("tinyproxy")
                .arg("-d")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("tinyproxy (the tests need it; .ci/run installs it)");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if TcpStream::connect(addr).is_ok() {
                    return Tinyproxy {
                        child,
                        addr,
                        log,
                        _dir: dir,
                    };
                }
                if child.try_wait().unwrap().is_some() {
                    break; // The port was taken meanwhile: another one.
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "tinyproxy never listened");
        }
    }

    /// The proxy's address with its credentials, as an operator writes it.
    fn url(&self) -> String {
        format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{}", self.addr)
    }

    /// Requests the proxy relayed to `target` so far.
    fn requests_to(&self, target: SocketAddr) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("Request (file descriptor") && l.contains(&target.to_string()))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_of(intake: &Intake) -> SocketAddr {
    intake.url().trim_start_matches("http://").parse().unwrap()
}

/// The body of `GET path` on a plain HTTP server.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Sends one gauge, stops whippet, and returns the values of `name` the intake holds and
/// what whippet wrote to stderr.
fn deliver(w: Whippet, intake: &Intake, name: &str) -> (Vec<f64>, Vec<String>) {
    w.send_unix(format!("{name}:7|g").as_bytes());
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let values = intake
        .store()
        .points()
        .into_iter()
        .filter(|p| p.metric == name)
        .map(|p| p.value)
        .collect();
    (values, s.stderr)
}

#[test]
fn payloads_go_through_the_proxy_whose_password_never_shows() {
    let proxy = Tinyproxy::start();
    let intake = intake(IntakeConfig::default());
    let target = addr_of(&intake);
    // The Agent's name wins over the standard one, which points nowhere.
    let env = [
        ("DD_PROXY_HTTP", proxy.url()),
        ("HTTP_PROXY", "http://127.0.0.1:9".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let w = Whippet::start_env(
        &["--dd-url", &intake.url(), "--status", "127.0.0.1:0"],
        &env,
    );
    let status = get(w.status.unwrap(), "/status");
    assert!(
        status.contains(&format!("\"proxy\":\"http://(redacted)@{}\"", proxy.addr)),
        "{status}"
    );
    let (values, stderr) = deliver(w, &intake, "proxied.gauge");
    assert_eq!(values, [7.0]);
    assert!(
        proxy.requests_to(target) >= 1,
        "{}",
        std::fs::read_to_string(&proxy.log).unwrap()
    );
    let started = stderr
        .iter()
        .find(|l| l.starts_with("whippet: forwarding to"))
        .unwrap();
    assert!(
        started.contains(&format!(
            "through the proxy http://(redacted)@{}",
            proxy.addr
        )),
        "{started}"
    );
    assert!(!status.contains(PROXY_PASSWORD));
    assert!(
        !stderr.iter().any(|l| l.contains(PROXY_PASSWORD)),
        "{stderr:?}"
    );
    let out = Command::new(binary())
        .env_clear()
        .env("DD_PROXY_HTTP", proxy.url())
        .arg("--check-config")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("http://(redacted)@127.0.0.1"), "{report}");
    assert!(!report.contains(PROXY_PASSWORD), "{report}");
    intake.stop();
}

#[test]
fn the_standard_proxy_variables_are_honoured_and_no_proxy_bypasses_the_proxy() {
    let proxy = Tinyproxy::start();
    let intake = intake(IntakeConfig::default());
    let target = addr_of(&intake);
    let url = proxy.url();
    let w = Whippet::start_env(&["--dd-url", &intake.url()], &[("HTTP_PROXY", &url)]);
    let (values, _) = deliver(w, &intake, "standard.gauge");
    assert_eq!(values, [7.0]);
    let through = proxy.requests_to(target);
    assert!(through >= 1);
    // The intake's address on the no-proxy list: straight there, the proxy sees nothing.
    for no_proxy in [
        ("NO_PROXY", "localhost,127.0.0.1"),
        ("DD_PROXY_NO_PROXY", "127.0.0.1"),
    ] {
        let name = format!("direct.{}", no_proxy.0.to_lowercase());
        let w = Whippet::start_env(
            &["--dd-url", &intake.url()],
            &[("HTTP_PROXY", &url), no_proxy],
        );
        let (values, _) = deliver(w, &intake, &name);
        assert_eq!(values, [7.0], "{no_proxy:?}");
        assert_eq!(proxy.requests_to(target), through, "{no_proxy:?}");
    }
    intake.stop();
}

/// A CA, and a certificate for 127.0.0.1 it signed, made by openssl in `dir`: (CA
/// certificate, server certificate, server key).
fn internal_ca(dir: &TempDir) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::write(
        dir.path("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir.0)
            .output()
            .expect("openssl (the tests need it; .ci/run installs it)");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=whippet test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    (
        dir.path("ca.pem"),
        dir.path("server.pem"),
        dir.path("server.key"),
    )
}

/// A TLS front for `target` with `cert` and `key`: each connection's requests are relayed
/// one at a time (the answer closes the connection). Returns its address.
fn tls_front(cert: &Path, key: &Path, target: SocketAddr) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let _ = relay_one(&mut tls, target);
            });
        }
    });
    addr
}

/// Reads one request from `client`, sends it to `target` asking it to close the
/// connection after its answer, and writes that answer back.
fn relay_one(client: &mut impl ReadWrite, target: SocketAddr) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + 4 + length {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let kept: Vec<&str> = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    let mut upstream = TcpStream::connect(target)?;
    let request = format!("{}\r\nConnection: close\r\n\r\n", kept.join("\r\n"));
    upstream.write_all(request.as_bytes())?;
    upstream.write_all(&buf[end + 4..end + 4 + length])?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    client.write_all(&answer)?;
    client.flush()
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[test]
fn an_intake_behind_an_internal_ca_is_trusted_with_its_bundle_and_refused_without() {
    let dir = TempDir::new();
    let (ca, cert, key) = internal_ca(&dir);
    let intake = intake(IntakeConfig::default());
    let front = tls_front(&cert, &key, addr_of(&intake));
    let url = format!("https://{front}");
    let ca_path = ca.display().to_string();
    // With the CA: delivered, also through the proxy (CONNECT) and by SSL_CERT_FILE.
    let w = Whippet::to_intake(&url, &["--ca-bundle", &ca_path]);
    assert_eq!(deliver(w, &intake, "ca.flag").0, [7.0]);
    let w = Whippet::start_env(&["--dd-url", &url], &[("SSL_CERT_FILE", &ca_path)]);
    assert_eq!(deliver(w, &intake, "ca.standard").0, [7.0]);
    let proxy = Tinyproxy::start();
    let proxy_url = proxy.url();
    let w = Whippet::start_env(
        &["--dd-url", &url, "--ca-bundle", &ca_path],
        &[("DD_PROXY_HTTPS", &proxy_url)],
    );
    assert_eq!(deliver(w, &intake, "ca.proxied").0, [7.0]);
    assert!(proxy.requests_to(front) >= 1);
    // With the bundled roots the internal CA is unknown: refused, retried, never sent.
    let w = Whippet::to_intake(
        &url,
        &["--shutdown-timeout", "300ms", "--retry-base-ms", "20"],
    );
    w.send_unix(b"ca.refused:1|g");
    let s = w.stop();
    assert!(s.status.success());
    let tls = r#"whippet_network_errors_total{endpoint="/api/v2/series",cause="tls"}"#;
    assert!(s.telemetry(tls) >= 1, "{:?}", s.stderr);
    assert!(!intake
        .store()
        .points()
        .iter()
        .any(|p| p.metric == "ca.refused"));
    // A bundle that holds no certificate stops the start, naming the setting.
    let out = Command::new(binary())
        .env_clear()
        .args([
            "--dd-url",
            &url,
            "--ca-bundle",
            &key.display().to_string(),
            "--check-config",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ca-bundle: ") && err.contains("holds no PEM certificate"),
        "{err}"
    );
    intake.stop();
}
