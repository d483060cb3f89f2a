#!/usr/bin/env bash
# What an offline GPU machine needs to run benchmarks/gpu_check.sh, gathered here into .gpu/ (git-ignored):
#   .gpu/whl/            wheels of this project's Python dependencies for CPython 3.12 on x86-64 Linux that
#                        such a machine's image lacks (a PyTorch/CUDA image usually has torch, numpy, pandas's
#                        dependencies, matplotlib, seaborn, tokenizers; list them in HAVE to skip them)
#   .gpu/fashion-mnist/  the four Fashion-MNIST .gz files (Debian package dataset-fashion-mnist)
#   .gpu/fairseq.tar.gz  with D2V2_FAIRSEQ set to a fairseq checkout: the parts of it that the side-by-side step
#                        benchmark imports (fairseq/, examples/data2vec/), and its import-time dependencies'
#                        wheels (omegaconf, hydra-core, bitarray, timm) in .gpu/whl
# gpu_check.sh installs the wheels into a temporary folder when any of them is missing, reads Fashion-MNIST from
# .gpu/ when the Debian package is not installed, and unpacks fairseq from .gpu/ when D2V2_FAIRSEQ is not set on
# the machine. Copy .gpu/ along with the repository.
#   bash benchmarks/offline_bundle.sh                                 # about 53 MB
#   D2V2_FAIRSEQ=/path/to/fairseq bash benchmarks/offline_bundle.sh   # about 57 MB
set -euo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-3.12} FAIRSEQ=${D2V2_FAIRSEQ:-}
# snakemake's and pydantic's dependency closure (pinned as installed by scripts/install.sh), without PuLP
# (only snakemake's ILP scheduler needs it; gpu_check.sh uses --scheduler greedy), and pandas pinned so the
# analysis runs on the same version as here.
PKGS=$(python3 - <<'EOF'
import importlib.metadata as md, os, re
from packaging.requirements import Requirement
TARGET = {"python_version": os.environ["PY"], "python_full_version": os.environ["PY"] + ".0",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "os_name": "posix", "implementation_name": "cpython", "extra": ""}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = set(norm(n) for n in """torch torchvision torchaudio numpy scipy matplotlib seaborn tokenizers pyyaml jinja2
    requests psutil packaging tqdm pyarrow python-dateutil six typing-extensions attrs markupsafe wrapt tabulate
    urllib3 idna certifi charset-normalizer filelock fsspec sympy networkx mpmath pillow fonttools kiwisolver
    contourpy cycler pyparsing xarray cloudpickle pulp""".split())
# timm imports these only to download pretrained weights
have |= {"huggingface-hub", "safetensors"}
skip = lambda n: norm(n) in have or norm(n).startswith("nvidia-") or norm(n) == "triton"
todo, seen, out = ["snakemake", "pydantic", "jsonschema", "submitit", "soundfile", "rdata"], set(), {"pandas==3.1.1"}
if os.environ["FAIRSEQ"]:
    todo += ["omegaconf", "hydra-core", "bitarray", "timm"]      # scripts/crosscheck_fairseq.py's import of fairseq
while todo:
    name = todo.pop()
    if norm(name) in seen:
        continue
    seen.add(norm(name))
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    if skip(name):                       # there already, with what it requires
        continue
    out.add(f"{dist.metadata['Name']}=={dist.version}")
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(TARGET):
            todo.append(req.name)
print(" ".join(sorted(out)))
EOF
)
mkdir -p .gpu/whl .gpu/fashion-mnist
for spec in $PKGS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .gpu/whl "$spec" \
    2>/dev/null || python3 -m pip wheel -q --no-deps -w .gpu/whl "$spec"      # sdist-only: build a wheel here
done
cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
if [ -n "$FAIRSEQ" ]; then
  tar czf .gpu/fairseq.tar.gz -C "$FAIRSEQ" fairseq examples/__init__.py examples/data2vec
fi
echo "offline_bundle.sh: $(ls .gpu/whl | wc -l) wheels, $(du -sh .gpu | cut -f1) in .gpu/"
