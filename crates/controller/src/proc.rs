//! Process helpers for `phalanx cluster up/down` (Unix signals by pid).

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

fn signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}
