//! Small helpers shared by both binaries: JSON files, durations, numerics profiles.
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use phalanx_proto::NumericsProfile;
use serde::Serialize;

pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let body = serde_json::to_string_pretty(v)?;
    std::fs::write(path, body + "\n").with_context(|| format!("writing {}", path.display()))
}

/// A duration with its unit, e.g. `5s`, `800ms`, `2m`, `1.5s`. A bare number is refused
/// (`--for 5` used to mean seconds silently).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len()),
    );
    let v: f64 = num.parse().map_err(|_| {
        format!("bad duration `{s}`: expected a number and a unit, e.g. 5s, 800ms, 2m")
    })?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        "" => {
            return Err(format!(
                "duration `{s}` has no unit: write {s}s, {s}ms or {s}m"
            ))
        }
        _ => return Err(format!("bad duration unit in `{s}`: use ms, s or m")),
    };
    if !(secs.is_finite() && (0.0..1e9).contains(&secs)) {
        return Err(format!("bad duration `{s}`"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_numerics(s: &str) -> Result<NumericsProfile, String> {
    NumericsProfile::parse(s).ok_or_else(|| {
        format!(
            "unknown numerics profile `{s}`; expected one of {}",
            NumericsProfile::ALL.map(|p| p.as_str()).join(", ")
        )
    })
}

/// Puts `profile`'s environment on a worker process about to be spawned, so that it does
/// not have to re-execute itself to apply it (see `phalanx_worker::numerics`).
pub fn apply_numerics(profile: NumericsProfile, cmd: &mut std::process::Command) {
    for (var, want) in profile.environment() {
        match want {
            Some(v) => cmd.env(var, v),
            None => cmd.env_remove(var),
        };
    }
}

/// Every argument of `cmd` and of its subcommands, at any depth, that has no help text:
/// `"phalanx job submit --wait"`. Hidden ones and clap's own --help/--version are
/// skipped.
pub fn undocumented_args(cmd: &clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if a.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                let name = a
                    .get_long()
                    .map(|l| format!("--{l}"))
                    .unwrap_or_else(|| id.to_string());
                out.push(format!("{path} {name}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() {
                continue;
            }
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }
    let mut out = Vec::new();
    walk(cmd, cmd.get_name(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("800ms").unwrap(), Duration::from_millis(800));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        let e = parse_duration("5").unwrap_err();
        assert!(e.contains("no unit") && e.contains("5s"), "{e}");
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}

/// Log format on stderr (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The logging flags of both binaries (global: they go before or after the verb).
#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); `RUST_LOG` overrides it.
    #[arg(long, global = true, default_value = "warn,phalanx=info")]
    pub log: String,
    /// Export trace spans over OTLP/HTTP-protobuf to this collector (http://HOST:PORT;
    /// `/v1/traces` is appended). Unset: no spans leave the process.
    #[arg(
        long,
        global = true,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    pub otlp_endpoint: Option<String>,
}

/// How long a process waits at exit for its last spans to reach the collector.
pub const TRACES_SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(3);

impl LogArgs {
    /// Install the `tracing` subscriber these flags ask for (colours only on a terminal),
    /// with the OpenTelemetry layer when an OTLP endpoint is set; `service` is the
    /// `service.name` of the spans. The returned pipeline must be shut down at exit
    /// ([`phalanx_telemetry::traces::Traces::shutdown`]). A bad endpoint is reported on
    /// stderr and tracing goes on without it.
    pub fn init_tracing(&self, service: &str) -> Option<phalanx_telemetry::traces::Traces> {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .or_else(|_| tracing_subscriber::EnvFilter::try_new(&self.log))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let traces = match phalanx_telemetry::traces::Traces::from_endpoint(
            service,
            self.otlp_endpoint.as_deref(),
        ) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("warning: --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT: {e}; no traces are exported");
                None
            }
        };
        use std::io::IsTerminal;
        let ansi = std::io::stderr().is_terminal();
        // The log filter applies to the logs; the exported spans have their own.
        let otel = traces.as_ref().map(|t| {
            t.layer().with_filter(tracing_subscriber::EnvFilter::new(
                phalanx_telemetry::traces::EXPORT_FILTER,
            ))
        });
        let registry = tracing_subscriber::registry().with(otel);
        match self.log_format {
            LogFormat::Text => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr)
                        .with_filter(filter),
                )
                .init(),
            LogFormat::Json => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr)
                        .with_filter(filter),
                )
                .init(),
        }
        traces
    }
}
