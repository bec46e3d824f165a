"""Pinned numerics: a training step gives the same bits whatever CPU the environment emulates.

Every check runs in a fresh subprocess: the pins are process-wide (environment, torch threads,
deterministic mode) and the ISA variables only act before torch's first kernel call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pefteval_harness.errors import BadInput
from pefteval_harness.numerics import NUMERICS_ENV, pin_numerics

CPU_FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
HAS_AVX2 = "avx2" in CPU_FLAGS
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="the pins target x86 CPUs with AVX2")

# A few steps of a small network that reaches the CPU-dependent kernels: MKL GEMMs, ATen's vectorised
# GELU / layer norm / softmax, and the fused AdamW kernel the HF Trainer uses by default.
STEP = r"""
import hashlib, json, sys
pinned = None
if sys.argv[1] == "pin":
    from pefteval_harness.numerics import pin_numerics
    pinned = pin_numerics(1)
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Embedding(97, 64), torch.nn.Linear(64, 192), torch.nn.GELU(), torch.nn.LayerNorm(192),
    torch.nn.Linear(192, 97),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
ids = torch.randint(0, 97, (8, 33))
for _ in range(5):
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"digest": digest, "capability": torch.backends.cpu.get_cpu_capability(), "pinned": pinned}))
"""

# Two machines as far apart as one CPU can emulate: widest kernels and MKL's own choice, versus
# ATen's portable kernels, MKL's most compatible path and another thread count. (Asking ATen for AVX-512
# on a CPU without it stops the process with an illegal instruction: then AVX2 is the widest.)
WIDEST = "avx512" if "avx512f" in CPU_FLAGS else "avx2"
EMULATED = [
    {"ATEN_CPU_CAPABILITY": WIDEST, "MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "ALL", "OMP_NUM_THREADS": "1"},
    {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "2"},
]


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _results(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@needs_avx2
def test_pins_make_emulated_cpus_agree_bitwise():
    # Started together: four torch imports in parallel instead of one after another.
    procs = [_run(STEP, mode, env=env) for mode in ("free", "pin") for env in EMULATED]
    free_a, free_b, pinned_a, pinned_b = _results(procs)
    # Without the pins the emulated machines differ: the test can see what the pins fix.
    assert free_a["capability"] != free_b["capability"]
    assert free_a["digest"] != free_b["digest"]
    # With them, the same bits whatever the environment said.
    assert pinned_a["digest"] == pinned_b["digest"]
    assert pinned_a["capability"] == pinned_b["capability"] == "AVX2"
    for result in (pinned_a, pinned_b):
        pinned = result["pinned"]
        assert pinned["threads"] == 1
        assert pinned["deterministic_algorithms"] is True
        assert pinned["isa_pinned"] is True and pinned["set_after_torch_import"] == []
        assert pinned["env"] == {**NUMERICS_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


LATE = r"""
import json, warnings
import torch
torch.ones(4) @ torch.ones(4)  # ATen and MKL have chosen their kernels now
from pefteval_harness.numerics import pin_numerics
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pinned = pin_numerics(2)
print(json.dumps({"pinned": pinned, "threads": torch.get_num_threads(), "warned": [str(w.message) for w in caught]}))
"""


@needs_avx2
def test_pin_after_torch_use_is_reported_and_still_sets_threads():
    env = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "ALL"}
    (result,) = _results([_run(LATE, env=env)])
    pinned = result["pinned"]
    assert result["threads"] == pinned["threads"] == 2
    assert pinned["deterministic_algorithms"] is True
    assert pinned["aten_capability"] == "DEFAULT"  # ATen had decided before the pin: no runtime switch
    assert pinned["isa_pinned"] is False
    assert set(pinned["set_after_torch_import"]) == set(NUMERICS_ENV)
    assert any("set after torch was imported" in w for w in result["warned"])


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_threads_must_be_a_positive_integer(threads):
    # Rejected before anything process-wide is touched, so this can run in the test process.
    with pytest.raises(BadInput, match="pin_numerics: threads"):
        pin_numerics(threads)
