// The NCCL half of stepguard's c10d bridge (csrc/dist.cpp): a ProcessGroupNCCL for CUDA tensors.
//
// Compiled by runtime/build.rs only when nccl.h and the CUDA runtime headers are found (the
// wheel's nvidia-nccl and nvidia-cuda-runtime packages ship them in site-packages) and libtorch
// has libtorch_cuda; dist.cpp is then built with -DSG_WITH_NCCL. The caller catches exceptions.

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>

c10::intrusive_ptr<c10d::Backend> sg_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                                 int rank, int size,
                                                 std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
}
