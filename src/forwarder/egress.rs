//! How requests leave this machine: through which proxy (the Agent's `DD_PROXY_*`, else the
//! standard `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`), trusting which certificates
//! (`--ca-bundle`). Chosen deliberately: the HTTP client's own reading of the environment
//! is never used.

use std::path::PathBuf;

use ureq::tls::{parse_pem, Certificate, PemItem, RootCerts, TlsConfig};
use ureq::ProxyProtocol;

/// Where the distributions keep their CA bundle, in the order tried: Debian and Ubuntu,
/// RHEL and Fedora (two places), SUSE.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
];

/// The certificates an HTTPS intake or proxy must chain to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Roots {
    /// Mozilla's roots, built into whippet.
    #[default]
    Bundled,
    /// The distribution's CA bundle ([`SYSTEM_BUNDLES`]).
    System,
    /// A PEM file, trusted alone.
    File(PathBuf),
}

impl Roots {
    /// `bundled`, `system`, or a path.
    pub fn parse(v: &str) -> Roots {
        match v.trim() {
            "" | "bundled" => Roots::Bundled,
            "system" => Roots::System,
            path => Roots::File(PathBuf::from(path)),
        }
    }

    /// The certificates to trust in place of the bundled roots, or `None` to keep them.
    pub fn load(&self) -> Result<Option<Vec<Certificate<'static>>>, String> {
        let path = match self {
            Roots::Bundled => return Ok(None),
            Roots::File(p) => p.clone(),
            Roots::System => SYSTEM_BUNDLES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    format!(
                        "no system CA bundle found (looked for {}); install the ca-certificates package or name a PEM file",
                        SYSTEM_BUNDLES.join(", ")
                    )
                })?,
        };
        let pem =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs: Vec<Certificate<'static>> = parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
        Ok(Some(certs))
    }
}

/// Proxies and trust, shared by every forwarder.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Egress {
    /// For `https://` intakes.
    pub proxy_https: Option<String>,
    /// For `http://` intakes.
    pub proxy_http: Option<String>,
    /// Hosts reached directly: exact names or addresses, `.suffix` or `*.suffix`, or `*`.
    pub no_proxy: Vec<String>,
    pub roots: Roots,
}

/// Proxy addresses may carry a password: shown redacted, even by `{:?}`.
impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |p: &Option<String>| p.as_deref().map(super::redact_url);
        f.debug_struct("Egress")
            .field("proxy_https", &shown(&self.proxy_https))
            .field("proxy_http", &shown(&self.proxy_http))
            .field("no_proxy", &self.no_proxy)
            .field("roots", &self.roots)
            .finish()
    }
}

/// A proxy address as the HTTP client reads it; only http:// and https:// proxies. Errors
/// show the address without its password.
pub fn parse_proxy(address: &str) -> Result<ureq::Proxy, String> {
    let shown = super::redact_url(address);
    let parsed = ureq::Proxy::new(address).map_err(|e| format!("{shown}: {e}"))?;
    match parsed.protocol() {
        ProxyProtocol::Http | ProxyProtocol::Https => Ok(parsed),
        _ => Err(format!(
            "{shown}: only http:// and https:// proxies are supported"
        )),
    }
}

impl Egress {
    /// The proxy for an intake at `url` (by its scheme), if any.
    pub fn proxy_url(&self, url: &str) -> Option<&str> {
        let p = if url.starts_with("https://") {
            &self.proxy_https
        } else {
            &self.proxy_http
        };
        p.as_deref().filter(|p| !p.is_empty())
    }

    /// The HTTP client's proxy for an intake at `url`, with the no-proxy list.
    pub fn proxy(&self, url: &str) -> Result<Option<ureq::Proxy>, String> {
        let Some(address) = self.proxy_url(url) else {
            return Ok(None);
        };
        let invalid = |e: ureq::Error| format!("{}: {e}", super::redact_url(address));
        let parsed = parse_proxy(address)?;
        let mut b = ureq::Proxy::builder(parsed.protocol())
            .host(parsed.host())
            .port(parsed.port());
        if let Some(user) = parsed.username() {
            b = b.username(user);
        }
        if let Some(password) = parsed.password() {
            b = b.password(password);
        }
        for host in &self.no_proxy {
            b = b.no_proxy(host);
        }
        b.build().map(Some).map_err(invalid)
    }

    /// The TLS settings: the roots chosen.
    pub fn tls(&self) -> Result<TlsConfig, String> {
        let builder = TlsConfig::builder();
        Ok(match self.roots.load()? {
            Some(certs) => builder.root_certs(RootCerts::new_with_certs(&certs)),
            None => builder,
        }
        .build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_follows_the_intakes_scheme_and_its_password_is_never_shown() {
        let e = Egress {
            proxy_https: Some("http://user:pw@proxy.example:3128".into()),
            proxy_http: Some("http://plain.example:8080".into()),
            no_proxy: vec!["intake.internal".into()],
            roots: Roots::Bundled,
        };
        let https = e.proxy("https://app.datadoghq.com").unwrap().unwrap();
        assert_eq!((https.host(), https.port()), ("proxy.example", 3128));
        assert_eq!(
            (https.username(), https.password()),
            (Some("user"), Some("pw"))
        );
        let http = e.proxy("http://127.0.0.1:8080").unwrap().unwrap();
        assert_eq!(http.host(), "plain.example");
        let uri: ureq::http::Uri = "https://intake.internal/api".parse().unwrap();
        assert!(https.is_no_proxy(&uri));
        assert!(!https.is_no_proxy(&"https://app.datadoghq.com/".parse().unwrap()));
        let shown = format!("{e:?}");
        assert!(!shown.contains("pw"), "{shown}");
        assert!(Egress::default().proxy("https://x").unwrap().is_none());
        let socks = Egress {
            proxy_https: Some("socks5://proxy.example:1080".into()),
            ..Egress::default()
        };
        let err = socks.proxy("https://x").unwrap_err();
        assert!(
            err.ends_with("only http:// and https:// proxies are supported"),
            "{err}"
        );
    }

    #[test]
    fn roots_are_the_bundled_ones_the_systems_or_a_files_which_must_hold_a_certificate() {
        assert_eq!(Roots::parse("bundled"), Roots::Bundled);
        assert_eq!(Roots::parse("system"), Roots::System);
        assert_eq!(
            Roots::parse("/etc/ca.pem"),
            Roots::File("/etc/ca.pem".into())
        );
        assert!(Roots::Bundled.load().unwrap().is_none());
        let dir = std::env::temp_dir().join(format!("whippet-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = Roots::File(empty.clone()).load().unwrap_err();
        assert_eq!(err, format!("{} holds no PEM certificate", empty.display()));
        let missing = Roots::File(dir.join("missing.pem")).load().unwrap_err();
        assert!(missing.starts_with("cannot read "), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
