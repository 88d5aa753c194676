//! Benchmark of the collective layer with real processes on loopback.
//!
//! ```text
//! collective-bench [--bytes N] [--worlds 2,4] [--iters K] [--chunk-bytes C]
//!                  [--timeout-s S] [--no-tls] [--out FILE.json]
//! ```
//!
//! Measures, in one run:
//! * the raw TCP copy bandwidth of `bytes` between two processes
//!   (`write_all`/`read_exact` in `chunk_bytes` pieces, plus a 1-byte ack);
//! * `all_reduce_sum_f32` bus bandwidth, `busbw = 2 (N-1)/N * bytes / time`
//!   (the NCCL-tests definition), for each N, and the ratio busbw / raw;
//! * `deterministic::reduce_mean` (1 micro-batch per rank) on the same number
//!   of f32 elements, as a time ratio against the plain f32 ring;
//! * both again over mutual TLS (worker certificates of a throw-away cluster CA made for
//!   the run, as a worker of a cluster uses them), and the ratio TLS / plain TCP.
//!
//! Every ring proves an epoch secret in its hellos, with and without TLS (a cost paid
//! once per rendezvous, outside the timed operations).
//!
//! Children are this same binary re-executed with a hidden `--child` mode; each
//! binds 127.0.0.1:0 and prints `ADDR <addr>` on stdout, the parent answers
//! with `PEERS <a,b,..>` on stdin, and each child ends with one `RESULT <json>`
//! line. Every wait has a timeout and children are killed if the parent fails.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::sync::Arc;

