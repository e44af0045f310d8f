//! The handler's settings (`handler_command`, `handler_env`) and the configuration's warnings.

use super::{Config, ConfigError, err};
use crate::processing::handler::HandlerSpec;

/// The handler `handler_command` names, with `handler_env` for a program.
pub(super) fn spec(
    command: Option<&str>,
    env: Option<&str>,
) -> Result<Option<HandlerSpec>, ConfigError> {
    let Some(command) = command.filter(|h| !h.trim().is_empty()) else {
        return Ok(None);
    };
    match HandlerSpec::parse(command).map_err(|m| err("handler_command", m))? {
        HandlerSpec::Command { program, args, .. } => Ok(Some(HandlerSpec::Command {
            program,
            args,
            env: handler_env(env.unwrap_or(""))?,
        })),
        other => Ok(Some(other)),
    }
}

impl Config {
    /// The handler, which the service cannot run without.
    pub fn require_handler(&self) -> Result<crate::processing::handler::HandlerSpec, ConfigError> {
        self.handler.clone().ok_or_else(|| {
            err(
                "handler_command",
                "is required: a handler program, or outbox:DIR to write items as files",
            )
        })
    }

    /// Settings that work but deserve a word at start and in `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(a) = &self.admin_listen
            && a.parse::<std::net::SocketAddr>()
                .is_ok_and(|a| !a.ip().is_loopback())
        {
            w.push(format!(
                "admin_listen = {a:?} is not a loopback address: /metrics and /healthz have no authentication; keep it on loopback or behind a proxy that checks who asks"
            ));
        }
        w
    }
}

/// `handler_env`: `NAME=VALUE` entries, or `NAME` (passed on from the service's environment),
/// separated by commas or whitespace. No name of jobmirror's own (`JOBMIRROR_*`) nor
/// `CREDENTIALS_DIRECTORY`: the service's credentials never reach a handler.
fn handler_env(list: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for entry in list.split([',', ' ', '\n', '\t']).filter(|e| !e.is_empty()) {
        let (name, value) = match entry.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (entry, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(err(
                "handler_env",
                format!("{name:?} is not a variable name"),
            ));
        }
        if name.starts_with("JOBMIRROR_") || name == "CREDENTIALS_DIRECTORY" {
            return Err(err(
                "handler_env",
                format!(
                    "{name} is the service's own: a handler never gets the service's credentials, their paths or its database"
                ),
            ));
        }
        let value = match value {
            Some(v) => v,
            None => match std::env::var(name) {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        out.push((name.to_owned(), value));
    }
    Ok(out)
}
