//! Links libtorch (rpath, libtorch_cuda) and compiles the ATen shim (`csrc/shim.cpp`) and the
//! ATen observer (`csrc/opwatch.cpp`) against the headers of the libtorch torch-sys found, with
//! the flags torch-sys uses.

include!("build_link.rs");

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(lib) = link_libtorch() else {
        panic!("stepguard: torch-sys did not report libtorch's location (DEP_TCH_LIBTORCH_LIB)");
    };
    let root = std::path::Path::new(&lib).join("..");
    // torch-sys: `-D_GLIBCXX_USE_CXX11_ABI` from LIBTORCH_CXX11_ABI, default 1 (also what the
    // PyPI wheels since 2.7 use); with a mismatch the link fails loudly, never silently.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build.cpp(true).pic(true).warnings(true).std("c++17");
    system_includes(
        &mut build,
        &[
            root.join("include"),
            root.join("include/torch/csrc/api/include"),
        ],
    );
    build
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file("csrc/shim.cpp")
        .compile("stepguard_shim");
    build_opwatch(&root, &abi);
    build_dist(&root, &abi);
}

/// Compiles the ATen observer of a replayed step (`csrc/opwatch.cpp`, `replay::watch`) as its own
/// unit, with shim.cpp's flags and `-DNDEBUG`: without it `at::RecordFunction` has a debug-only
/// member, a layout different from the release libtorch's, and reading an operator's inputs
/// asserts ("Called inputs() outside RecordFunction start callback").
fn build_opwatch(root: &std::path::Path, abi: &str) {
    println!("cargo:rerun-if-changed=csrc/opwatch.cpp");
    let mut build = cc::Build::new();
    build.cpp(true).pic(true).warnings(true).std("c++17");
    system_includes(
        &mut build,
        &[
            root.join("include"),
            root.join("include/torch/csrc/api/include"),
        ],
    );
    build
        .define("_GLIBCXX_USE_CXX11_ABI", abi)
        .define("GLOG_USE_GLOG_EXPORT", None)
        .define("NDEBUG", None)
        .file("csrc/opwatch.cpp")
        .compile("stepguard_opwatch");
}

/// `dirs` as system include directories (`-isystem`), so the warnings reported are those of
/// stepguard's own C++, not of the headers it includes.
fn system_includes(build: &mut cc::Build, dirs: &[std::path::PathBuf]) {
    let msvc = build.get_compiler().is_like_msvc();
    for dir in dirs {
        if msvc {
            build.include(dir);
        } else {
            build.flag("-isystem").flag(dir.to_string_lossy().as_ref());
        }
    }
}

/// Compiles the c10d bridge (`csrc/dist.cpp`, `stepguard::dist`): Gloo always, with the Gloo
/// declarations of `csrc/include` (the wheel ships none) before the torch headers; NCCL
/// (`csrc/dist_nccl.cpp`) only where libtorch has libtorch_cuda and the NCCL and CUDA toolkit
/// headers are found (`STEPGUARD_NO_NCCL=1` leaves it out).
fn build_dist(root: &std::path::Path, abi: &str) {
    for f in ["csrc/dist.cpp", "csrc/dist_nccl.cpp", "csrc/include"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=STEPGUARD_NO_NCCL");
    println!("cargo:rerun-if-env-changed=STEPGUARD_NCCL");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=NCCL_INCLUDE_DIR");
    let mut build = cc::Build::new();
    build.cpp(true).pic(true).warnings(true).std("c++17");
    // The Gloo declarations first, then libtorch's.
    let torch = [
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
    ];
    system_includes(&mut build, &[std::path::PathBuf::from("csrc/include")]);
    system_includes(&mut build, &torch);
    build
        .define("_GLIBCXX_USE_CXX11_ABI", abi)
        .define("GLOG_USE_GLOG_EXPORT", None)
        .define("USE_C10D_GLOO", None)
        .file("csrc/dist.cpp");
    match nccl_includes(root) {
        Ok(dirs) => {
            build
                .define("SG_WITH_NCCL", None)
                .define("USE_C10D_NCCL", None);
            build.includes(dirs).file("csrc/dist_nccl.cpp");
        }
        // Said only when asked for (STEPGUARD_NCCL=1) where libtorch has CUDA: the default
        // PyPI wheel is a CUDA build, and most of its users never ask for NCCL.
        Err(Some(why)) if std::env::var_os("STEPGUARD_NCCL").is_some() => {
            println!("cargo:warning=stepguard::dist without NCCL: {why}")
        }
        Err(_) => {}
    }
    build.compile("stepguard_dist");
}

/// The include directories ProcessGroupNCCL.hpp needs (nccl.h; the CUDA runtime and its CCCL
/// headers), or why NCCL is left out (`None`: not wanted, or libtorch has no CUDA).
fn nccl_includes(root: &std::path::Path) -> Result<Vec<std::path::PathBuf>, Option<String>> {
    use std::path::PathBuf;
    if std::env::var_os("STEPGUARD_NO_NCCL").is_some_and(|v| v != "0")
        || !root.join("lib/libtorch_cuda.so").exists()
    {
        return Err(None);
    }
    // The wheel's layout: site-packages/torch is `root`, nvidia/* next to it.
    let site = root.join("..");
    let nccl: Vec<PathBuf> = std::env::var_os("NCCL_INCLUDE_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([site.join("nvidia/nccl/include")])
        .collect();
    // A CUDA toolkit, or the wheel's nvidia/cu13 (the runtime headers; CCCL's <nv/target> and
    // crt/ come with the nvidia-cuda-cccl and nvidia-cuda-crt packages).
    let cuda: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|d| PathBuf::from(d).join("include"))
        .chain([
            site.join("nvidia/cu13/include"),
            PathBuf::from("/usr/local/cuda/include"),
        ])
        .collect();
    // Headers installed later (scripts/env.sh's header packages) rebuild with NCCL.
    for dir in nccl.iter().chain(&cuda).filter(|d| d.is_dir()) {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let find = |dirs: &[PathBuf], file: &str| dirs.iter().find(|d| d.join(file).exists()).cloned();
    let nccl = find(&nccl, "nccl.h").ok_or(Some("nccl.h not found (NCCL_INCLUDE_DIR)".into()))?;
    let mut dirs = vec![nccl];
    for file in ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"] {
        let dir = find(&cuda, file).ok_or(Some(format!(
            "no CUDA toolkit headers with {file} (CUDA_HOME, or pip's nvidia-cuda-cccl and \
             nvidia-cuda-crt)"
        )))?;
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    Ok(dirs)
}
