#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs libtorch if needed, then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# A one-off build keeps no incremental caches (they would add about 0.7 GB).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "stepguard: disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ') free" >&2
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc
# The API docs build without a warning (broken or private intra-doc links).
RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings" cargo doc --workspace --no-deps --quiet
# The numeric tests once more on ATen's portable kernels (no AVX2 / AVX-512): they compare
# with values PyTorch wrote on another machine, within ulps, and must hold whatever kernels a
# CPU gets. The binaries are those built above, so this costs only their run time.
NUMERIC_TESTS=(safe_ops numbers clip_reference loss_scale fused_optim runtime_core adaptive_clip spike)
ATEN_CPU_CAPABILITY=default cargo test "$@" "${NUMERIC_TESTS[@]/#/--test=}"
# A run killed with SIGKILL at random moments and resumed ends bitwise as the uninterrupted one.
scripts/resume-check.sh
# Checks stripped from a build without debug assertions (the `strip-release` feature).
cargo test --profile strip --features strip-release --test strip_release
# The crates publish: each is built from its own tarball (the others from a local registry).
# Cargo takes a registry's crate of a known name and version as unchanged: its source under
# CARGO_HOME and its build under target/ stay from an earlier run of this checkout. Both go, so
# each tarball is verified against this tree.
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/stepguard-*
cargo clean -p stepguard-spec -p stepguard-macros
cargo package --allow-dirty -p stepguard-spec -p stepguard-macros -p stepguard
