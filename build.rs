// The test, example and bench binaries of this package find libtorch without LD_LIBRARY_PATH:
// an rpath to the libtorch stepguard was built against, as any crate that depends on stepguard
// can add in its build script (libtorch_cuda needs nothing here: stepguard keeps it linked).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_STEPGUARD_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_STEPGUARD_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // For tests that run other binaries (trybuild's, a dependent crate's) without an rpath.
    println!("cargo:rustc-env=STEPGUARD_LIBTORCH_LIB={lib}");
}
