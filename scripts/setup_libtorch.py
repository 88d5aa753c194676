#!/usr/bin/env python3
"""Fetch libtorch 2.11.0 (CPU libraries + headers) into ./.libtorch, idempotently.

The only Linux wheel of torch 2.11.0 on PyPI is the cu130 build. Its libtorch_cpu.so
links libcudart.so.13 and libcupti.so.13, so we also take those two libraries from the
NVIDIA wheels that torch's metadata pins (cuda-toolkit 13.0.2 -> cudart 13.0.96,
cupti 13.0.85). Nothing else of CUDA is copied: on a GPU machine the CUDA libraries of
the installed PyTorch are dlopen'ed at run time (see crates/train/src/device.rs).

The wheel is cached in ${XDG_CACHE_HOME:-~/.cache}/phalanx so a re-run is cheap, and the
target folder is written under a temporary name and renamed at the end, so an interrupted
set-up never leaves a half-populated .libtorch behind.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

STAMP = "torch==2.11.0 cudart==13.0.96 cupti==13.0.85 layout=1"
TORCH = "torch==2.11.0"
NVIDIA = ["nvidia-cuda-runtime==13.0.96", "nvidia-cuda-cupti==13.0.85"]
TORCH_LIBS = ["libc10.so", "libtorch_cpu.so", "libtorch.so", "libgomp.so.1"]
NVIDIA_LIBS = ["libcudart.so.13", "libcupti.so.13"]

root = Path(__file__).resolve().parent.parent
dest = Path(os.environ.get("PHALANX_LIBTORCH_DIR", root / ".libtorch")).resolve()
cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phalanx" / "wheels"


def say(msg):
    print(f"[setup] {msg}", flush=True)


def have_everything():
    stamp = dest / "STAMP"
    if not stamp.exists() or stamp.read_text().strip() != STAMP:
        return False
    libs = all((dest / "lib" / n).exists() for n in TORCH_LIBS + NVIDIA_LIBS)
    return libs and (dest / "include" / "torch" / "csrc").is_dir() and (dest / "build-version").exists()


def download(spec):
    cache.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    version = spec.split("==")[1]
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if found:
        return found[0]
    say(f"downloading {spec} from PyPI (cached in {cache})")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(cache), spec]
    r = subprocess.run(cmd)
    if r.returncode != 0:
        sys.exit(f"[setup] error: `{' '.join(cmd)}` failed (exit {r.returncode}); "
                 "is PyPI reachable and pip installed?")
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not found:
        sys.exit(f"[setup] error: pip reported success but no wheel for {spec} in {cache}")
    return found[0]


def main():
    if "--check" in sys.argv[1:]:
        if have_everything():
            say(f"libtorch OK in {dest} ({STAMP})")
            return
        sys.exit(f"[setup] error: libtorch 2.11.0 is missing or incomplete in {dest}; run `just setup`")
    if have_everything():
        say(f"libtorch already in {dest} ({STAMP})")
        return
    tmp = dest.parent / (dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "lib").mkdir(parents=True)

    whl = download(TORCH)
    say(f"extracting headers and CPU libraries from {whl.name}")
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            n = info.filename
            if n.startswith("torch/include/") and not n.endswith("/"):
                out = tmp / "include" / n[len("torch/include/"):]
            elif n.startswith("torch/lib/") and n[len("torch/lib/"):] in TORCH_LIBS:
                out = tmp / "lib" / n[len("torch/lib/"):]
            else:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    for spec in NVIDIA:
        whl = download(spec)
        with zipfile.ZipFile(whl) as z:
            for n in z.namelist():
                base = n.rsplit("/", 1)[-1]
                if base in NVIDIA_LIBS:
                    with z.open(n) as src, open(tmp / "lib" / base, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
    missing = [n for n in TORCH_LIBS + NVIDIA_LIBS if not (tmp / "lib" / n).exists()]
    if missing:
        sys.exit(f"[setup] error: the wheels did not contain {missing}")
    # torch-sys reads this file to check the version it builds against.
    (tmp / "build-version").write_text("2.11.0+cu130\n")
    (tmp / "STAMP").write_text(STAMP + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    say(f"libtorch ready in {dest}")


if __name__ == "__main__":
    main()