use phalanx_collective::{
    deterministic, BlockingGroup, EpochSecret, GroupConfig, RingCredentials, RingTls, Security,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
struct Args {
    bytes: usize,
    worlds: Vec<usize>,
    iters: usize,
    chunk_bytes: usize,
    timeout_s: u64,
    out: Option<String>,
    child: Option<String>,
    rank: usize,
    world: usize,
    peer: Option<SocketAddr>,
    /// Parent: skip the TLS rings.
    no_tls: bool,
    /// Child: the credentials directory (TLS on), with certificates `w<rank>`.
    tls_dir: Option<String>,
}

/// The epoch secret of the benchmark's rings (a loopback benchmark: not a secret).
const BENCH_SECRET: [u8; 32] = [0x42; 32];

fn parse_args() -> Result<Args, BoxErr> {
    let mut a = Args {
        bytes: 40_000_000,
        worlds: vec![2, 4],
        iters: 5,
        chunk_bytes: 1 << 20,
        timeout_s: 300,
        out: None,
        child: None,
        rank: 0,
        world: 1,
        peer: None,
        no_tls: false,
        tls_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--bytes" => a.bytes = v()?.parse().map_err(|e| format!("--bytes: {e}"))?,
            "--worlds" => {
                a.worlds = v()?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--worlds: {s:?}: {e}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--iters" => a.iters = v()?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--chunk-bytes" => {
                a.chunk_bytes = v()?.parse().map_err(|e| format!("--chunk-bytes: {e}"))?
            }
            "--timeout-s" => a.timeout_s = v()?.parse().map_err(|e| format!("--timeout-s: {e}"))?,
            "--out" => a.out = Some(v()?),
            "--child" => a.child = Some(v()?),
            "--rank" => a.rank = v()?.parse()?,
            "--world" => a.world = v()?.parse()?,
            "--peer" => a.peer = Some(v()?.parse()?),
            "--no-tls" => a.no_tls = true,
            "--tls-dir" => a.tls_dir = Some(v()?),
            "-h" | "--help" => {
                println!("collective-bench [--bytes N] [--worlds 2,4] [--iters K] [--chunk-bytes C] [--timeout-s S] [--no-tls] [--out FILE.json]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if a.iters == 0 || a.bytes < 4 || a.chunk_bytes == 0 || a.worlds.iter().any(|&w| w < 2) {
        return Err(
            "need --iters >= 1, --bytes >= 4, --chunk-bytes >= 1 and every world >= 2".into(),
        );
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("collective-bench: {e}");
            std::process::exit(2);
        }
    };
    let r = match args.child.clone() {
        Some(mode) => child_main(&mode, &args),
        None => parent_main(&args),
    };
    if let Err(e) = r {
        eprintln!(
            "collective-bench{}: error: {e}",
            args.child
                .as_deref()
                .map(|m| format!(" [{m} rank {}]", args.rank))
                .unwrap_or_default()
        );
        std::process::exit(1);
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------- children

fn print_line(s: &str) -> Result<(), BoxErr> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{s}")?;
    o.flush()?;
    Ok(())
}

/// Read one line from stdin with a timeout (stdin EOF = parent gone).
fn read_stdin_line(timeout: Duration) -> Result<String, BoxErr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(l)) if !l.is_empty() => Ok(l),
        Ok(Ok(_)) => Err("parent closed stdin".into()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(format!("no peer list on stdin within {timeout:?}").into()),
    }
}

fn child_main(mode: &str, a: &Args) -> Result<(), BoxErr> {
    let timeout = Duration::from_secs(a.timeout_s);
    match mode {
        "raw-recv" => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            print_line(&format!("ADDR {}", l.local_addr()?))?;
            l.set_nonblocking(true)?;
            let deadline = Instant::now() + timeout;
            let mut s = loop {
                match l.accept() {
                    Ok((s, _)) => break s,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => return Err(format!("raw-recv accept: {e}").into()),
                }
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.set_nodelay(true)?;
            let mut buf = vec![0u8; a.chunk_bytes];
            for _ in 0..a.iters + 1 {
                let mut left = a.bytes;
                while left > 0 {
                    let n = left.min(buf.len());
                    s.read_exact(&mut buf[..n])?;
                    left -= n;
                }
                s.write_all(&[1])?;
            }
            print_line("RESULT {}")?;
            Ok(())
        }
        "raw-send" => {
            let peer = a.peer.ok_or("raw-send needs --peer")?;
            let mut s = TcpStream::connect_timeout(&peer, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.set_nodelay(true)?;
            let buf = vec![7u8; a.chunk_bytes];
            let mut times = Vec::new();
            for i in 0..a.iters + 1 {
                let t0 = Instant::now();
                let mut left = a.bytes;
                while left > 0 {
                    let n = left.min(buf.len());
                    s.write_all(&buf[..n])?;
                    left -= n;
                }
                let mut ack = [0u8; 1];
                s.read_exact(&mut ack)?;
                if i > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            print_line(&format!("RESULT {}", json!({ "times_s": times })))?;
            Ok(())
        }
        "ring" => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            print_line(&format!("ADDR {}", l.local_addr()?))?;
            let line = read_stdin_line(timeout)?;
            let peers: Vec<SocketAddr> = line
                .trim()
                .strip_prefix("PEERS ")
                .ok_or("expected PEERS line")?
                .split(',')
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?;
            let mut cfg = GroupConfig::new(a.rank, peers);
            if cfg.world != a.world {
                return Err(format!("got {} peers, expected {}", cfg.world, a.world).into());
            }
            cfg.rendezvous_timeout = timeout;
            cfg.op_timeout = timeout;
            cfg.chunk_bytes = a.chunk_bytes;
            let tls = match &a.tls_dir {
                None => None,
                Some(dir) => {
                    let dir = phalanx_pki::TlsDir::open(std::path::Path::new(dir))?;
                    Some(RingTls {
                        creds: Arc::new(RingCredentials::load(&dir, &format!("w{}", a.rank))?),
                        peer_workers: (0..a.world).map(|r| format!("w{r}")).collect(),
                    })
                }
            };
            cfg.security = Some(Security {
                secret: EpochSecret::new(BENCH_SECRET),
                tls,
            });
            let mut g = BlockingGroup::connect(cfg, l)?;
            let elems = a.bytes / 4;
            let mut data: Vec<f32> = (0..elems)
                .map(|i| ((i % 1000) as f32 + a.rank as f32) * 1e-3)
                .collect();
            let input = data.clone();
            let mut out = vec![0f32; elems];
            let mut f32_times = Vec::new();
            let mut det_times = Vec::new();
            for i in 0..a.iters + 1 {
                data.copy_from_slice(&input);
                g.barrier()?;
                let t0 = Instant::now();
                g.all_reduce_sum_f32(&mut data)?;
                let dt = t0.elapsed().as_secs_f64();
                g.barrier()?;
                let t0 = Instant::now();
                deterministic::reduce_mean(&mut g, &[&input], a.world, &mut out, timeout)?;
                let dd = t0.elapsed().as_secs_f64();
                if i > 0 {
                    f32_times.push(dt);
                    det_times.push(dd);
                }
            }
            // sanity: mean * world == sum (within f32 noise)
            let k = elems / 2;
            let sum = data[k] as f64;
            let mean = out[k] as f64 * a.world as f64;
            if (sum - mean).abs() > 1e-4 * sum.abs().max(1.0) {
                return Err(
                    format!("result mismatch at {k}: sum {sum} vs world*mean {mean}").into(),
                );
            }
            g.barrier()?;
            print_line(&format!(
                "RESULT {}",
                json!({ "rank": a.rank, "f32_times_s": f32_times, "det_times_s": det_times })
            ))?;
            Ok(())
        }
        other => Err(format!("unknown child mode {other:?}").into()),
    }
}

// ---------------------------------------------------------------- parent

struct Kid {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
    name: String,
}

fn spawn_kid(name: String, a: &Args, extra: &[String]) -> Result<Kid, BoxErr> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("--bytes")
        .arg(a.bytes.to_string())
        .arg("--iters")
        .arg(a.iters.to_string())
        .arg("--chunk-bytes")
        .arg(a.chunk_bytes.to_string())
        .arg("--timeout-s")
        .arg(a.timeout_s.to_string())
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("spawn {name}: {e}"))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    Ok(Kid {
        child,
        stdin,
        lines: BufReader::new(stdout).lines(),
        name,
    })
}

impl Kid {
    async fn expect_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, BoxErr> {
        loop {
            match tokio::time::timeout(timeout, self.lines.next_line()).await {
                Err(_) => {
                    return Err(
                        format!("{}: no {prefix} line within {timeout:?}", self.name).into(),
                    )
                }
                Ok(Err(e)) => return Err(format!("{}: reading stdout: {e}", self.name).into()),
                Ok(Ok(None)) => {
                    return Err(format!("{}: exited before printing {prefix}", self.name).into())
                }
                Ok(Ok(Some(l))) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return Ok(rest.trim().to_string());
                    }
                }
            }
        }
    }

    async fn finish(mut self, timeout: Duration) -> Result<(), BoxErr> {
        drop(self.stdin.take());
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(format!("{} exited with {s}", self.name).into()),
            Ok(Err(e)) => Err(format!("{}: wait: {e}", self.name).into()),
            Err(_) => Err(format!("{} did not exit within {timeout:?}", self.name).into()),
        }
    }
}

