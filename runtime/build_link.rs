/// Shared by the build scripts of the workspace's packages (included with `include!`): an rpath
/// to libtorch, `libtorch_cuda` kept linked. Returns libtorch's `lib` directory.
#[allow(dead_code)]
fn link_libtorch() -> Option<String> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok()?;
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return Some(lib);
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // For tests that run other binaries (trybuild's) that have no rpath of their own.
    println!("cargo:rustc-env=STEPGUARD_LIBTORCH_LIB={lib}");
    // rustc links with --as-needed, which drops libtorch_cuda (nothing references it directly);
    // name it again after --no-as-needed so its DT_NEEDED entry stays.
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    Some(lib)
}
