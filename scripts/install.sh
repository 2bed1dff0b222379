#!/usr/bin/env bash
# Create .venv and install pyro_sgmcmc into it, with a CPU-only torch.
#
#   bash scripts/install.sh            # the package
#   bash scripts/install.sh test       # ... with the test extras (likewise bench, tutorials)
#
# torch is installed first, CPU build: a bare "torch" requirement resolved by pip on Linux pulls
# several GB of CUDA wheels. A local CPU wheel is used where pip can find one (find-links),
# otherwise the PyTorch CPU index. Set PYTHON to choose the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
"${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
"$py" -m pip install --quiet --upgrade pip
local_wheels=()
[ -d /opt/wheels ] && local_wheels=(--find-links /opt/wheels)
if ! "$py" -c "import torch" 2>/dev/null; then
  if ! "$py" -m pip install --quiet "${local_wheels[@]}" "torch==2.13.0+cpu" 2>/dev/null; then
    "$py" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$py" -m pip install --quiet -e ".${extras:+[$extras]}"
if [[ "$extras" == *test* || "$extras" == *tutorials* ]]; then
  # laplace-torch, which tutorials/llc_wbic_marglik.ipynb compares with, requires torchvision, whose
  # resolution replaces the CPU torch with a CUDA build; what the tutorial uses of laplace runs without
  # it: install its other requirements, then it without dependencies (asdfghjkl too: laplace imports it)
  "$py" -m pip install --quiet linear_operator opt-einsum einops unfoldNd einconv torchmetrics lightning-utilities
  "$py" -m pip install --quiet --no-deps "laplace-torch==0.3" "backpack-for-pytorch==1.7.1" "curvlinops-for-pytorch==3.0.1" \
    "asdfghjkl==0.1a4"
fi
"$py" -c "import torch, pyro, pyro_sgmcmc; print('installed: torch', torch.__version__, '| pyro', pyro.__version__, '| pyro_sgmcmc', pyro_sgmcmc.__version__)"
