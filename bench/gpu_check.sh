#!/usr/bin/env bash
# Exercise pefteval's GPU paths on one GPU box in a few minutes (nothing here has a GPU: run it where
# there is one, and put what it prints in bench/README.md). From the repository's root, in a venv with
# the package installed (README: Install) and a CUDA build of torch:
#
#     bash bench/gpu_check.sh [OUT_DIR]
#
# It checks, on the tiny model:
#   1. the accelerator memory cap: a job holding 0.25 of a GPU that allocates more fails with an
#      out-of-memory error, within its share it does not (scheduling.cap_accelerator_memory);
#   2. a run whose evaluations share one GPU (num_gpus: 0.5 each) and whose fine-tunes train on it (full
#      fine-tuning through DeepSpeed ZeRO-2, LoRA), printing each job's peak accelerator memory;
#   3. with 2 or more GPUs: a 2-worker ZeRO-3 gang over NCCL (resources.train.workers: 2), whose ranks
#      each hold one GPU.
# Ray is started locally on 127.0.0.1 by `pefteval run` itself.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp -d /tmp/pefteval-gpu-check.XXXXXX)}"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
    echo "gpu_check: torch sees no CUDA GPU here; nothing to check" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"

echo "== 1. the memory cap of a job holding 0.25 of a GPU"
python - <<'PY'
import torch

from pefteval_harness.jobs.types import Resources
from pefteval_harness.scheduling import cap_accelerator_memory

fraction = cap_accelerator_memory(Resources(num_gpus=0.25))
assert fraction == 0.25, fraction
total = torch.cuda.get_device_properties(0).total_memory
inside = torch.empty(int(total * 0.15) // 4, dtype=torch.float32, device="cuda")
print(f"allocated {inside.numel() * 4 / 2**30:.2f} GiB within the 0.25 share: fine")
del inside
torch.cuda.empty_cache()
try:
    torch.empty(int(total * 0.40) // 4, dtype=torch.float32, device="cuda")
except torch.OutOfMemoryError:
    print("allocating 0.40 of the GPU under a 0.25 cap: out of memory, as it should")
else:
    raise SystemExit("the 0.25 cap did not stop an allocation of 0.40 of the GPU")
PY

echo "== 2. fine-tunes on the GPU, evaluations sharing it"
SPEC="$OUT/gpu_check.yaml"
mkdir -p "$OUT"
python - "$SPEC" "$GPUS" <<'PY'
import sys

import yaml

path, gpus = sys.argv[1], int(sys.argv[2])
spec = {
    "name": "gpu-check",
    "base_model": "tiny",
    "train": {"tasks": ["pefteval_quick_sentiment", "pefteval_quick_topic"], "epochs": 2, "batch_size": 16,
              "learning_rate": 0.003},
    "finetunes": {
        "fft": {"method": "full", "deepspeed": {"zero_stage": 2}},
        "lora": {"method": "lora", "config": {"r": 8, "target_modules": "all-linear"},
                 "train": {"learning_rate": 0.01}},
    },
    "evaluate": {"tasks": ["pefteval_quick_*"], "limit": 60, "batch_size": 16},
    "resources": {"train": {"num_cpus": 2, "num_gpus": 1}, "evaluate": {"num_cpus": 1, "num_gpus": 0.5}},
}
if gpus >= 2:  # a 2-worker ZeRO-3 gang: one GPU per rank, NCCL between them
    spec["finetunes"]["fft_gang"] = {"method": "full", "deepspeed": {"zero_stage": 3}, "resources": {"workers": 2}}
yaml.safe_dump(spec, open(path, "w"), sort_keys=False)
PY
time pefteval run "$SPEC" --output "$OUT/run"
python - "$OUT/run" <<'PY'
import json, sys
from pathlib import Path

for status in sorted(Path(sys.argv[1]).glob("jobs/*/status.json")):
    job = json.loads((status.parent / "job.json").read_text())
    result = json.loads((status.parent / "result.json").read_text()) if (status.parent / "result.json").exists() else {}
    state = json.loads(status.read_text())["state"]
    peak = result.get("peak_accelerator_mb")
    ranks = [w.get("peak_accelerator_mb") for w in result.get("per_worker", [])]
    print(f"{job['id']:28} {job['label']:10} {state:7} peak accelerator MB: {peak} {ranks or ''}")
PY
pefteval leaderboard "$OUT/run" | head -20
echo "gpu_check: done; results in $OUT"
