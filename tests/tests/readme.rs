//! The README's examples are reproducible: its `phalanx train` command, run by this build,
//! prints the `params_sha256` the README shows for this machine's CPU vendor (the output
//! shown is from one CPU; a table gives the hash per `vendor_id`, because the numerics
//! profile pins the kernels' ISA but AMD and Intel CPUs still compute other bits).
use std::time::Duration;

use phalanx_tests::{phalanx, run_with_timeout, stderr_of};

/// The README's `phalanx train` command line (its arguments after `train`) and the
/// params_sha256 of the example output that follows it.
fn readme_train_example() -> (Vec<String>, String) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let (at, line) = text
        .lines()
        .scan(0usize, |pos, l| {
            let here = *pos;
            *pos += l.len() + 1;
            Some((here, l))
        })
        .find(|(_, l)| {
            l.trim_start()
                .starts_with("./target/release/phalanx train ")
        })
        .expect("README.md has a `./target/release/phalanx train ...` example");
    let args: Vec<String> = line
        .split_whitespace()
        .skip(2)
        .map(str::to_string)
        .collect();
    let rest = &text[at..];
    let shown = rest
        .lines()
        .find_map(|l| {
            l.trim_start()
                .starts_with("done:")
                .then(|| l.split("params_sha256 ").nth(1))
                .flatten()
        })
        .expect("the README's example output has a `done: ... params_sha256 X` line")
        .trim()
        .to_string();
    let vendor = cpu_vendor();
    let row = format!("(`{vendor}`)");
    let sha = rest
        .lines()
        .find(|l| l.starts_with('|') && l.contains(&row))
        .and_then(|l| l.split('`').nth(3))
        .unwrap_or_else(|| {
            panic!(
                "README.md records no params_sha256 for CPU vendor {vendor}; run its command \
                 on this machine and add a row"
            )
        })
        .to_string();
    assert!(
        rest.lines().any(|l| l.contains(&format!("`{shown}`"))),
        "the example output's hash {shown} is in the table too"
    );
    assert_eq!(sha.len(), 64, "{sha:?}");
    (args, sha)
}

/// This machine's CPU vendor (`vendor_id` of /proc/cpuinfo).
fn cpu_vendor() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .expect("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("vendor_id")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .expect("a vendor_id line in /proc/cpuinfo")
}

#[test]
fn the_readme_train_example_reproduces_its_params_sha256() {
    let (mut args, sha) = readme_train_example();
    assert!(
        args.iter().any(|a| a.starts_with("--seed")),
        "the README's command names its seed: {args:?}"
    );
    // Its `--summary FILE` goes to a temporary directory.
    let dir = tempfile::tempdir().unwrap();
    if let Some(i) = args.iter().position(|a| a == "--summary") {
        args[i + 1] = dir.path().join("s.json").display().to_string();
    }
    let mut c = phalanx();
    c.arg("train").args(&args).arg("--plain");
    let out = run_with_timeout(c, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "phalanx train {args:?} failed:\n{}",
        stderr_of(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let got = stdout
        .lines()
        .find_map(|l| l.split("params_sha256 ").nth(1))
        .unwrap_or_else(|| panic!("no params_sha256 in the output:\n{stdout}"))
        .trim();
    assert_eq!(
        got,
        sha,
        "README.md shows params_sha256 {sha} for `phalanx train {}` on {}; this build prints {got}. \
         Regenerate the example (docs/training.md, numerics) if the change of bits is intended.",
        args.join(" "),
        cpu_vendor()
    );
}
