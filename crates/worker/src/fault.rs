//! Fault-injection hooks of a worker (chaos testing only).
//!
//! `phalanx fault inject` appends one JSON object per line to a worker's inbox file; the
//! worker, started with `--fault-inbox`, reads new lines on every heartbeat. A worker
//! started without an inbox has no hooks at all. Signals do the rest (`kill`, `hang`),
//! from the outside.
use std::io::{BufRead, Seek, SeekFrom};
use std::path::PathBuf;

// The message and its kinds are shared with `phalanx fault` (which links no libtorch).
pub use phalanx_proto::fault::{Fault, FaultKind};

/// Reads faults appended to a file since the last poll. Malformed lines are skipped with
/// a warning (the inbox is written by `phalanx fault inject`, but it is still input).
pub struct FaultInbox {
    path: PathBuf,
    offset: u64,
}

impl FaultInbox {
    pub fn new(path: PathBuf) -> Self {
        // Faults written before this worker started are not for this incarnation.
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Self { path, offset }
    }

    pub fn poll(&mut self) -> Vec<Fault> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut reader = std::io::BufReader::new(f);
        let mut line = String::new();
        while let Ok(n) = reader.read_line(&mut line) {
            if n == 0 || !line.ends_with('\n') {
                break; // nothing more, or a line still being written
            }
            self.offset += n as u64;
            match serde_json::from_str::<Fault>(line.trim()) {
                Ok(fault) => match fault.validate() {
                    Ok(()) => out.push(fault),
                    Err(e) => {
                        tracing::warn!(line = line.trim(), error = %e, "ignoring a fault line out of range")
                    }
                },
                Err(e) => {
                    tracing::warn!(line = line.trim(), error = %e, "ignoring a malformed fault line")
                }
            }
            line.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn inbox_yields_each_new_fault_once_and_skips_garbage() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w0.jsonl");
        std::fs::write(&p, "{\"seq\":0,\"kind\":\"crash\"}\n").unwrap();
        let mut inbox = FaultInbox::new(p.clone());
        assert!(
            inbox.poll().is_empty(),
            "faults from before the start are ignored"
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        writeln!(
            f,
            "{{\"seq\":1,\"kind\":\"slow\",\"factor\":4,\"for_ms\":1000}}"
        )
        .unwrap();
        writeln!(f, "not json").unwrap();
        write!(f, "{{\"seq\":2,\"kind\":\"ecc\"}}").unwrap(); // no newline yet
        let got = inbox.poll();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].kind, FaultKind::Slow);
        assert_eq!(got[0].duration(), Duration::from_secs(1));
        writeln!(f).unwrap();
        assert_eq!(inbox.poll()[0].kind, FaultKind::Ecc);
        assert!(inbox.poll().is_empty());
    }
}
