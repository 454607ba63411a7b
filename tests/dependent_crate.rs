//! A crate of the user's own that depends on stepguard (by path) and on tch, built with cargo
//! as a user would: its binaries NEED `libtorch_cuda` where the libtorch has one (so that
//! `Device::cuda_if_available()` sees a GPU) with no link flags of the user's; they run with
//! `LD_LIBRARY_PATH`, or without it when the crate's build script adds the rpath from
//! `DEP_STEPGUARD_LIBTORCH_LIB`. The build logic's CPU-only branch (no `libtorch_cuda.so`, no
//! link directive) is tested on its own, in `build_link::tests`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The build logic itself (runtime/build_link.rs), for its unit tests; `cc` (a build
/// dependency there) is stood in for by a builder that does nothing, as only the decisions are
/// tested here.
#[allow(dead_code)]
mod build_link {
    mod cc {
        pub struct Build;
        impl Build {
            pub fn new() -> Self {
                Build
            }
            pub fn file(&mut self, _: impl AsRef<std::path::Path>) -> &mut Self {
                self
            }
            pub fn pic(&mut self, _: bool) -> &mut Self {
                self
            }
            pub fn cargo_metadata(&mut self, _: bool) -> &mut Self {
                self
            }
            pub fn compile(&mut self, _: &str) {}
        }
    }
    include!("../runtime/build_link.rs");
}

const MANIFEST: &str = r#"[package]
name = "user-app"
version = "0.1.0"
edition = "2021"
publish = false

# Its own workspace, not the one of the directory it sits in.
[workspace]

[dependencies]
stepguard = { path = "@RUNTIME@" }
tch = ">=0.24, <0.27"

[[bin]]
name = "user_app_plain"
path = "src/plain.rs"

[[bin]]
name = "user_app_rpath"
path = "src/rpath.rs"
"#;

// The two lines a user's build script needs for an rpath; here for one binary only, to test
// both ways of finding libtorch in one build.
const BUILD_RS: &str = r#"fn main() {
    let lib = std::env::var("DEP_STEPGUARD_LIBTORCH_LIB").expect("DEP_STEPGUARD_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg-bin=user_app_rpath=-Wl,-rpath,{lib}");
}
"#;

const MAIN_RS: &str = r#"use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

#[guarded_step(max_norm = 1.0)]
fn step(opt: &mut nn::Optimizer, net: &nn::Linear, x: &Tensor, y: &Tensor) -> f64 {
    let loss = net.forward(x).mse_loss(y, tch::Reduction::Mean);
    opt.backward_step(&loss);
    loss.double_value(&[])
}

fn main() {
    let device = Device::cuda_if_available();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = nn::linear(vs.root(), 4, 1, Default::default());
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = Tensor::randn([16, 4], (Kind::Float, device));
    let y = x.sum_dim_intlist(1, true, Kind::Float);
    let first = step(&mut opt, &net, &x, &y);
    let mut last = first;
    for _ in 0..20 {
        last = step(&mut opt, &net, &x, &y);
    }
    println!(
        "device {device:?} cuda {} loss {first:.4} -> {last:.4} learned {}",
        tch::Cuda::is_available(),
        last < first / 2.0
    );
    println!("{}", stepguard::report());
}
"#;

/// `readelf -d`: the NEEDED libraries and the RUNPATH/RPATH entries of `bin`.
fn dynamic_section(bin: &Path) -> (Vec<String>, Vec<String>) {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(bin)
        .output()
        .expect("readelf (binutils) on PATH");
    assert!(out.status.success(), "readelf -d {}", bin.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |line: &str| {
        let (_, v) = line.split_once('[')?;
        Some(v.trim_end().trim_end_matches(']').to_string())
    };
    let (mut needed, mut runpath) = (Vec::new(), Vec::new());
    for line in text.lines() {
        if line.contains("(NEEDED)") {
            needed.extend(value(line));
        } else if line.contains("(RUNPATH)") || line.contains("(RPATH)") {
            runpath.extend(
                value(line)
                    .into_iter()
                    .flat_map(|v| v.split(':').map(str::to_string).collect::<Vec<_>>()),
            );
        }
    }
    (needed, runpath)
}

/// Whether a GPU is visible to the driver (independently of libtorch): `nvidia-smi -L` lists one.
fn gpu_present() -> bool {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU"))
}

/// Writes the crate under this suite's target directory and builds its binaries, sharing the
/// suite's target directory so that tch, torch-sys and stepguard are not compiled again.
fn build_user_crate() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.join("user-app");
    let runtime = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = MANIFEST.replace("@RUNTIME@", runtime.to_str().unwrap());
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(dir.join("build.rs"), BUILD_RS).unwrap();
    std::fs::write(dir.join("src/plain.rs"), MAIN_RS).unwrap();
    std::fs::write(dir.join("src/rpath.rs"), MAIN_RS).unwrap();
    // The suite's versions of every crate (offline, and the compiled ones are reused).
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock");
    std::fs::copy(lock, dir.join("Cargo.lock")).unwrap();
    // CARGO_TARGET_TMPDIR is `<target dir>/tmp`.
    let target = tmp.parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = std::time::Instant::now();
    let out = Command::new(cargo)
        .args(["build", "--offline", "--bins", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building the dependent crate failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("dependent crate built in {:.1?}", started.elapsed());
    target.join("debug")
}

#[test]
fn a_dependent_crate_needs_libtorch_cuda_and_runs() {
    let lib = env!("STEPGUARD_LIBTORCH_LIB");
    let has_cuda = Path::new(lib).join("libtorch_cuda.so").exists();
    let bins = build_user_crate();
    let lib_canon = std::fs::canonicalize(lib).unwrap();

    for name in ["user_app_plain", "user_app_rpath"] {
        let bin = bins.join(name);
        let (needed, runpath) = dynamic_section(&bin);
        assert!(
            needed.iter().any(|n| n == "libtorch_cpu.so"),
            "{name}: {needed:?}"
        );
        assert_eq!(
            needed.iter().any(|n| n == "libtorch_cuda.so"),
            has_cuda,
            "{name}: NEEDED {needed:?}, libtorch_cuda.so in {lib}: {has_cuda}"
        );
        let points_to_lib = runpath
            .iter()
            .any(|p| std::fs::canonicalize(p).is_ok_and(|p| p == lib_canon));
        assert_eq!(
            points_to_lib,
            name == "user_app_rpath",
            "{name}: RUNPATH {runpath:?}"
        );
    }

    let gpu = gpu_present();
    let run = |name: &str, ld_library_path: Option<&str>| {
        let mut cmd = Command::new(bins.join(name));
        cmd.env_remove("LD_LIBRARY_PATH");
        if let Some(p) = ld_library_path {
            cmd.env("LD_LIBRARY_PATH", p);
        }
        let out = cmd.output().expect("run the dependent binary");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };
    for (name, path) in [("user_app_plain", Some(lib)), ("user_app_rpath", None)] {
        let (ok, stdout, stderr) = run(name, path);
        assert!(ok, "{name}: {stdout}\n{stderr}");
        assert!(stdout.contains(&format!("cuda {gpu}")), "{name}: {stdout}");
        assert!(stdout.contains("learned true"), "{name}: {stdout}");
        assert!(stdout.contains("guarded step"), "{name}: {stdout}");
    }
    // Without rpath or LD_LIBRARY_PATH the loader names the library it misses (unless libtorch
    // sits in a directory the loader searches anyway).
    let (ok, _, stderr) = run("user_app_plain", None);
    if !ok {
        assert!(
            stderr.contains("cannot open shared object file"),
            "{stderr}"
        );
    }
}
