//! The HTTP edge: the webhook receiver, the admin listener and the fake Pleo are served by
//! hyper (HTTP/1.1 framing, chunked bodies, `100 Continue`, HTTP/1.0 semantics, strict
//! `Content-Length`, header read timeouts) on a small current-thread tokio runtime owned by the
//! server's own thread. Handlers stay synchronous: each request's [`Handler`] runs on the
//! runtime's bounded blocking pool and gets the whole body; nothing else of jobmirror is async.
//!
//! Invariants: a request head is bounded by `header_bytes_max` (431) and must arrive within
//! `header_timeout`; a body is bounded by `body_bytes_max` (413, announced or while read) and
//! `body_timeout` (408), and by `inflight_bytes_max` over every request being read at once
//! (503 with `Retry-After`): memory follows what is admitted, never what clients announce. At
//! `connections_max` the connection idle the longest is closed to make room (a request in
//! progress is never cut); only when every connection is busy is a new one refused. A
//! connection with no request in progress is closed after `idle_timeout`. A panic in a handler
//! is a 500 for that request only. Every refusal is counted by reason ([`Refusals`]).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, Semaphore, oneshot};

pub use crate::edge::exchange::{Handler, Head, OutBody, Request, Response, percent_decode};
use crate::edge::exchange::{guarded, head_of, to_http};

#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections held at once; past it the idlest is closed to make room.
    pub connections_max: usize,
    pub header_bytes_max: usize,
    pub body_bytes_max: usize,
    /// Bytes of request bodies being read at once, over every connection.
    pub inflight_bytes_max: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// Threads running handlers at once (the blocking pool).
    pub handler_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 256,
            header_bytes_max: 16 * 1024,
            body_bytes_max: 1024 * 1024,
            inflight_bytes_max: 32 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            handler_threads: 16,
        }
    }
}

/// Why requests or connections were refused, counted (the admin listener's metrics read them).
#[derive(Debug, Default)]
pub struct Refusals {
    /// A request head or framing hyper refused (400, 431, a bad `Content-Length`, ...).
    pub framing: AtomicU64,
    /// A head or body that did not arrive in time (408 or a closed connection).
    pub timeout: AtomicU64,
    /// A body over `body_bytes_max` (413).
    pub size: AtomicU64,
    /// A body that did not fit in `inflight_bytes_max` (503).
    pub inflight: AtomicU64,
    /// Connections closed to make room (the idlest), or refused with every one busy.
    pub connections: AtomicU64,
}

impl Refusals {
    /// `(reason, count)` for each reason, in a fixed order.
    pub fn by_reason(&self) -> [(&'static str, u64); 5] {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("framing", l(&self.framing)),
            ("timeout", l(&self.timeout)),
            ("size", l(&self.size)),
            ("inflight", l(&self.inflight)),
            ("connections", l(&self.connections)),
        ]
    }
}

pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    conns: Arc<Conns>,
    refusals: Arc<Refusals>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

/// What one connection's task shares with the accept loop.
struct Conn {
    /// Requests in progress on it.
    busy: AtomicUsize,
    /// When it last started or finished a request (ms since the server started).
    last_ms: AtomicU64,
    /// Requests started on it so far.
    served: AtomicUsize,
    close: Notify,
}

