//! What the HTTP edge hands its handlers and takes back: the request head and body, the
//! response (with the fake Pleo's fault injections), and their conversion from and to hyper's
//! types. Handlers are plain synchronous code; nothing here does I/O.

use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// The request line and headers, before the body is read.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    /// The announced `Content-Length` (0 when the body is chunked or absent).
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
    /// Fault injection: close the connection without answering at all (so does status 0).
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

pub(crate) fn head_of(parts: &http::request::Parts, peer: SocketAddr) -> Head {
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).trim().to_owned(),
            )
        })
        .collect();
    let content_length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
    Head {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers,
        content_length,
        peer,
    }
}

/// A response body: whole, or (fault injection) cut short after what it holds.
pub struct OutBody {
    data: Option<Bytes>,
    cut: bool,
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let me = self.get_mut();
        match me.data.take() {
            Some(b) if !b.is_empty() => Poll::Ready(Some(Ok(Frame::data(b)))),
            _ if me.cut => {
                me.cut = false;
                Poll::Ready(Some(Err(io::Error::other("answer cut short"))))
            }
            _ => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.cut && self.data.as_ref().is_none_or(|b| b.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.data, self.cut) {
            (_, true) => SizeHint::default(),
            (Some(b), false) => SizeHint::with_exact(b.len() as u64),
            (None, false) => SizeHint::with_exact(0),
        }
    }
}

pub(crate) fn to_http(r: Response, close: bool) -> http::Response<OutBody> {
    let status =
        http::StatusCode::from_u16(r.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = http::Response::builder().status(status);
    for (k, v) in &r.headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            out = out.header(k, v);
        }
    }
    let body = match r.truncate_at {
        Some(n) => {
            out = out
                .header(http::header::CONTENT_LENGTH, r.body.len())
                .header(http::header::CONNECTION, "close");
            let keep = n.min(r.body.len());
            OutBody {
                data: Some(Bytes::from(r.body).slice(..keep)),
                cut: true,
            }
        }
        None => {
            if close {
                out = out.header(http::header::CONNECTION, "close");
            }
            OutBody {
                data: Some(Bytes::from(r.body)),
                cut: false,
            }
        }
    };
    out.body(body).unwrap_or_else(|_| {
        let mut r = http::Response::new(OutBody {
            data: None,
            cut: false,
        });
        *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// Runs `f`, turning a panic into `None` (the panic message goes to the log).
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
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
