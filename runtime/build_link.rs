// How stepguard links libtorch (included by build.rs with `include!`).
//
// Three things, for the binaries of every crate that depends on stepguard, not only this
// package's own:
// - `libtorch_cuda` stays NEEDED where the libtorch has one, so that
//   `Device::cuda_if_available()` sees the GPU. torch-sys names it (`-ltorch_cuda`), but rustc
//   links with `--as-needed` and nothing references it, so the linker drops it. Link
//   arguments (`-Wl,--no-as-needed`) reach only this package's binaries, and the `as-needed`
//   link modifier is unstable (rust-lang/rust#99424). What does reach every dependent is a
//   native library: a small static one, linked whole, whose constructor takes the address of
//   one C function of libtorch_cuda. That is a reference the linker cannot drop (constructors
//   are roots of `--gc-sections`), so libtorch_cuda stays NEEDED, with GNU ld, lld and mold
//   alike. Nothing of libtorch_cuda is called. Without libtorch_cuda (a CPU libtorch, macOS,
//   Windows), nothing is added.
// - libtorch's `lib` directory is exported as `DEP_STEPGUARD_LIBTORCH_LIB` (`links =
//   "stepguard"`) to the build scripts of crates that depend on stepguard directly.
// - An rpath reaches only this package's own binaries (cargo does not pass link arguments on).
//   A dependent crate's binaries find libtorch through `LD_LIBRARY_PATH`, or through an rpath
//   its own build script adds:
//       if let Ok(lib) = std::env::var("DEP_STEPGUARD_LIBTORCH_LIB") {
//           println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
//       }

/// A C function that libtorch_cuda exports with C linkage (AOTInductor's stable C ABI, since
/// PyTorch 2.2), so its name does not depend on the C++ ABI. Only its address is taken.
const TORCH_CUDA_ANCHOR: &str = "aoti_torch_create_cuda_guard";

/// Exports libtorch's `lib` directory, gives this package's binaries an rpath to it and keeps
/// `libtorch_cuda` NEEDED in every binary that links stepguard. Returns the directory.
fn link_libtorch() -> Option<String> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok()?;
    println!("cargo:libtorch_lib={lib}");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" {
        return Some(lib);
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if let Some(anchor) = cuda_anchor_source(&os, std::path::Path::new(&lib)) {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let src = out.join("keep_torch_cuda.c");
        std::fs::write(&src, anchor).expect("write keep_torch_cuda.c");
        cc::Build::new()
            .file(&src)
            .pic(true)
            .cargo_metadata(false)
            .compile("stepguard_keep_torch_cuda");
        println!("cargo:rustc-link-search=native={}", out.display());
        // Linked whole (no member is referenced by name), and not bundled into the rlib, so
        // that the final link of each dependent binary sees the archive itself.
        println!("cargo:rustc-link-lib=static:+whole-archive,-bundle=stepguard_keep_torch_cuda");
        // After it on the command line, so that the reference is seen first.
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    Some(lib)
}

/// The C source that keeps libtorch_cuda NEEDED, when the target is Linux and `lib` (libtorch's
/// `lib` directory) holds `libtorch_cuda.so`; `None` otherwise (nothing to keep).
fn cuda_anchor_source(os: &str, lib: &std::path::Path) -> Option<String> {
    if os != "linux" || !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    Some(format!(
        "/* Keeps libtorch_cuda NEEDED (stepguard's build script): takes the address of one of\n\
         * its functions at load time and never calls it. */\n\
         extern void {TORCH_CUDA_ANCHOR}(void);\n\
         void (*volatile stepguard_torch_cuda_anchor)(void);\n\
         __attribute__((constructor, used)) static void stepguard_keep_torch_cuda(void) {{\n\
         \x20   stepguard_torch_cuda_anchor = {TORCH_CUDA_ANCHOR};\n\
         }}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libtorch_dir(files: &[&str]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "stepguard-build-link-{}-{}",
            std::process::id(),
            files.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for f in files {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        dir
    }

    #[test]
    fn anchor_only_for_a_libtorch_with_libtorch_cuda_on_linux() {
        let cpu = libtorch_dir(&["libtorch_cpu.so", "libc10.so"]);
        assert_eq!(cuda_anchor_source("linux", &cpu), None);
        let cuda = libtorch_dir(&["libtorch_cpu.so", "libc10.so", "libtorch_cuda.so"]);
        let src = cuda_anchor_source("linux", &cuda).expect("a CUDA libtorch");
        assert!(src.contains("= aoti_torch_create_cuda_guard;"), "{src}");
        assert!(src.contains("__attribute__((constructor"), "{src}");
        assert_eq!(cuda_anchor_source("macos", &cuda), None);
        assert_eq!(cuda_anchor_source("windows", &cuda), None);
    }
}
