"""Pin a job's CPU numerics, so that the same job gives bit-identical weights and scores on any x86 CPU
with AVX2 (Intel; see the limits below), not only run to run on one machine.

Where the numbers depend on the machine (measured on the tiny quickstart model, torch 2.13 CPU wheel):
- ATen picks its vectorised kernels (softmax, norms, elementwise ops, fused AdamW) by the CPU's widest ISA:
  AVX512 here, AVX2 on an older Xeon. Different kernels round differently. ATEN_CPU_CAPABILITY caps it.
- MKL picks its GEMM code path by CPU ("AUTO"); MKL_CBWR=AVX2 fixes the path (Intel's conditional
  numerical reproducibility: same results on every Intel CPU with AVX2, for a fixed thread count).
- oneDNN (bf16 matmuls, convolutions) picks its JIT kernels by CPU; ONEDNN_MAX_CPU_ISA caps it.
  Our fp32 training never reaches it; the cap costs nothing there and closes the bf16 path.
- Thread count: large GEMMs and ATen reductions split their sums by thread, so results depend on it.
  accelerate sets torch's threads to the machine's physical cores when OMP_NUM_THREADS is unset.

All three ISA variables are read lazily, when torch first dispatches a kernel / calls MKL / oneDNN,
not at `import torch`; set after that first use they are silently ignored (torch has no runtime switch).
So a local Ray's workers inherit NUMERICS_ENV from the driver (`runner.init_ray` sets it before Ray
starts), and `pin_numerics` sets it again first thing in every job, before torch computes anything (a Ray
worker does not import torch before the job runs), and reports when it was too late to be sure.

Not pinned (cannot be from here): AMD CPUs (MKL's AVX2 branch is documented for Intel CPUs only), CPUs
without AVX2 (ATen falls back to its default kernels), a different thread count (part of the job's
resources), DeepSpeed's CPU Adam (offload_optimizer) which is JIT-compiled with -march=native, GPUs.
"""

from __future__ import annotations

import os
import sys
import warnings

from pefteval_harness.errors import BadInput

# AVX2, not AVX512: every x86 server CPU of the last decade has it, and quickstart training runs as fast
# as with AVX512 ("default", ATen's portable kernels, trained 25-30% slower).
NUMERICS_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
PINNED_CAPABILITY = "AVX2"  # what torch.backends.cpu.get_cpu_capability() reports once the pin took


def pin_numerics(threads: int) -> dict:
    """Call first thing in a job's process, before any torch computation; returns what it set (provenance).

    `threads` is the job's CPU count: torch's intra-op threads, OpenMP and MKL all use exactly that many.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BadInput(f"pin_numerics: threads must be a positive integer, not {threads!r}")
    # Variables that differ now and torch is already loaded: a kernel choice may already have been made.
    late = sorted(k for k, v in NUMERICS_ENV.items() if os.environ.get(k) != v) if "torch" in sys.modules else []
    os.environ.update(NUMERICS_ENV)
    # Also for accelerate, which otherwise resets torch's threads to the machine's physical core count.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)

    import torch

    torch.set_num_threads(threads)
    # Guards the few CPU ops with a nondeterministic path; warn_only: an op without a deterministic
    # implementation (CUDA mostly) warns instead of failing the job.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode would also fill every torch.empty with NaN: DeepSpeed's ZeRO buckets made full
    # fine-tuning over 30x slower on the quickstart, and it only matters for code that reads memory it never wrote.
    torch.utils.deterministic.fill_uninitialized_memory = False
    capability = torch.backends.cpu.get_cpu_capability()  # ATen decides here if it has not yet
    if late:
        warnings.warn(
            f"pin_numerics: {', '.join(late)} set after torch was imported; ATen uses {capability} kernels"
            " and MKL may have chosen its code path already: pass NUMERICS_ENV to the process environment",
            RuntimeWarning,
            stacklevel=2,
        )
    return {
        "threads": torch.get_num_threads(),
        "env": {**NUMERICS_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory,
        "aten_capability": capability,
        "isa_pinned": capability == PINNED_CAPABILITY and not late,
        "set_after_torch_import": late,
    }
