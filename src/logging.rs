//! Log set-up: simplelog formats each record as one text line (fixed-width UTC time, level,
//! message); [`LineWriter`] turns those lines into what the reader wants.
//!
//! The invariant: one record is one line on stderr, whatever the format; under systemd
//! (`JOURNAL_STREAM` names our stderr) each line starts with its syslog priority (`<3>` for
//! errors), so `journalctl -p err` finds them; `log_format = "json"` writes one JSON object a
//! line with fixed fields (`ts`, `level`, `msg`). HTTP libraries' wire dumps never reach the
//! log (they would carry the credential).

use std::io::Write;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-02T08:00:00.000Z [INFO] message`
    Text,
    /// `{"ts":"2026-12-02T08:00:00.000Z","level":"info","msg":"message"}`
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
        let mut text = String::new();
        if self.journal {
            let priority = match level {
                "error" => 3,
                "warn" => 4,
                "info" => 6,
                _ => 7,
            };
            text.push_str(&format!("<{priority}>"));
        }
        match self.format {
            LogFormat::Text if header => text.push_str(line),
            LogFormat::Text => text.push_str(&format!("{ts} [{}] {msg}", level.to_uppercase())),
            // Fields in a fixed order: ts, level, msg.
            LogFormat::Json => text.push_str(&format!(
                "{{\"ts\":{},\"level\":{},\"msg\":{}}}",
                serde_json::Value::from(ts),
                serde_json::Value::from(level),
                serde_json::Value::from(msg)
            )),
        }
        text.push('\n');
        self.out.write_all(text.as_bytes())
    }
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
            serde_json::json!({"ts": "2026-12-02T08:00:00.000Z", "level": "warn", "msg": "a \"quoted\" word"})
        );
        assert!(
            out.starts_with("{\"ts\":\"2026-12-02T08:00:00.000Z\",\"level\":\"warn\",\"msg\":")
        );
        assert_eq!(lines[1]["level"], "warn");
        assert_eq!(lines[1]["msg"], "second line");
    }
}
