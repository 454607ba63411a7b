# Sourced by the other scripts: makes sure PyTorch 2.11.0 (libtorch for tch 0.24) is installed
# from PyPI in a cached virtual environment, and points the tch build at it.
# Cache: $STEPGUARD_CACHE, else ~/.cache/stepguard (shared by every clone; nothing in the tree).
# STEPGUARD_TORCH_VERSION picks another PyTorch (scripts/test-tch-0.26.sh uses 2.13.0).
TORCH_VERSION="${STEPGUARD_TORCH_VERSION:-2.11.0}"
STEPGUARD_CACHE="${STEPGUARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stepguard}"
VENV="$STEPGUARD_CACHE/torch-$TORCH_VERSION"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "stepguard: installing torch==$TORCH_VERSION from PyPI into $VENV (once, about 4.6 GB)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "torch==$TORCH_VERSION"
fi
# PyTorch's reader of safetensors files, for the test that PyTorch reads stepguard's checkpoints.
if ! "$VENV/bin/python" -c "import safetensors.torch" 2>/dev/null; then
  echo "stepguard: installing safetensors from PyPI into $VENV (once, under 1 MB)" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "safetensors==0.8.0"
fi
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# NCCL for stepguard::dist: ProcessGroupNCCL's headers also need the CUDA runtime's crt/ and
# CCCL's nv/ headers, which PyTorch's CUDA wheel does not bring: two small header packages of
# the same CUDA version (STEPGUARD_NO_NCCL=1 skips them, and NCCL).
SITE=$(echo "$VENV"/lib/python3*/site-packages)
CUDA_VERSION=$(sed -n "s/^cuda: .*= '\([0-9]*\.[0-9]*\)'$/\1/p" "$SITE/torch/version.py" 2>/dev/null)
if [ -z "${STEPGUARD_NO_NCCL:-}" ] && [ -n "$CUDA_VERSION" ] && [ -e "$SITE/nvidia/nccl/include/nccl.h" ] &&
   [ ! -e "$SITE/nvidia/cu${CUDA_VERSION%%.*}/include/nv/target" ]; then
  echo "stepguard: installing the CUDA $CUDA_VERSION headers NCCL needs into $VENV (once, about 4 MB)" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" ||
    echo "stepguard: without those headers stepguard::dist is built without NCCL" >&2
fi
