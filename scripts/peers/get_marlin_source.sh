#!/bin/bash
# Copies, unchanged, the upstream files that scripts/peers/marlin_peer.py builds into the ignored
# folder .peers/ (they are never committed to quantlab).
#   scripts/peers/get_marlin_source.sh GPTQMODEL_GIT_DIR [IST_MARLIN_GIT_DIR]
# GPTQMODEL_GIT_DIR: a clone of github.com/ModelCloud/GPTQModel (its .git folder or a bare repo);
# IST_MARLIN_GIT_DIR: a clone of github.com/IST-DASLab/marlin (optional: the original kernel,
# which --check also tries). The commits the committed results came from:
set -euo pipefail
GPTQMODEL_COMMIT=f4c327a17eb3e24524d5a97a3d682e3696ae6a28
IST_COMMIT=2f6d7c10e124b3c5fa29ff8d77d568bd7af3274c
root="$(cd "$(dirname "$0")/../.." && pwd)"
g="$1"
dst="$root/.peers/gptq_marlin"
mkdir -p "$dst/core"
for f in core/scalar_type.hpp dequant.h gptq_marlin.cu gptq_marlin_repack.cu kernel.h marlin.cuh \
         marlin_dtypes.cuh marlin_mma.h marlin_template.h; do
  git --git-dir="$g" show "$GPTQMODEL_COMMIT:gptqmodel_ext/marlin/$f" > "$dst/$f"
done
git --git-dir="$g" show "$GPTQMODEL_COMMIT:LICENSE" > "$dst/LICENSE"
echo "ModelCloud/GPTQModel $GPTQMODEL_COMMIT gptqmodel_ext/marlin (vLLM gptq_marlin packaging), files copied verbatim" > "$dst/SOURCE"
if [ $# -ge 2 ]; then
  i="$root/.peers/ist_marlin"
  mkdir -p "$i"
  for f in __init__.py marlin_cuda.cpp marlin_cuda_kernel.cu; do
    git --git-dir="$2" show "$IST_COMMIT:marlin/$f" > "$i/$f"
  done
  echo "IST-DASLab/marlin $IST_COMMIT" > "$i/SOURCE"
fi
echo "wrote $dst"
