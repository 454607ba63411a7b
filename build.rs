// Test, example and bench binaries of this package find libtorch without LD_LIBRARY_PATH (rpath),
// and keep libtorch_cuda linked so that `Device::cuda_if_available()` sees a GPU.
include!("runtime/build_link.rs");

fn main() {
    link_libtorch();
}
