//! Shared helpers of the end-to-end tests: they run the real `phalanx` binary as separate
//! processes on 127.0.0.1.
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `phalanx` binary under test: `$PHALANX_BIN` (set by `just test`), else the release
/// build of this workspace. A missing binary fails the test with instructions.
pub fn phalanx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PHALANX_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "PHALANX_BIN={} does not exist", p.display());
        return p;
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
    c.env_remove("PHALANX_CONTROLLERS");
    c.env_remove("PHALANX_TOKEN");
    c.env_remove("PHALANX_TLS_DIR");
    // A collector set in the environment would receive every test's spans (tests that
    // want traces set it on their own command).
    c.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    c
}

/// Run a command to completion within `timeout`; kill it and fail if it overruns.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = KillOnDrop(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn phalanx"),
    );
    let mut out = child.0.stdout.take().unwrap();
    let mut err = child.0.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut b);
        b
    });
    let Some(status) = child.wait_timeout(timeout) else {
        panic!("command did not finish within {timeout:?}: {cmd:?}");
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
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
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub mod cluster;
pub mod controllers;

/// Busy threads competing with the cluster's processes for the cores, as a noisy
/// neighbour on a shared machine does; they stop when dropped.
pub struct BusyThreads {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyThreads {
    pub fn start(n: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        BusyThreads { stop, threads }
    }
}

impl Drop for BusyThreads {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
