//! HTTP agents for every client jobmirror runs (the Pleo client, the OAuth token client, the
//! fake's webhook sender and the bench's senders).
//!
//! ureq resolves the host on every request, even when it then reuses a pooled connection, and
//! when a timeout is set it runs each lookup on a new thread so that it can give up on it: one
//! thread started and ended per request. `perf sched` during webhook ingest showed
//! about 4,500 such threads a second in the bench and 1,100 a second in the service's sync
//! thread (see BENCHMARKS.md). A host written as an IP address needs no lookup, so
//! [`LiteralFirst`] answers it in place; a name still goes to ureq's own resolver, with its
//! timeout. [`check_base_url`] refuses a base URL that would send a credential in the clear.

use std::net::{IpAddr, SocketAddr};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// Resolves IP-literal hosts without a lookup (and without a thread); names as ureq does.
#[derive(Debug, Default)]
pub struct LiteralFirst {
    names: DefaultResolver,
}

impl LiteralFirst {
    /// The address of an IP-literal host with its port (explicit, or the scheme's default).
    fn literal(uri: &Uri) -> Option<SocketAddr> {
        let authority = uri.authority()?;
        let host = authority.host();
        // An IPv6 literal is written in brackets in a URI.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ip: IpAddr = host.parse().ok()?;
        let port = authority.port_u16().or(match uri.scheme_str()? {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        })?;
        Some(SocketAddr::new(ip, port))
    }
}

impl Resolver for LiteralFirst {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        match Self::literal(uri) {
            Some(addr) => {
                let mut out = self.empty();
                out.push(addr);
                Ok(out)
            }
            None => self.names.resolve(uri, config, timeout),
        }
    }
}

/// An agent with `config`, ureq's default connector and the [`LiteralFirst`] resolver.
pub fn agent(config: Config) -> ureq::Agent {
    ureq::Agent::with_parts(config, DefaultConnector::default(), LiteralFirst::default())
}

/// Refuses a base URL that is not HTTPS, unless its host is loopback.
pub fn check_base_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not an absolute URL"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(stripped) = authority.strip_prefix('[') {
        stripped.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    match scheme {
        "https" => Ok(()),
        "http" if is_loopback_host(host) => Ok(()),
        "http" => Err(format!(
            "refusing plain http to {host}: Pleo must be reached over https (plain http is allowed only on loopback)"
        )),
        other => Err(format!("unsupported URL scheme {other:?}")),
    }
}

fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Option<SocketAddr> {
        LiteralFirst::literal(&s.parse::<Uri>().unwrap())
    }

    #[test]
    fn ip_literals_resolve_in_place_with_their_ports() {
        assert_eq!(
            lit("http://127.0.0.1:8080/v3/export-jobs"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            lit("http://10.1.2.3/x"),
            Some("10.1.2.3:80".parse().unwrap())
        );
        assert_eq!(
            lit("https://10.1.2.3/x"),
            Some("10.1.2.3:443".parse().unwrap())
        );
        assert_eq!(lit("http://[::1]:9/x"), Some("[::1]:9".parse().unwrap()));
    }

    /// A server that answers every request with 204, keeping connections open.
    fn answering_204() -> u16 {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut out) = conn else { return };
                std::thread::spawn(move || {
                    let mut lines = BufReader::new(out.try_clone().unwrap());
                    let mut line = String::new();
                    while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if line == "\r\n" {
                            let _ = out.write_all(b"HTTP/1.1 204 No Content\r\n\r\n");
                        }
                        line.clear();
                    }
                });
            }
        });
        port
    }

    #[test]
    fn an_agent_reaches_a_server_by_address_and_by_name() {
        let port = answering_204();
        let agent = agent(
            ureq::Agent::config_builder()
                .timeout_global(Some(std::time::Duration::from_secs(5)))
                .build(),
        );
        for host in ["127.0.0.1", "localhost", "127.0.0.1"] {
            let got = agent.get(&format!("http://{host}:{port}/")).call();
            assert_eq!(got.map(|r| r.status().as_u16()).ok(), Some(204), "{host}");
        }
    }

    #[test]
    fn names_are_left_to_the_lookup() {
        assert_eq!(lit("https://external.pleo.io/v3/export-jobs"), None);
        assert_eq!(lit("http://localhost:8080/"), None);
    }
}
