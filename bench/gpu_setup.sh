#!/usr/bin/env bash
# Install the carried peer/training wheels on the lent GPU machine, offline, and print what is there.
#
#   source bench/gpu_setup.sh        # in the run's shell: exports PYTHONPATH, DS_BUILD_OPS, TORCH_CUDA_ARCH_LIST
#   bash bench/gpu_setup.sh          # only installs into /tmp/site and reports (exports die with the subshell)
#
# The wheels live in the git-ignored .whl/ (name it in the device call's `carry`): the GPU image
# (Python 3.12, torch 2.11+cu130, transformers 5.17, accelerate, pyarrow, pandas, fsspec, xxhash,
# huggingface-hub, ninja, msgpack, psutil, py-cpuinfo, einops) lacks deepspeed, trl, datasets and
# their small pure-Python needs. .whl/ holds exactly one version of each:
#   deepspeed 0.19.8 (built here with DS_BUILD_OPS=0: pure Python, ops JIT-built on first use),
#   hjson, pydantic + pydantic-core (cp312), annotated-types, typing-inspection, typing-extensions
#   (pydantic 2.14 needs >= 4.16), trl 1.16.0, datasets 4.8.5 (hub < 2 like transformers 5.17),
#   dill, multiprocess (py312).
# Installed with --target into /tmp/site (as bench/gpu_run.sh does), so the image's site-packages
# stay untouched; /tmp/site goes first on PYTHONPATH.
# Re-running is cheap: a second call finds /tmp/site/.grm_wheels_ok and only re-exports.

_grm_setup() {
  local here root site
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  root=$(dirname "$here")
  site=${GRM_SITE:-/tmp/site}
  if ! ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    echo "gpu_setup: no wheels under $root/.whl (name .whl in the device call's carry)" >&2
    return 1
  fi
  if [ ! -f "$site/.grm_wheels_ok" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$root"/.whl/*.whl || { echo "gpu_setup: pip install failed" >&2; return 1; }
    touch "$site/.grm_wheels_ok"
  fi
  case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
  export PATH="$site/bin:$PATH"  # the `deepspeed` launcher script
  # DeepSpeed's op builder: no AOT ops; the image sets TORCH_CUDA_ARCH_LIST=9.0a, which it rejects.
  export DS_BUILD_OPS=0 TORCH_CUDA_ARCH_LIST=9.0
  # Nothing can be fetched on that machine.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
  # Keep NVLink multicast off (KINDS.md), also for programs that start their own environment.
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  export PYTHONUNBUFFERED=1
  python3 - "$root/.whl" <<'EOF'
import importlib, importlib.metadata as md, sys, zipfile, glob, os
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

carried = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    name = os.path.basename(path).split("-")[0]
    carried[canonicalize_name(name)] = path
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print("gpu_setup: python", sys.version.split()[0])
for name in ["torch", "transformers", "accelerate", "huggingface-hub", "tokenizers", "pyarrow", "pandas", "fsspec",
             "typing-extensions", "peft", "deepspeed", "trl", "datasets", "pydantic", "pydantic-core", "hjson",
             "dill", "multiprocess", "ninja"]:
    where = "carried" if canonicalize_name(name) in carried else "image"
    print(f"  {name:18s} {version(name) or 'MISSING':14s} ({where})")
# Does every carried wheel find what it requires (a warning, not an error: pip ran with --no-deps)?
problems = []
for key, path in carried.items():
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = version(req.name)
        if have is None:
            problems.append(f"{key} needs {req} : missing")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{key} needs {req} : have {have}")
for p in problems:
    print("  WARNING", p)
try:
    import torch
    print(f"  cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
except ImportError as e:
    print(f"  WARNING import torch failed: {e}")
for mod in ["deepspeed", "trl", "datasets"]:
    try:
        importlib.import_module(mod)
    except Exception as e:  # report, do not stop the run: the scripts say what they miss
        print(f"  WARNING import {mod} failed: {type(e).__name__}: {e}")
print("gpu_setup: DS_BUILD_OPS=%s TORCH_CUDA_ARCH_LIST=%s PYTHONPATH=%s" % (
    os.environ.get("DS_BUILD_OPS"), os.environ.get("TORCH_CUDA_ARCH_LIST"), os.environ.get("PYTHONPATH")))
EOF
}
_grm_setup
_grm_setup_rc=$?
unset -f _grm_setup
# sourced: return the status; executed: exit with it
return $_grm_setup_rc 2>/dev/null || exit $_grm_setup_rc