async fn bench_raw(a: &Args, timeout: Duration) -> Result<Vec<f64>, BoxErr> {
    let mut recv = spawn_kid("raw-recv".into(), a, &["--child".into(), "raw-recv".into()])?;
    let addr = recv.expect_line("ADDR ", timeout).await?;
    let mut send = spawn_kid(
        "raw-send".into(),
        a,
        &["--child".into(), "raw-send".into(), "--peer".into(), addr],
    )?;
    let res: Value = serde_json::from_str(&send.expect_line("RESULT ", timeout).await?)?;
    recv.expect_line("RESULT ", timeout).await?;
    send.finish(timeout).await?;
    recv.finish(timeout).await?;
    let times = res["times_s"]
        .as_array()
        .ok_or("raw-send: bad RESULT")?
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    Ok(times)
}

async fn bench_ring(
    a: &Args,
    world: usize,
    timeout: Duration,
    tls_dir: Option<&std::path::Path>,
) -> Result<(Vec<f64>, Vec<f64>), BoxErr> {
    let mut kids = Vec::new();
    for r in 0..world {
        let mut extra: Vec<String> = vec![
            "--child".into(),
            "ring".into(),
            "--rank".into(),
            r.to_string(),
            "--world".into(),
            world.to_string(),
        ];
        if let Some(d) = tls_dir {
            extra.extend(["--tls-dir".into(), d.display().to_string()]);
        }
        let tag = if tls_dir.is_some() { " TLS" } else { "" };
        kids.push(spawn_kid(format!("ring{tag} rank {r}/{world}"), a, &extra)?);
    }
    let mut addrs = Vec::new();
    for k in kids.iter_mut() {
        addrs.push(k.expect_line("ADDR ", timeout).await?);
    }
    let line = format!("PEERS {}\n", addrs.join(","));
    for k in kids.iter_mut() {
        let stdin = k.stdin.as_mut().ok_or("child stdin gone")?;
        tokio::time::timeout(timeout, stdin.write_all(line.as_bytes()))
            .await
            .map_err(|_| "writing peers timed out")??;
        tokio::time::timeout(timeout, stdin.flush())
            .await
            .map_err(|_| "writing peers timed out")??;
    }
    let mut per_rank = Vec::new();
    for k in kids.iter_mut() {
        let v: Value = serde_json::from_str(&k.expect_line("RESULT ", timeout).await?)?;
        per_rank.push(v);
    }
    for k in kids {
        k.finish(timeout).await?;
    }
    // per iteration, the slowest rank
    let col = |key: &str| -> Vec<f64> {
        let cols: Vec<Vec<f64>> = per_rank
            .iter()
            .map(|v| {
                v[key]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                    .unwrap_or_default()
            })
            .collect();
        (0..a.iters)
            .map(|i| {
                cols.iter()
                    .filter_map(|c| c.get(i).copied())
                    .fold(0.0, f64::max)
            })
            .collect()
    };
    Ok((col("f32_times_s"), col("det_times_s")))
}

fn parent_main(a: &Args) -> Result<(), BoxErr> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timeout = Duration::from_secs(a.timeout_s);
    rt.block_on(async {
        let total = Duration::from_secs(a.timeout_s * 4);
        tokio::time::timeout(total, parent_run(a, timeout))
            .await
            .map_err(|_| format!("benchmark did not finish within {total:?}"))?
    })
}

