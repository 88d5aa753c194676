//! Shared helpers of the end-to-end tests: they run the real `phalanx` binary as separate
//! processes on 127.0.0.1.
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The `phalanx` binary under test: `$PHALANX_BIN` (set by `just test`), else the release
/// build in this workspace. A missing binary fails the test with instructions.
pub fn phalanx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PHALANX_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/phalanx");
    assert!(
        p.exists(),
        "the phalanx binary is not at {}; run `just test` (it builds it) or set PHALANX_BIN",
        p.display()
    );
    p
}

pub fn phalanx() -> Command {
    let mut c = Command::new(phalanx_bin());
    c.env_remove("RUST_LOG");
    c
}

/// Runs a command to completion within `timeout`, killing it if it overruns.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn phalanx");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for phalanx"),
        Err(_) => {
            kill_pid(pid);
            panic!("command did not finish within {timeout:?}: {cmd:?}");
        }
    }
}

fn kill_pid(pid: u32) {
    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
}

/// A child process killed when dropped, so a failing test leaves nothing behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl KillOnDrop {
    pub fn wait_timeout(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + t;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.0.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A free loopback port (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub mod cluster;
