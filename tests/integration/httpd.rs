//! The HTTP edge over real sockets, written as raw bytes (a client library would hide the
//! framing): a panicking handler, bounded heads and bodies, chunked bodies, conflicting or
//! signed `Content-Length`s, HTTP/1.0, `Expect: 100-continue`, idle sockets past the connection
//! cap, slow heads, and the bytes in flight.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jobmirror::edge::httpd::{Handler, Limits, Request, Response, Server};

/// Answers with the body's length and the request count; `/boom` panics; `/slow` holds the
/// request until `release` is set.
#[derive(Default)]
struct Touchy {
    handled: AtomicUsize,
    release: std::sync::atomic::AtomicBool,
}

impl Handler for Touchy {
    fn handle(&self, req: Request) -> Response {
        self.handled.fetch_add(1, Ordering::SeqCst);
        match req.head.path.as_str() {
            "/boom" => panic!("handler bug"),
            "/slow" => {
                while !self.release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Response::text(200, "late")
            }
            _ => Response::text(200, &format!("got {} bytes", req.body.len())),
        }
    }
}

fn start(limits: Limits) -> (Server, Arc<Touchy>) {
    let h = Arc::new(Touchy::default());
    let s = Server::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        limits,
        h.clone(),
        "test-httpd",
    )
    .unwrap();
    (s, h)
}

/// Sends `request` and reads until the server closes (or 5 s).
fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

const OK: &[u8] = b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

#[test]
fn a_panic_is_a_500_for_that_request_only_and_heads_are_bounded() {
    let (server, _) = start(Limits {
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
    assert!(raw(addr, OK).starts_with("HTTP/1.1 200"));
    // hyper's smallest read buffer is 8 KiB: a head past it is 431.
    let big = format!(
        "GET /ok HTTP/1.1\r\nHost: x\r\nX-Flood: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    assert!(raw(addr, big.as_bytes()).starts_with("HTTP/1.1 431"));
    assert!(raw(addr, b"NONSENSE\r\n\r\n").starts_with("HTTP/1.1 400"));
    // Counted as the connection ends, just after the client read the answer.
    let t = Instant::now();
    while server.refusals().by_reason()[0].1 < 2 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.refusals().by_reason()[0].1, 2, "framing counted");
}

#[test]
fn chunked_bodies_are_decoded_and_conflicting_lengths_refused() {
    let (server, h) = start(Limits::default());
    let addr = server.local_addr();
    let chunked = b"POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let r = raw(addr, chunked);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("got 11 bytes"), "{r}");
    // Two different lengths: a request hidden in the body must never be answered.
    let before = h.handled.load(Ordering::SeqCst);
    let smuggle = b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcdGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n";
    let r = raw(addr, smuggle);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(!r.contains("200"), "{r}");
    assert_eq!(h.handled.load(Ordering::SeqCst), before, "nothing handled");
    for bad in ["+2", "-1", "2 2", "0x2"] {
        let req = format!("POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: {bad}\r\n\r\nab");
        let r = raw(addr, req.as_bytes());
        assert!(r.starts_with("HTTP/1.1 400"), "Content-Length {bad}: {r}");
    }
    assert_eq!(h.handled.load(Ordering::SeqCst), before);
}

#[test]
fn http_1_0_is_answered_and_closed_and_100_continue_is_sent() {
    let (server, _) = start(Limits::default());
    let addr = server.local_addr();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /ok HTTP/1.0\r\n\r\n").unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "an HTTP/1.0 request without keep-alive is closed after its answer"
    );
    // Expect: 100-continue: the interim answer comes before the body is sent.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut first = [0u8; 25];
    s.read_exact(&mut first).unwrap();
    assert!(
        String::from_utf8_lossy(&first).starts_with("HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    s.write_all(b"hello").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("200 OK") && rest.ends_with("got 5 bytes"),
        "{rest}"
    );
}

#[test]
fn idle_sockets_past_the_cap_make_room_and_busy_ones_are_never_cut() {
    let (server, h) = start(Limits {
        connections_max: 8,
        ..Limits::default()
    });
    let addr = server.local_addr();
    // One request in progress, held by the handler.
    let mut busy = TcpStream::connect(addr).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    while h.handled.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(2));
    }
    // Fifty idle sockets, and a partial head on some of them: far past the cap.
    let mut idle: Vec<TcpStream> = (0..50)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            if i % 2 == 0 {
                let _ = s.write_all(b"POST /ok HTTP/1.1\r\nHost: ");
            }
            s
        })
        .collect();
    // Each request still gets its answer.
    for _ in 0..5 {
        let r = raw(addr, OK);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert!(
        server.active_connections() <= 8 + 8 + 1,
        "{} held",
        server.active_connections()
    );
    let evicted = server.refusals().by_reason()[4].1;
    assert!(evicted >= 40, "the idlest were closed: {evicted}");
    // The request in progress was never cut.
    h.release.store(true, Ordering::SeqCst);
    let mut out = Vec::new();
    let _ = busy.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("late"),
        "{out}"
    );
    idle.clear();
}

#[test]
fn bodies_are_bounded_announced_or_chunked_and_by_the_bytes_in_flight() {
    let (server, h) = start(Limits {
        body_bytes_max: 1000,
        inflight_bytes_max: 4 * 1024,
        ..Limits::default()
    });
    let addr = server.local_addr();
    // Announced too big: 413 at once, and the client sees it (what it sends is drained).
    let mut req = b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".to_vec();
    req.extend(vec![b'a'; 5000]);
    let r = raw(addr, &req);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    // Chunked past the bound: 413 while it is read.
    let mut req = b"POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend(b"200\r\n");
        req.extend(vec![b'b'; 0x200]);
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\n\r\n");
    let r = raw(addr, &req);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    // Five clients each announce 1000 bytes and send one: four fit in 4 KiB of bodies in
    // flight, the fifth is told to come back.
    let mut slow: Vec<TcpStream> = Vec::new();
    let mut refused = 0;
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.write_all(b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\na")
            .unwrap();
        let mut buf = [0u8; 256];
        if let Ok(n) = s.read(&mut buf) {
            let r = String::from_utf8_lossy(&buf[..n]);
            if r.starts_with("HTTP/1.1 503") {
                assert!(r.contains("retry-after: 1"), "{r}");
                refused += 1;
            }
        }
        slow.push(s);
    }
    assert_eq!(refused, 1);
    assert_eq!(server.refusals().by_reason()[3].1, 1);
    assert_eq!(h.handled.load(Ordering::SeqCst), 0);
    // Once they finish, room comes back.
    drop(slow);
    let mut ok = String::new();
    for _ in 0..100 {
        ok = raw(
            addr,
            b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        );
        if ok.starts_with("HTTP/1.1 200") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok.ends_with("got 3 bytes"), "{ok}");
}

#[test]
fn a_head_that_never_ends_is_closed_after_the_header_timeout() {
    let (server, _) = start(Limits {
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(30),
        ..Limits::default()
    });
    let addr = server.local_addr();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        t.elapsed()
    );
    let _ = server;
}