/// A throw-away cluster CA with worker certificates `w0..w<n>`, removed on drop.
struct BenchPki(std::path::PathBuf);

impl BenchPki {
    fn create(workers: usize) -> Result<BenchPki, BoxErr> {
        let dir = std::env::temp_dir().join(format!("collective-bench-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = BenchPki(dir);
        let t = phalanx_pki::TlsDir::create(&pki.0)?;
        for w in 0..workers {
            t.issue(&phalanx_pki::Role::Worker(format!("w{w}")), &[])?;
        }
        Ok(pki)
    }
}

impl Drop for BenchPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn parent_run(a: &Args, timeout: Duration) -> Result<(), BoxErr> {
    let b = a.bytes as f64;
    let pki = if a.no_tls {
        None
    } else {
        Some(BenchPki::create(
            a.worlds.iter().copied().max().unwrap_or(2),
        )?)
    };
    println!(
        "collective-bench: bytes={} iters={} chunk_bytes={} (median after 1 warm-up)",
        a.bytes, a.iters, a.chunk_bytes
    );
    let raw = bench_raw(a, timeout).await?;
    let raw_t = median(&raw);
    let raw_bw = b / raw_t;
    println!(
        "raw TCP copy (2 processes): {:.4} s, {:.1} MB/s",
        raw_t,
        raw_bw / 1e6
    );
    println!();
    println!(
        "{:>5} {:>12} {:>14} {:>14} {:>12} {:>14} {:>12}",
        "world",
        "f32 time s",
        "busbw MB/s",
        "busbw/raw",
        "det time s",
        "det/f32 time",
        "det busbw MB/s"
    );
    let mut rows = Vec::new();
    let mut tls_rows = Vec::new();
    for &n in &a.worlds {
        let (f, d) = bench_ring(a, n, timeout, None).await?;
        let tf = median(&f);
        let td = median(&d);
        let factor = 2.0 * (n as f64 - 1.0) / n as f64;
        let busbw = factor * b / tf;
        let det_busbw = factor * b / td;
        println!(
            "{:>5} {:>12.4} {:>14.1} {:>14.3} {:>12.4} {:>14.3} {:>12.1}",
            n,
            tf,
            busbw / 1e6,
            busbw / raw_bw,
            td,
            td / tf,
            det_busbw / 1e6
        );
        let mut row = json!({
            "world": n,
            "f32_times_s": f,
            "f32_median_s": tf,
            "busbw_bytes_per_s": busbw,
            "busbw_over_raw": busbw / raw_bw,
            "det_times_s": d,
            "det_median_s": td,
            "det_over_f32_time": td / tf,
            "det_busbw_bytes_per_s": det_busbw,
        });
        if let Some(pki) = &pki {
            let (f, d) = bench_ring(a, n, timeout, Some(&pki.0)).await?;
            let (tf_tls, td_tls) = (median(&f), median(&d));
            let busbw_tls = factor * b / tf_tls;
            let det_busbw_tls = factor * b / td_tls;
            row["tls"] = json!({
                "f32_times_s": f,
                "f32_median_s": tf_tls,
                "busbw_bytes_per_s": busbw_tls,
                "busbw_over_plain": busbw_tls / busbw,
                "det_times_s": d,
                "det_median_s": td_tls,
                "det_busbw_bytes_per_s": det_busbw_tls,
                "det_busbw_over_plain": det_busbw_tls / det_busbw,
            });
            tls_rows.push((n, busbw, busbw_tls, det_busbw, det_busbw_tls));
        }
        rows.push(row);
    }
    if !tls_rows.is_empty() {
        println!();
        println!("the same rings over mutual TLS (worker certificates), against plain TCP:");
        println!(
            "{:>5} {:>14} {:>14} {:>10} {:>16} {:>16} {:>10}",
            "world",
            "busbw MB/s",
            "TLS busbw",
            "TLS/plain",
            "det busbw MB/s",
            "TLS det busbw",
            "TLS/plain"
        );
        for (n, p, t, dp, dt) in tls_rows {
            println!(
                "{:>5} {:>14.1} {:>14.1} {:>10.3} {:>16.1} {:>16.1} {:>10.3}",
                n,
                p / 1e6,
                t / 1e6,
                t / p,
                dp / 1e6,
                dt / 1e6,
                dt / dp
            );
        }
    }
    let report = json!({
        "bytes": a.bytes,
        "iters": a.iters,
        "chunk_bytes": a.chunk_bytes,
        "busbw_definition": "2*(N-1)/N * bytes / median_time (NCCL tests)",
        "raw_tcp": { "times_s": raw, "median_s": raw_t, "bytes_per_s": raw_bw },
        "all_reduce": rows,
    });
    if let Some(path) = &a.out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .map_err(|e| format!("writing {path}: {e}"))?;
        println!("\nwrote {path}");
    }
    Ok(())
}
