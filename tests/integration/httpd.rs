//! The HTTP server's own limits, over real sockets: a panicking handler, oversized heads,
//! the connection cap.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use jobmirror::edge::httpd::{Handler, Limits, Request, Response, Server};

struct Touchy;

impl Handler for Touchy {
    fn handle(&self, req: Request) -> Response {
        if req.head.path == "/boom" {
            panic!("handler bug");
        }
        Response::text(200, "fine")
    }
}

fn start(limits: Limits) -> Server {
    Server::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        limits,
        Arc::new(Touchy),
        "test-httpd",
    )
    .unwrap()
}

fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_panic_is_a_500_for_that_request_only_and_heads_are_bounded() {
    let server = start(Limits {
        header_bytes_max: 1024,
        ..Limits::default()
    });
    let addr = server.local_addr();
    assert!(
        raw(
            addr,
            b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .starts_with("HTTP/1.1 500")
    );
    assert!(
        raw(
            addr,
            b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .starts_with("HTTP/1.1 200")
    );
    let big = format!(
        "GET /ok HTTP/1.1\r\nHost: x\r\nX-Flood: {}\r\n\r\n",
        "a".repeat(4096)
    );
    assert!(raw(addr, big.as_bytes()).starts_with("HTTP/1.1 431"));
    let chunked = b"POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert!(raw(addr, chunked).starts_with("HTTP/1.1 501"));
    assert!(raw(addr, b"NONSENSE\r\n\r\n").starts_with("HTTP/1.1 400"));
}

#[test]
fn connections_over_the_cap_get_503_and_the_server_recovers() {
    let server = start(Limits {
        connections_max: 2,
        ..Limits::default()
    });
    let addr = server.local_addr();
    let a = TcpStream::connect(addr).unwrap();
    let b = TcpStream::connect(addr).unwrap();
    // Both are being served (idle); a third is refused at once, not queued.
    let mut third = String::new();
    for _ in 0..50 {
        third = raw(
            addr,
            b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if third.starts_with("HTTP/1.1 503") {
            break;
        }
    }
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    assert!(third.contains("Retry-After"));
    drop((a, b));
    let mut ok = String::new();
    for _ in 0..200 {
        ok = raw(
            addr,
            b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if ok.starts_with("HTTP/1.1 200") {
            break;
        }
    }
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}
