//! Process helpers for `phalanx cluster up/down` and fault injection (Unix signals by pid).

use std::os::unix::ffi::OsStrExt;

/// Send `SIGTERM` to a process. Returns false when it does not exist.
pub fn terminate(pid: u32) -> bool {
    signal(pid, libc::SIGTERM)
}

/// Send `SIGKILL` to a process. Returns false when it does not exist.
pub fn kill(pid: u32) -> bool {
    signal(pid, libc::SIGKILL)
}

pub fn is_alive(pid: u32) -> bool {
    signal(pid, 0)
}

/// Whether `pid` runs a Phalanx program (`phalanx`, `phalanx-train`, ...), from its
/// `/proc/PID/cmdline`. A pid recorded in `cluster.json` can have been reused by an
/// unrelated process once ours exited; this keeps a stale record from signalling it.
/// True when the system cannot tell (no `/proc`, or an empty command line: a zombie).
pub fn is_phalanx(pid: u32) -> bool {
    if !std::path::Path::new("/proc/self/cmdline").exists() {
        return true;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    if argv0.is_empty() {
        return true;
    }
    std::path::Path::new(std::ffi::OsStr::from_bytes(argv0))
        .file_name()
        .is_some_and(|n| n.as_bytes().starts_with(b"phalanx"))
}

/// A process recorded in `cluster.json` that is still there and still ours.
pub fn recorded_alive(pid: u32) -> bool {
    is_alive(pid) && is_phalanx(pid)
}

/// Send `sig` to `pid`; false when there is no such process (or pid 0).
pub fn signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_phalanx_processes_count_as_recorded() {
        // A `sleep` child is no phalanx program. Until it has exec'd, its command line is
        // this test binary's (`phalanx_controller-…`, which is): wait for the exec.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !std::fs::read(format!("/proc/{}/cmdline", child.id()))
            .is_ok_and(|c| c.starts_with(b"sleep"))
        {
            assert!(std::time::Instant::now() < deadline, "sleep never started");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(is_alive(child.id()));
        assert!(!is_phalanx(child.id()));
        assert!(!recorded_alive(child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_phalanx(u32::MAX));
        assert!(!signal(0, 0) && !is_alive(0));
    }
}
