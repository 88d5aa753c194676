//! One table of exit codes for every verb, and quiet broken pipes.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | done: the command was applied, or asked for the state things are already in |
//! | 1 | rejected or failed: the one error line on stderr says why |
//! | 2 | bad usage: a flag or argument is wrong (clap's own errors exit 2 too) |
//! | 3 | cluster unreachable: no controller answered within `--wait` (default 1.5 s) |
//!
//! The table is in docs/cli.md; keep both the same.
use phalanx_controller::client::ClientError;

pub const EXIT_DONE: u8 = 0;
pub const EXIT_REJECTED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;

/// A failure whose exit code is not the default 1.
#[derive(Debug)]
pub enum Failure {
    /// The cluster refused the command (exit 1); the reason is the controller's.
    Rejected(String),
    /// The command line is wrong (exit 2).
    Usage(String),
    /// No controller answered (exit 3).
    Unreachable(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Rejected(m) => write!(f, "rejected: {m}"),
            Failure::Usage(m) => f.write_str(m),
            Failure::Unreachable(m) => write!(f, "cluster unreachable: {m}"),
        }
    }
}

impl std::error::Error for Failure {}

/// `Err(Failure::Usage)` as an `anyhow::Error`.
pub fn usage<T>(m: impl Into<String>) -> anyhow::Result<T> {
    Err(Failure::Usage(m.into()).into())
}

/// The exit code of an error, by the table above.
/// A verb's result as the process's exit: 0, or its error on stderr (one line) and the
/// code of the table above.
pub fn exit(res: anyhow::Result<()>) -> std::process::ExitCode {
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(f) = e.downcast_ref::<Failure>() {
        return match f {
            Failure::Rejected(_) => EXIT_REJECTED,
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Unreachable(_) => EXIT_UNREACHABLE,
        };
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Unavailable { .. }) => EXIT_UNREACHABLE,
        Some(ClientError::NoAddresses) => EXIT_USAGE,
        _ => EXIT_REJECTED,
    }
}

/// Writing to a closed pipe (`phalanx job status | head -1`) ends the process quietly,
/// as it does for `ls` or `cat`, instead of panicking in `println!`. Only for the short
/// operator verbs: a long-running process (a controller, `cluster up`) keeps Rust's
/// default, where a peer closing a socket is an error to handle, not a reason to die.
pub fn quiet_broken_pipe() {
    // SAFETY: signal(2) with a valid signal number and the default disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_table() {
        let unreachable: anyhow::Error = ClientError::Unavailable {
            deadline_ms: 2000,
            addrs: "a".into(),
            last: "refused".into(),
        }
        .into();
        assert_eq!(exit_code(&unreachable), EXIT_UNREACHABLE);
        let wrapped = unreachable.context("submitting the job");
        assert_eq!(exit_code(&wrapped), EXIT_UNREACHABLE);
        assert_eq!(
            exit_code(&Failure::Rejected("no".into()).into()),
            EXIT_REJECTED
        );
        assert_eq!(exit_code(&Failure::Usage("bad".into()).into()), EXIT_USAGE);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), EXIT_REJECTED);
    }
}
