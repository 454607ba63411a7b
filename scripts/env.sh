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
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
