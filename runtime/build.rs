//! Links libtorch (rpath, libtorch_cuda) and compiles the ATen shim (`csrc/shim.cpp`) against
//! the headers of the libtorch torch-sys found, with the flags torch-sys uses.

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
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .std("c++17")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file("csrc/shim.cpp")
        .compile("stepguard_shim");
}
