//! `--config FILE` (env `LICENSD_CONFIG`): settings from a TOML file, below
//! flags and environment variables and above the defaults.
//!
//! A key is a flag's long name in snake case (`db_max_connections` for
//! `--db-max-connections`); a value is a string, an integer or a boolean
//! (`true` sets a switch such as `no_validate_cache`). The file may hold any
//! key of `licensd serve` and the global `log_format`; each command takes
//! the keys it knows (`token` and `migrate` take `database_url`) and ignores
//! the rest. A key no command knows, a value of the wrong type, or a value
//! the flag refuses is a one-line error naming the file and the key.
//!
//! How: the command line is parsed once; every key of the file whose flag
//! was neither given nor set by its environment variable is appended to
//! the command line as `--flag=value`, and the command line is parsed
//! again, so each value is checked exactly as the flag's would be.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// The extra arguments `path` contributes to the command line `matches`
/// came from (`command`: the whole CLI).
pub fn extra_args(
    path: &Path,
    command: &Command,
    matches: &ArgMatches,
) -> Result<Vec<OsString>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start].lines().count().max(1))
            .unwrap_or(0);
        format!("{shown}:{line}: {}", e.message())
    })?;
    let serve = command
        .find_subcommand("serve")
        .expect("licensd has a serve command");
    // The command that runs (`token create` is two levels down).
    let (mut sub_command, mut sub) = (None, matches);
    let mut parent = command;
    while let Some((name, m)) = sub.subcommand() {
        let Some(c) = parent.find_subcommand(name) else {
            break;
        };
        (sub_command, sub, parent) = (Some(c), m, c);
    }
    let mut extra = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let known = |c: &Command| {
            c.get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()) && !a.is_hide_set())
                .map(|a| a.get_id().to_string())
        };
        let global = known(command);
        if global.is_none() && known(serve).is_none() || long == "config" {
            return Err(format!("{shown}: unknown key `{key}`"));
        }
        let value = match value {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Boolean(true) => None,
            toml::Value::Boolean(false) => continue,
            other => {
                return Err(format!(
                    "{shown}: `{key}`: expected a string, an integer or a boolean, not {}",
                    other.type_str()
                ));
            }
        };
        // Checked as the flag would check it, whichever command runs.
        let owner = if global.is_some() { command } else { serve };
        check(owner, &long, value.as_deref()).map_err(|e| format!("{shown}: `{key}`: {e}"))?;
        let source = match (&global, sub_command.and_then(known)) {
            (Some(id), _) => matches.value_source(id),
            (None, Some(id)) => sub.value_source(&id),
            // A key of `serve` for another command.
            (None, None) => continue,
        };
        if matches!(
            source,
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        extra.push(match value {
            Some(v) => OsString::from(format!("--{long}={v}")),
            None => OsString::from(format!("--{long}")),
        });
    }
    Ok(extra)
}

/// Whether `--long value` alone parses for `owner` (the root command or
/// `serve`): the flag's own error, first line, if not.
fn check(owner: &Command, long: &str, value: Option<&str>) -> Result<(), String> {
    let arg = owner
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .expect("a known flag");
    let flag = format!("--{long}");
    let mut probe = Command::new("probe")
        .no_binary_name(true)
        .arg(arg.clone().required(false).env(None).global(false));
    let args: Vec<String> = match value {
        Some(v) => vec![flag, v.to_string()],
        None => vec![flag],
    };
    probe
        .try_get_matches_from_mut(args)
        .map(|_| ())
        .map_err(|e| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid value").to_string();
            first.trim_start_matches("error: ").to_string()
        })
}
