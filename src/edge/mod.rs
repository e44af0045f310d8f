//! The edge: where the outside world talks to jobmirror over HTTP. A small blocking HTTP/1.1
//! server ([`httpd`]) and the webhook receiver on it ([`webhook`]: signature checking as a
//! pure function, the receiver, the event thread that commits deliveries).
//!
//! The invariant: nothing arriving here is acknowledged before it is committed, a slow or
//! hostile client costs at most one capped connection, and one bad request never delays
//! another. Depends on the store, the wire model and health; nothing below imports it.

pub mod fuzzing;
pub mod httpd;
pub mod webhook;
