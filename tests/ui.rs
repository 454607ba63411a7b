//! Compile-time behaviour of `#[guarded_step]`: what compiles, and the errors (with their
//! spans and suggestions) for everything that must not.

#[test]
fn ui() {
    // trybuild's binaries have no rpath: point them at the libtorch this suite links.
    let lib = env!("STEPGUARD_LIBTORCH_LIB");
    let path =
        std::env::var("LD_LIBRARY_PATH").map_or_else(|_| lib.to_string(), |p| format!("{lib}:{p}"));
    std::env::set_var("LD_LIBRARY_PATH", path);
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
