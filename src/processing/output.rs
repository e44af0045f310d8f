//! A handler's output, read safely: lines of any bytes with a bound on what one line may hold,
//! and what each stdout line means (an item result, garbage, or nothing).
//!
//! Invariant: a line that is not a valid result (not UTF-8, cut, or not a result) is reported
//! as garbage, never guessed at; reading never stops before EOF, so a handler never meets a
//! closed pipe.

use std::io::{BufRead, BufReader};

use serde_json::Value;

use crate::store::ItemResult;
use crate::wire::ITEM_FAILURE_TYPES;

/// What a running handler tells the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerMsg {
    Result(ItemResult),
    /// An output line that is not a result (kept short for the log).
    Garbage(String),
    /// The handler closed its output; [`crate::processing::child::Running::finish`] gives its exit status.
    Eof,
}

/// The most of one stdout line kept (results are far shorter); the rest of a longer line is
/// read and dropped, and the line reported as garbage.
pub const STDOUT_LINE_MAX: usize = 1 << 20;
/// The most of one stderr line kept for the log.
pub const STDERR_LINE_MAX: usize = 8 << 10;

/// One line read from a handler pipe: any bytes, at most `max` of them kept.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    pub kept: Vec<u8>,
    /// The line's whole length in bytes (more than `kept.len()` when it was cut).
    pub len: usize,
}

impl Line {
    pub fn cut(&self) -> bool {
        self.len > self.kept.len()
    }
}

/// Reads newline-terminated lines of any bytes, holding at most `max` bytes of one line
/// whatever the writer sends; a last line without a newline is returned at EOF.
pub struct LineReader<R> {
    r: BufReader<R>,
    max: usize,
}

impl<R: std::io::Read> LineReader<R> {
    pub fn new(r: R, max: usize) -> Self {
        LineReader {
            r: BufReader::with_capacity(8 << 10, r),
            max,
        }
    }

    /// The next line without its newline (and a `\r` before it); `None` at EOF or on a read
    /// error.
    pub fn next_line(&mut self) -> Option<Line> {
        let mut kept = Vec::new();
        let mut len = 0usize;
        loop {
            let avail = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => &[],
            };
            if avail.is_empty() {
                return (len > 0).then(|| Self::done(kept, len));
            }
            let (chunk, used, found) = match avail.iter().position(|b| *b == b'\n') {
                Some(i) => (&avail[..i], i + 1, true),
                None => (avail, avail.len(), false),
            };
            let room = self.max.saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            len += chunk.len();
            self.r.consume(used);
            if found {
                return Some(Self::done(kept, len));
            }
        }
    }

    fn done(mut kept: Vec<u8>, mut len: usize) -> Line {
        if kept.len() == len && kept.last() == Some(&b'\r') {
            kept.pop();
            len -= 1;
        }
        Line { kept, len }
    }
}

/// A line as text for the log: invalid UTF-8 shown with replacement characters, at most
/// 200 characters, and a note when the line was cut.
pub(crate) fn printable(line: &Line) -> String {
    let text = String::from_utf8_lossy(&line.kept);
    let mut s = short(&text);
    if line.cut() {
        s.push_str(&format!(" [line of {} bytes, cut]", line.len));
    }
    s
}

/// Parses one output line of a handler.
pub fn parse_result(line: &str) -> Option<ItemResult> {
    let v: Value = serde_json::from_str(line).ok()?;
    let entry = v.get("accountingEntryId")?.as_str()?.to_owned();
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    match v.get("status")?.as_str()? {
        "successful" => Some(ItemResult {
            accounting_entry_id: entry,
            successful: true,
            external_id: text("externalId"),
            external_url: text("externalUrl"),
            failure_reason: None,
            failure_reason_type: None,
        }),
        "failed" => {
            let given = text("failureReasonType");
            let (kind, reason) = match given {
                Some(t) if ITEM_FAILURE_TYPES.contains(&t.as_str()) => (t, text("failureReason")),
                other => (
                    "unexpected_failure".to_owned(),
                    Some(format!(
                        "{}{}",
                        text("failureReason").unwrap_or_default(),
                        other
                            .map(|t| format!(" (handler said failureReasonType {t:?})"))
                            .unwrap_or_default()
                    )),
                ),
            };
            Some(ItemResult {
                accounting_entry_id: entry,
                successful: false,
                external_id: None,
                external_url: None,
                failure_reason: reason.filter(|r| !r.is_empty()),
                failure_reason_type: Some(kind),
            })
        }
        _ => None,
    }
}

fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

/// What one stdout line tells the pipeline: a result, garbage (not UTF-8, cut, or not a
/// result; logged and ignored), or nothing (a blank line).
pub fn output_message(line: &Line) -> Option<HandlerMsg> {
    let text = match std::str::from_utf8(&line.kept) {
        Ok(t) if !line.cut() => t,
        Ok(_) => return Some(HandlerMsg::Garbage(printable(line))),
        Err(_) => {
            return Some(HandlerMsg::Garbage(format!(
                "not UTF-8: {}",
                printable(line)
            )));
        }
    };
    if text.trim().is_empty() {
        return None;
    }
    Some(match parse_result(text) {
        Some(r) => HandlerMsg::Result(r),
        None => HandlerMsg::Garbage(short(text)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines() {
        let ok = parse_result(r#"{"accountingEntryId":"e1","status":"successful","externalId":"X","externalUrl":"https://erp/X"}"#).unwrap();
        assert!(ok.successful);
        assert_eq!(ok.external_id.as_deref(), Some("X"));
        let bad = parse_result(r#"{"accountingEntryId":"e2","status":"failed","failureReasonType":"vendor_unknown","failureReason":"no vendor"}"#).unwrap();
        assert_eq!(bad.failure_reason_type.as_deref(), Some("vendor_unknown"));
        let odd = parse_result(
            r#"{"accountingEntryId":"e3","status":"failed","failureReasonType":"nope"}"#,
        )
        .unwrap();
        assert_eq!(
            odd.failure_reason_type.as_deref(),
            Some("unexpected_failure")
        );
        assert!(odd.failure_reason.unwrap().contains("nope"));
        for garbage in [
            "",
            "hello",
            "{}",
            r#"{"accountingEntryId":"e","status":"maybe"}"#,
            r#"{"status":"successful"}"#,
            "[1]",
        ] {
            assert!(parse_result(garbage).is_none(), "{garbage}");
        }
    }

    fn read_all(bytes: &[u8], max: usize) -> Vec<Line> {
        let mut r = LineReader::new(bytes, max);
        std::iter::from_fn(|| r.next_line()).collect()
    }

    #[test]
    fn lines_of_any_bytes_are_read_to_the_end_and_bounded() {
        let mut input = b"caf\xe9\r\n".to_vec();
        input.extend(vec![b'x'; 100_000]);
        input.extend(b"\n\n{\"accountingEntryId\":\"e\",\"status\":\"successful\"}\nlast");
        let lines = read_all(&input, 1000);
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(
            lines[0],
            Line {
                kept: b"caf\xe9".to_vec(),
                len: 4
            }
        );
        assert_eq!((lines[1].kept.len(), lines[1].len), (1000, 100_000));
        assert!(lines[1].cut());
        assert_eq!(
            lines[2],
            Line {
                kept: vec![],
                len: 0
            }
        );
        assert!(lines[3].kept.starts_with(b"{"));
        assert_eq!(
            lines[4],
            Line {
                kept: b"last".to_vec(),
                len: 4
            }
        );
        // What the pipeline is told of each.
        let msgs: Vec<Option<HandlerMsg>> = lines.iter().map(output_message).collect();
        assert!(
            matches!(&msgs[0], Some(HandlerMsg::Garbage(g)) if g.starts_with("not UTF-8: caf\u{fffd}")),
            "{msgs:?}"
        );
        assert!(
            matches!(&msgs[1], Some(HandlerMsg::Garbage(g)) if g.ends_with("[line of 100000 bytes, cut]")),
            "{msgs:?}"
        );
        assert!(msgs[2].is_none(), "a blank line says nothing");
        assert!(matches!(&msgs[3], Some(HandlerMsg::Result(r)) if r.accounting_entry_id == "e"));
        assert!(
            output_message(&Line {
                kept: b"  ".to_vec(),
                len: 2
            })
            .is_none()
        );
    }
}
