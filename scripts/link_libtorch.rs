//! Shared build script of the crates that link libtorch (train, worker, cli).
//!
//! It embeds an rpath to `$LIBTORCH/lib`, so binaries and test executables find
//! libtorch with no `LD_LIBRARY_PATH`, and it refuses to build with a message that points
//! at `just setup` when libtorch is missing or is not the pinned version.
use std::path::PathBuf;

const STAMP_PREFIX: &str = "torch==2.11.0 ";

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(dir) = std::env::var_os("LIBTORCH") else {
        fail("LIBTORCH is not set (it is set in .cargo/config.toml)");
    };
    let dir = PathBuf::from(dir);
    let stamp = dir.join("STAMP");
    println!("cargo:rerun-if-changed={}", stamp.display());
    match std::fs::read_to_string(&stamp) {
        Ok(s) if s.starts_with(STAMP_PREFIX) => {}
        Ok(s) => fail(&format!(
            "{} holds `{}`, not libtorch 2.11.0",
            stamp.display(),
            s.trim()
        )),
        Err(_) => fail(&format!("no libtorch at {}", dir.display())),
    }
    let dir = dir.canonicalize().unwrap_or(dir);
    // The default corpus (libtorch's headers) is found through this path at run time.
    println!("cargo:rustc-env=PHALANX_LIBTORCH_DIR={}", dir.display());
    let lib = dir.join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}

fn fail(why: &str) -> ! {
    eprintln!("error: {why}.\nerror: run `just setup` to fetch libtorch 2.11.0 into .libtorch/");
    panic!("libtorch missing: {why}; run `just setup`");
}
