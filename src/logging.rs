//! Log set-up: simplelog formats each record as one text line (fixed-width UTC time, level,
//! message); [`LineWriter`] turns those lines into what the reader wants.
//!
//! The invariant: one record is one line on stderr, whatever the format; under systemd
//! (`JOURNAL_STREAM` names our stderr) each line starts with its syslog priority (`<3>` for
//! errors), so `journalctl -p err` finds them; `log_format = "json"` writes one JSON object a
//! line, never prefixed (a prefix would break every shipper reading the stream as JSON): the
//! fixed fields `ts`, `level`, `priority` (syslog's number, the same the prefix would carry),
//! `msg`, then what the line is about when it names it: `job_id`, `company_id` (named as the
//! database names them), `event` (a job
//! event's name, as the message quotes it), and for a warning or an error its `error_kind`.
//! HTTP libraries' wire dumps never reach the log (they would carry the credential).

use std::io::Write;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-02T08:00:00.000Z [INFO] message`
    Text,
    /// `{"ts":"2026-12-02T08:00:00.000Z","level":"info","priority":6,"msg":"claimed job J of
    /// company C","job_id":"J","company_id":"C"}`
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// Logging to stderr at `level` as `format`; the first call wins (later ones change nothing).
pub fn init(level: log::LevelFilter, format: LogFormat) {
    let time = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let cfg = simplelog::ConfigBuilder::new()
        .set_time_format_custom(time)
        .set_time_offset(time::UtcOffset::UTC)
        .set_thread_level(log::LevelFilter::Off)
        .set_target_level(log::LevelFilter::Off)
        .set_level_padding(simplelog::LevelPadding::Off)
        // ureq and ureq-proto dump whole requests, headers included, at debug and trace
        // level: that would put the credential in the log. Their errors reach us anyway.
        .add_filter_ignore_str("ureq")
        .build();
    let writer = LineWriter::new(std::io::stderr(), format, journal_on_stderr());
    let _ = simplelog::WriteLogger::init(level, cfg, writer);
}

/// Whether stderr is the journal stream systemd set up (`JOURNAL_STREAM=<dev>:<inode>` of
/// our fd 2): only then do lines carry a priority prefix.
pub fn journal_on_stderr() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let v = v.to_string_lossy();
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on fd 2 with a zeroed stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// Reads simplelog's lines (`<time> [<LEVEL>] <message>`) and writes them in the chosen
/// format, each line whole.
pub struct LineWriter<W: Write> {
    out: W,
    format: LogFormat,
    journal: bool,
    pending: Vec<u8>,
    /// The level and time of the last record, for continuation lines of a message that
    /// holds a newline.
    last: (&'static str, String),
}

impl<W: Write> LineWriter<W> {
    pub fn new(out: W, format: LogFormat, journal: bool) -> LineWriter<W> {
        LineWriter {
            out,
            format,
            journal,
            pending: Vec::new(),
            last: ("info", String::new()),
        }
    }

    fn line(&mut self, line: &str) -> std::io::Result<()> {
        let parsed = line.split_once(' ').and_then(|(ts, rest)| {
            let rest = rest.strip_prefix('[')?;
            let (level, msg) = rest
                .split_once("] ")
                .or_else(|| rest.strip_suffix(']').map(|l| (l, "")))?;
            let level = match level {
                "ERROR" => "error",
                "WARN" => "warn",
                "INFO" => "info",
                "DEBUG" => "debug",
                "TRACE" => "trace",
                _ => return None,
            };
            Some((ts.to_owned(), level, msg))
        });
        let header = parsed.is_some();
        let (ts, level, msg) = match parsed {
            Some((ts, level, msg)) => {
                self.last = (level, ts.clone());
                (ts, level, msg)
            }
            // A message with a newline: its later lines keep the record's level and time.
            None => (self.last.1.clone(), self.last.0, line),
        };
        let priority = match level {
            "error" => 3,
            "warn" => 4,
            "info" => 6,
            _ => 7,
        };
        let mut text = String::new();
        match self.format {
            LogFormat::Text => {
                if self.journal {
                    text.push_str(&format!("<{priority}>"));
                }
                if header {
                    text.push_str(line);
                } else {
                    text.push_str(&format!("{ts} [{}] {msg}", level.to_uppercase()));
                }
            }
            // Fields in a fixed order: ts, level, priority, msg, then the subjects named.
            LogFormat::Json => {
                let v = |s: &str| serde_json::Value::from(s);
                text.push_str(&format!(
                    "{{\"ts\":{},\"level\":{},\"priority\":{priority},\"msg\":{}",
                    v(&ts),
                    v(level),
                    v(msg)
                ));
                for (field, value) in subjects(msg) {
                    text.push_str(&format!(",\"{field}\":{}", v(value)));
                }
                if priority <= 4
                    && let Some(kind) = error_kind(msg)
                {
                    text.push_str(&format!(",\"error_kind\":{}", v(&kind)));
                }
                text.push('}');
            }
        }
        text.push('\n');
        self.out.write_all(text.as_bytes())
    }
}

/// What kind of failure a warning or error line reports, from the words the service uses for
/// it: `pleo_unreachable` (no answer), `pleo_http_<code>`, `credential_refused`,
/// `handler_crash`, `handler_timeout`, `not_ready`, `database`. `None` for anything else.
pub fn error_kind(msg: &str) -> Option<String> {
    if msg.contains("refuses the credential") || msg.contains("refuses the client") {
        return Some("credential_refused".into());
    }
    if let Some(i) = msg.find("Pleo answered ") {
        let code: String = msg[i + 14..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if code.len() == 3 {
            return Some(format!("pleo_http_{code}"));
        }
    }
    if msg.contains("transport error") {
        return Some("pleo_unreachable".into());
    }
    if msg.contains("readiness check failed") {
        return Some("not_ready".into());
    }
    if msg.contains("handler gave no result") || msg.contains("stopping the handler") {
        return Some("handler_timeout".into());
    }
    if msg.contains("handler run") && (msg.contains("crashed") || msg.contains("unanswered")) {
        return Some("handler_crash".into());
    }
    if msg.contains("database") || msg.contains("SQLite") {
        return Some("database".into());
    }
    None
}

/// The names of job events a message may quote in backticks.
const EVENTS: &[&str] = &[
    "started",
    "completed",
    "completed_with_errors",
    "failed",
    "expired",
    "in_progress",
];

/// What a message is about, as it names it: `job ID` (or `handler[ID]`) as `job_id`, `company
/// ID` as `company_id`, and a
/// job event quoted in backticks. Each field at most once, the first mention.
pub fn subjects(msg: &str) -> Vec<(&'static str, &str)> {
    let token = |rest: &str| -> Option<usize> {
        let end = rest
            .find(|c: char| c.is_whitespace() || matches!(c, ':' | ',' | ';' | '(' | ')' | '`'))
            .unwrap_or(rest.len());
        (end > 0).then_some(end)
    };
    // Positions first (field, start, end), in the order the message names them.
    let mut found: Vec<(&'static str, usize, usize)> = Vec::new();
    for (field, word) in [("job_id", "job "), ("company_id", "company ")] {
        let mut from = 0;
        while let Some(i) = msg[from..].find(word) {
            let at = from + i;
            let boundary =
                at == 0 || !msg[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_');
            let start = at + word.len();
            if boundary && let Some(len) = token(&msg[start..]) {
                found.push((field, start, start + len));
                break;
            }
            from = start;
        }
    }
    if let Some(i) = msg.find("handler[")
        && let Some(len) = msg[i + 8..].find(']')
        && len > 0
    {
        found.push(("job_id", i + 8, i + 8 + len));
    }
    let mut rest = msg;
    let mut offset = 0;
    while let Some(i) = rest.find('`') {
        let after = &rest[i + 1..];
        let Some(j) = after.find('`') else { break };
        if EVENTS.contains(&&after[..j]) {
            found.push(("event", offset + i + 1, offset + i + 1 + j));
            break;
        }
        offset += i + 1 + j + 1;
        rest = &after[j + 1..];
    }
    found.sort_by_key(|(_, start, _)| *start);
    let mut fields: Vec<(&'static str, &str)> = Vec::new();
    for (field, start, end) in found {
        if !fields.iter().any(|(f, _)| *f == field) {
            fields.push((field, &msg[start..end]));
        }
    }
    fields
}

impl<W: Write> Write for LineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            self.line(&text)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn through(format: LogFormat, journal: bool, input: &str) -> String {
        let mut w = LineWriter::new(Vec::new(), format, journal);
        // In pieces, as a formatter writes.
        for chunk in input.as_bytes().chunks(7) {
            w.write_all(chunk).unwrap();
        }
        String::from_utf8(w.out).unwrap()
    }

    #[test]
    fn journal_lines_carry_their_syslog_priority() {
        let out = through(
            LogFormat::Text,
            true,
            "2026-12-02T08:00:00.000Z [ERROR] it broke\n2026-12-02T08:00:00.001Z [INFO] fine\n",
        );
        assert_eq!(
            out,
            "<3>2026-12-02T08:00:00.000Z [ERROR] it broke\n<6>2026-12-02T08:00:00.001Z [INFO] fine\n"
        );
    }

    #[test]
    fn json_lines_name_their_subjects_and_carry_the_priority_as_a_field() {
        // Under the journal too: no `<6>` prefix in JSON mode, the priority is a field.
        let out = through(
            LogFormat::Json,
            true,
            "2026-12-02T08:00:00.000Z [INFO] claimed job 0f1e-77 of company c-9\n\
             2026-12-02T08:00:00.001Z [WARN] job J2: could not read it back after `completed`: 503\n\
             2026-12-02T08:00:00.002Z [ERROR] handler[J3]: boom\n\
             2026-12-02T08:00:00.003Z [INFO] nothing to name, a jobless line\n",
        );
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        assert_eq!(lines[0]["job_id"], "0f1e-77");
        assert_eq!(lines[0]["company_id"], "c-9");
        assert_eq!(lines[0]["priority"], 6);
        assert_eq!(lines[1]["job_id"], "J2");
        assert_eq!(lines[1]["event"], "completed");
        assert_eq!(lines[1]["priority"], 4);
        assert_eq!(lines[2]["job_id"], "J3");
        assert_eq!(lines[2]["priority"], 3);
        assert!(lines[3].get("job_id").is_none(), "{}", lines[3]);
        assert!(lines[3].get("error_kind").is_none(), "{}", lines[3]);
        let kinds = through(
            LogFormat::Json,
            false,
            "2026-12-02T08:00:00.000Z [WARN] GET /v3/export-jobs: transport error talking to Pleo: io: Connection refused\n\
             2026-12-02T08:00:00.001Z [WARN] poll pass for company c failed: Pleo answered 503 SERVICE_UNAVAILABLE\n\
             2026-12-02T08:00:00.002Z [WARN] job j: handler run 2 ended with 3 items unanswered\n",
        );
        let kinds: Vec<serde_json::Value> = kinds
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(kinds[0]["error_kind"], "pleo_unreachable");
        assert_eq!(kinds[1]["error_kind"], "pleo_http_503");
        assert_eq!(kinds[1]["company_id"], "c");
        assert_eq!(kinds[2]["error_kind"], "handler_crash");
    }

    #[test]
    fn json_is_one_object_a_line_with_fixed_fields() {
        let out = through(
            LogFormat::Json,
            false,
            "2026-12-02T08:00:00.000Z [WARN] a \"quoted\" word\nsecond line\n",
        );
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"ts": "2026-12-02T08:00:00.000Z", "level": "warn", "priority": 4, "msg": "a \"quoted\" word"})
        );
        assert!(out.starts_with(
            "{\"ts\":\"2026-12-02T08:00:00.000Z\",\"level\":\"warn\",\"priority\":4,\"msg\":"
        ));
        assert_eq!(lines[1]["level"], "warn");
        assert_eq!(lines[1]["msg"], "second line");
    }
}