struct Conns {
    started: Instant,
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    /// Closes the connection idle the longest (no request in progress: nothing is cut); false
    /// when every one is busy. It leaves the count at once.
    fn evict_idlest(&self) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let idlest = map
            .iter()
            .filter(|(_, c)| c.busy.load(Ordering::SeqCst) == 0)
            .min_by_key(|(_, c)| c.last_ms.load(Ordering::SeqCst))
            .map(|(id, _)| *id);
        match idlest.and_then(|id| map.remove(&id)) {
            Some(c) => {
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Marks a connection busy for the life of one request.
struct Busy(Arc<Conn>, Arc<Conns>);

impl Busy {
    fn new(c: Arc<Conn>, conns: Arc<Conns>) -> Busy {
        c.busy.fetch_add(1, Ordering::SeqCst);
        c.served.fetch_add(1, Ordering::SeqCst);
        c.last_ms.store(conns.now_ms(), Ordering::SeqCst);
        Busy(c, conns)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_ms.store(self.1.now_ms(), Ordering::SeqCst);
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Shared {
    limits: Limits,
    handler: Arc<dyn Handler>,
    /// Permits of 1 KiB for bodies being read.
    inflight: Arc<Semaphore>,
    inflight_permits: usize,
    /// Set once more than half the bytes in flight were taken: when all are back, the heap's
    /// free pages go back to the kernel (a flood's buffers are not kept resident).
    burst: AtomicBool,
    refusals: Arc<Refusals>,
    conns: Arc<Conns>,
    name: String,
}

impl Server {
    /// Serves `handler` on `listener` from a thread of its own (`{name}-edge`) running a
    /// current-thread runtime; handlers run on its blocking pool.
    pub fn start(
        listener: TcpListener,
        limits: Limits,
        handler: Arc<dyn Handler>,
        name: &str,
    ) -> io::Result<Server> {
        Server::start_counted(listener, limits, handler, name, Arc::default())
    }

    /// As [`Server::start`], counting refusals in `refusals` (made before the server, for a
    /// handler that reports them: the admin listener's metrics).
    pub fn start_counted(
        listener: TcpListener,
        limits: Limits,
        handler: Arc<dyn Handler>,
        name: &str,
        refusals: Arc<Refusals>,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(limits.handler_threads.max(1))
            .thread_name(format!("{name}-handler"))
            .build()?;
        let conns = Arc::new(Conns {
            started: Instant::now(),
            next: AtomicU64::new(0),
            map: Mutex::new(HashMap::new()),
        });
        let kib = limits.inflight_bytes_max.div_ceil(1024).max(1);
        let kib = kib.min(Semaphore::MAX_PERMITS);
        let shared = Arc::new(Shared {
            inflight: Arc::new(Semaphore::new(kib)),
            inflight_permits: kib,
            burst: AtomicBool::new(false),
            limits,
            handler,
            refusals: refusals.clone(),
            conns: conns.clone(),
            name: name.to_owned(),
        });
        let (stop, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-edge"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            log::error!("{}: cannot serve: {e}", shared.name);
                            return;
                        }
                    };
                    accept_loop(listener, shared, stop_rx).await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
            conns,
            refusals,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections held now.
    pub fn active_connections(&self) -> usize {
        self.conns.len()
    }

    /// What was refused so far, by reason.
    pub fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    /// Stops accepting, lets requests in progress finish (5 s at most) and joins the thread.
    pub fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut errors: u32 = 0;
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                errors = 0;
                x
            }
            Err(e) => {
                // EMFILE and friends: back off a little, never give up.
                errors = errors.saturating_add(1);
                if errors <= 3 || errors.is_power_of_two() {
                    log::warn!("{}: accept failed ({errors} in a row): {e}", shared.name);
                }
                tokio::time::sleep(Duration::from_millis(u64::from(errors.min(10)) * 10)).await;
                continue;
            }
        };
        if shared.conns.len() >= shared.limits.connections_max {
            shared.refusals.connections.fetch_add(1, Ordering::Relaxed);
            // Room is made by closing the idlest; with every connection busy the newcomer is
            // closed instead.
            if !shared.conns.evict_idlest() {
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let id = shared.conns.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(shared.conns.now_ms()),
            served: AtomicUsize::new(0),
            close: Notify::new(),
        });
        shared
            .conns
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, conn.clone());
        let shared2 = shared.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, shared2.clone(), conn).await;
            shared2
                .conns
                .map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }
    // Stopping: every connection closes once its request in progress (if any) is answered. One
    // accepted in the last moments that has not sent a request yet (a client that connected as
    // a restart in place began) gets a short grace to start one, so it is answered instead of
    // reset; a connection that already had its answers gets none.
    const FRESH: Duration = Duration::from_millis(500);
    let all: Vec<Arc<Conn>> = shared
        .conns
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    let now = shared.conns.now_ms();
    let (fresh, settled): (Vec<Arc<Conn>>, Vec<Arc<Conn>>) = all.into_iter().partition(|c| {
        c.served.load(Ordering::Relaxed) == 0
            && now.saturating_sub(c.last_ms.load(Ordering::Relaxed)) < FRESH.as_millis() as u64
    });
    for c in settled {
        c.close.notify_one();
    }
    let grace = Instant::now() + FRESH;
    while Instant::now() < grace
        && fresh
            .iter()
            .any(|c| c.busy.load(Ordering::Relaxed) == 0 && Arc::strong_count(c) > 1)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for c in fresh {
        c.close.notify_one();
    }
    let until = Instant::now() + Duration::from_secs(5);
    while shared.conns.len() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bytes of a body admitted for reading; given back when dropped (answered, refused, or the
/// client gone). The last one back after a burst hands the heap's free pages to the kernel.
struct InFlight {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        drop(self.permit.take());
        let s = &self.shared;
        if s.inflight.available_permits() == s.inflight_permits
            && s.burst.swap(false, Ordering::SeqCst)
        {
            crate::memory::release_free_memory();
        }
    }
}

/// Closed without an answer (fault injection).
#[derive(Debug)]
struct HangUp;

impl std::fmt::Display for HangUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closed without an answer")
    }
}

