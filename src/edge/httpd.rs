//! A small blocking HTTP/1.1 server for the fake Pleo and (later) the webhook receiver.
//!
//! Invariants: at most `connections_max` connections are served at once (more are answered
//! 503 and closed, never queued without bound); a client gets `header_timeout` to send a
//! request head and `body_timeout` for its body, and an idle keep-alive connection is closed
//! after `idle_timeout`; a head over `header_bytes_max` is 431 and a body over
//! `body_bytes_max` is 413 without reading it; an accept error never stops the accept loop;
//! a panic in a handler is a 500 for that request only.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::clock::monotonic;

#[derive(Clone, Debug)]
pub struct Limits {
    pub connections_max: usize,
    pub header_bytes_max: usize,
    pub body_bytes_max: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 256,
            header_bytes_max: 16 * 1024,
            body_bytes_max: 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The request line and headers, before the body is read.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub content_length: usize,
    pub peer: SocketAddr,
}

impl Head {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The query string as decoded pairs, in order (repeated keys kept).
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Fault injection: wait this long before answering.
    pub delay: Option<Duration>,
    /// Fault injection: announce the whole body but send only this many bytes, then close.
    pub truncate_at: Option<usize>,
    /// Fault injection: close the connection without answering at all.
    pub hang_up: bool,
}

impl Response {
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: None,
            truncate_at: None,
            hang_up: false,
        }
    }
    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        let mut r = Response::empty(status);
        r.body = v.to_string().into_bytes();
        r.headers.push((
            "Content-Type".into(),
            "application/json;charset=UTF-8".into(),
        ));
        r
    }
    pub fn text(status: u16, s: &str) -> Response {
        let mut r = Response::empty(status);
        r.body = s.as_bytes().to_vec();
        r.headers
            .push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
        r
    }
    pub fn with_header(mut self, k: &str, v: &str) -> Response {
        self.headers.push((k.to_owned(), v.to_owned()));
        self
    }
}

pub trait Handler: Send + Sync + 'static {
    /// Called when the head is read, before the body; a response here is sent at once and the
    /// connection closed (the body is not read).
    fn check_head(&self, _head: &Head) -> Option<Response> {
        None
    }
    fn handle(&self, req: Request) -> Response;
}

pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Server {
    /// Serves `handler` on `listener` from a named accept thread.
    pub fn start(
        listener: TcpListener,
        limits: Limits,
        handler: Arc<dyn Handler>,
        name: &str,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let (stop2, active2) = (stop.clone(), active.clone());
        let thread_name = name.to_owned();
        let accept = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(listener, limits, handler, stop2, active2, thread_name))?;
        Ok(Server {
            addr,
            stop,
            active,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Stops accepting and joins the accept thread. Connections in flight finish on their own.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct ActiveGuard(Arc<AtomicUsize>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    handler: Arc<dyn Handler>,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    name: String,
) {
    let mut consecutive_errors: u32 = 0;
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(x) => {
                consecutive_errors = 0;
                x
            }
            Err(e) => {
                // EMFILE and friends: back off a little, never give up.
                consecutive_errors = consecutive_errors.saturating_add(1);
                log::warn!("{name}: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(
                    u64::from(consecutive_errors.min(10)) * 10,
                ));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= limits.connections_max {
            let mut s = stream;
            let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = s.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            let _ = s.shutdown(Shutdown::Both);
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let guard = ActiveGuard(active.clone());
        let handler = handler.clone();
        let limits2 = limits.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .spawn(move || {
                let _guard = guard;
                let _ = serve_connection(stream, peer, &limits2, handler.as_ref());
            });
        if let Err(e) = spawned {
            log::warn!("{name}: cannot start a connection thread: {e}");
        }
    }
}

enum HeadRead {
    Head(Head),
    Closed,
    Reply(Response),
}

fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    peer: SocketAddr,
    limits: &Limits,
    deadline: Instant,
) -> io::Result<HeadRead> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find_head_end(buf) {
            let rest = buf.split_off(end);
            let head_bytes = std::mem::replace(buf, rest);
            return Ok(parse_head(&head_bytes, peer));
        }
        if buf.len() > limits.header_bytes_max {
            return Ok(HeadRead::Reply(Response::text(
                431,
                "request header too large\n",
            )));
        }
        let left = deadline.saturating_duration_since(monotonic());
        if left.is_zero() {
            return Ok(if buf.is_empty() {
                HeadRead::Closed
            } else {
                HeadRead::Reply(Response::text(408, "request header timeout\n"))
            });
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(HeadRead::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parses a request head, or says what to answer instead (for the fuzz target too).
pub fn parse_head_bytes(bytes: &[u8]) -> Result<Head, Response> {
    match parse_head(bytes, SocketAddr::from(([127, 0, 0, 1], 0))) {
        HeadRead::Head(h) => Ok(h),
        HeadRead::Reply(r) => Err(r),
        HeadRead::Closed => Err(Response::empty(400)),
    }
}

fn parse_head(bytes: &[u8], peer: SocketAddr) -> HeadRead {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return HeadRead::Reply(Response::text(400, "incomplete request head\n"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return HeadRead::Reply(Response::text(431, "too many headers\n"));
        }
        Err(_) => return HeadRead::Reply(Response::text(400, "malformed request head\n")),
    }
    let method = req.method.unwrap_or("").to_owned();
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut hs = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        match std::str::from_utf8(h.value) {
            Ok(v) => hs.push((h.name.to_owned(), v.trim().to_owned())),
            Err(_) => return HeadRead::Reply(Response::text(400, "header value is not UTF-8\n")),
        }
    }
    let mut content_length = 0usize;
    for (k, v) in &hs {
        if k.eq_ignore_ascii_case("transfer-encoding") {
            return HeadRead::Reply(Response::text(
                501,
                "chunked request bodies are not supported; send Content-Length\n",
            ));
        }
        if k.eq_ignore_ascii_case("content-length") {
            match v.parse::<u64>() {
                Ok(n) => content_length = usize::try_from(n).unwrap_or(usize::MAX),
                Err(_) => return HeadRead::Reply(Response::text(400, "bad Content-Length\n")),
            }
        }
    }
    let head = Head {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        headers: hs,
        content_length,
        peer,
    };
    HeadRead::Head(head)
}

fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    limits: &Limits,
    handler: &dyn Handler,
) -> io::Result<()> {
    stream.set_write_timeout(Some(limits.write_timeout))?;
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        let wait = if first {
            limits.header_timeout
        } else {
            limits.idle_timeout
        };
        first = false;
        let deadline = monotonic() + wait;
        let head = match read_head(&mut stream, &mut buf, peer, limits, deadline)? {
            HeadRead::Closed => return Ok(()),
            HeadRead::Reply(r) => return write_response(&mut stream, r, false),
            HeadRead::Head(h) => h,
        };
        let keep_alive = !head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if let Some(r) = guarded(|| handler.check_head(&head))
            .unwrap_or_else(|| Some(Response::text(500, "internal error\n")))
        {
            write_response(&mut stream, r, false)?;
            linger(&mut stream);
            return Ok(());
        }
        if head.content_length > limits.body_bytes_max {
            write_response(
                &mut stream,
                Response::text(413, "request body too large\n"),
                false,
            )?;
            linger(&mut stream);
            return Ok(());
        }
        // Body: what is already buffered, then the rest from the socket.
        let mut body = Vec::with_capacity(head.content_length);
        let take = head.content_length.min(buf.len());
        body.extend(buf.drain(..take));
        let body_deadline = monotonic() + limits.body_timeout;
        let mut chunk = vec![0u8; 16 * 1024];
        while body.len() < head.content_length {
            let left = body_deadline.saturating_duration_since(monotonic());
            if left.is_zero() {
                return write_response(
                    &mut stream,
                    Response::text(408, "request body timeout\n"),
                    false,
                );
            }
            stream.set_read_timeout(Some(left))?;
            let want = (head.content_length - body.len()).min(chunk.len());
            match stream.read(&mut chunk[..want]) {
                Ok(0) => return Ok(()),
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let req = Request { head, body };
        let resp = guarded(|| handler.handle(req))
            .unwrap_or_else(|| Response::text(500, "internal error\n"));
        if resp.hang_up {
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        let keep = keep_alive && resp.truncate_at.is_none();
        write_response(&mut stream, resp, keep)?;
        if !keep {
            return Ok(());
        }
    }
}

/// After answering without reading the request body: read and drop what the client is still
/// sending (at most 2 s and 16 MiB) so it sees our answer instead of a reset connection.
fn linger(stream: &mut TcpStream) {
    let deadline = monotonic() + Duration::from_secs(2);
    let mut left: usize = 16 * 1024 * 1024;
    let mut chunk = [0u8; 16 * 1024];
    while left > 0 {
        let wait = deadline.saturating_duration_since(monotonic());
        if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Runs `f`, turning a panic into `None` (the panic message goes to the log).
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log::error!("HTTP handler panicked: {msg}");
            None
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn write_response(stream: &mut TcpStream, resp: Response, keep_alive: bool) -> io::Result<()> {
    if let Some(d) = resp.delay {
        std::thread::sleep(d);
    }
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status)).into_bytes();
    for (k, v) in &resp.headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n", resp.body.len()).as_bytes());
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    let body_len = resp
        .truncate_at
        .map_or(resp.body.len(), |n| n.min(resp.body.len()));
    out.extend_from_slice(&resp.body[..body_len]);
    stream.write_all(&out)?;
    stream.flush()?;
    if !keep_alive {
        let _ = stream.shutdown(Shutdown::Write);
    }
    Ok(())
}

/// Decodes `%XX` escapes and `+` (as space) in a query component.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%41%42"), "AB");
    }
}