impl std::error::Error for HangUp {}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    conn: Arc<Conn>,
) {
    let limits = &shared.limits;
    let svc = {
        let (shared, conn) = (shared.clone(), conn.clone());
        hyper::service::service_fn(move |req| {
            let (shared, conn) = (shared.clone(), conn.clone());
            async move { serve(req, peer, shared, conn).await }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.header_bytes_max.max(8192))
        // A client may shut its write side once its request is sent: it still gets its answer.
        .half_close(true)
        .keep_alive(true);
    let served = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(served);
    let mut closing = false;
    loop {
        let idle_ms = shared
            .conns
            .now_ms()
            .saturating_sub(conn.last_ms.load(Ordering::SeqCst));
        let idle_left = (limits.idle_timeout.as_millis() as u64).saturating_sub(idle_ms);
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    count_error(&shared.refusals, &e);
                }
                return;
            }
            _ = conn.close.notified(), if !closing => {
                // No request in progress: closed at once (a half-sent head is not one).
                if conn.busy.load(Ordering::SeqCst) == 0 {
                    return;
                }
                served.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(Duration::from_millis(idle_left.max(50))), if !closing => {
                let idle_ms = shared.conns.now_ms().saturating_sub(conn.last_ms.load(Ordering::SeqCst));
                if conn.busy.load(Ordering::SeqCst) == 0
                    && idle_ms >= limits.idle_timeout.as_millis() as u64
                {
                    return;
                }
            }
            _ = tokio::time::sleep(limits.write_timeout + limits.body_timeout), if closing => {
                // A connection that would not close in time is dropped.
                return;
            }
        }
    }
}

fn count_error(refusals: &Refusals, e: &hyper::Error) {
    if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
        refusals.framing.fetch_add(1, Ordering::Relaxed);
    } else if e.is_timeout() {
        refusals.timeout.fetch_add(1, Ordering::Relaxed);
    }
}

async fn serve(
    req: http::Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    conn: Arc<Conn>,
) -> Result<http::Response<OutBody>, HangUp> {
    let _busy = Busy::new(conn, shared.conns.clone());
    let limits = &shared.limits;
    let (parts, body) = req.into_parts();
    let head = head_of(&parts, peer);
    let early = guarded(|| shared.handler.check_head(&head))
        .unwrap_or_else(|| Some(Response::text(500, "internal error\n")));
    if let Some(r) = early {
        drain_unread(&head, body).await;
        return Ok(to_http(r, true));
    }
    let announced = body.size_hint().exact();
    if head.content_length > limits.body_bytes_max
        || announced.is_some_and(|n| n > limits.body_bytes_max as u64)
    {
        shared.refusals.size.fetch_add(1, Ordering::Relaxed);
        drain_unread(&head, body).await;
        return Ok(to_http(
            Response::text(413, "request body too large\n"),
            true,
        ));
    }
    // Memory is admitted before it is read: the announced length, or the most a chunked body
    // may take.
    let want = announced.map_or(limits.body_bytes_max, |n| n as usize);
    let permits = want.div_ceil(1024).max(1) as u32;
    let Ok(permit) = shared.inflight.clone().try_acquire_many_owned(permits) else {
        shared.refusals.inflight.fetch_add(1, Ordering::Relaxed);
        return Ok(to_http(
            Response::text(503, "too many request bodies in flight; try again\n")
                .with_header("Retry-After", "1"),
            true,
        ));
    };
    if shared.inflight.available_permits() < shared.inflight_permits / 2 {
        shared.burst.store(true, Ordering::SeqCst);
    }
    let permit = InFlight {
        permit: Some(permit),
        shared: shared.clone(),
    };
    let read = tokio::time::timeout(
        limits.body_timeout,
        Limited::new(body, limits.body_bytes_max).collect(),
    )
    .await;
    let body = match read {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            shared.refusals.size.fetch_add(1, Ordering::Relaxed);
            return Ok(to_http(
                Response::text(413, "request body too large\n"),
                true,
            ));
        }
        Ok(Err(_)) => {
            // A body that breaks its own framing (bad chunk sizes, the client gone).
            shared.refusals.framing.fetch_add(1, Ordering::Relaxed);
            return Ok(to_http(
                Response::text(400, "malformed request body\n"),
                true,
            ));
        }
        Err(_) => {
            shared.refusals.timeout.fetch_add(1, Ordering::Relaxed);
            return Ok(to_http(Response::text(408, "request body timeout\n"), true));
        }
    };
    let req = Request {
        head,
        body: body.to_vec(),
    };
    drop(body);
    let handler = shared.handler.clone();
    let resp = tokio::task::spawn_blocking(move || guarded(|| handler.handle(req)))
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| Response::text(500, "internal error\n"));
    drop(permit);
    if resp.hang_up || resp.status == 0 {
        return Err(HangUp);
    }
    if let Some(d) = resp.delay {
        tokio::time::sleep(d).await;
    }
    Ok(to_http(resp, false))
}

/// Before answering a request whose body will not be used: a client that is still sending
/// would see its connection reset instead of the answer, so what it sends is read and dropped
/// (2 s and 16 MiB at most; nothing is kept). A client that asked `Expect: 100-continue` is
/// waiting for the answer and sends nothing: nothing is read.
async fn drain_unread(head: &Head, mut body: Incoming) {
    if head
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        return;
    }
    let mut left: usize = 16 * 1024 * 1024;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while left > 0 {
            match body.frame().await {
                Some(Ok(f)) => {
                    let n = f.data_ref().map_or(0, |d| d.len());
                    left = left.saturating_sub(n);
                }
                _ => return,
            }
        }
    })
    .await;
}
