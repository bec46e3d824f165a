"""The merge engine against mergekit: time, peak memory and working memory (a benchmark, not a test).

Builds (once, cached) a Llama-shaped model of about `--params` million float32 parameters, random from a
fixed seed, and 8 experts = base + seeded Gaussian noise of varied scales. For every method and number of
experts k it runs our engine (`merge_models`) and mergekit (`mergekit-yaml`'s command, in-process in the
mergekit virtualenv) on the same recipe (`recipes.to_mergekit` of our merge record), each in a fresh
subprocess, alternating (the order flips every repetition). Each child imports its tool (and torch,
transformers, safetensors), notes its resident memory, merges, and reports the merge's time and the
process's peak resident memory (VmHWM); working memory = peak − resident memory right after the imports,
measured the same way for both. Deterministic methods' outputs are compared: max |ours − mergekit| and
the number of entries that differ by more than 1e-6.

    python bench/merge.py [--params 100] [--ks 2,4,8] [--methods task_arithmetic,ties,dare_ties]
                          [--repeats 1] [--cache DIR] [--mergekit-python PATH]

Prints one table with the medians side by side and the ratios ours / mergekit. Exit status 0 whatever the
numbers; 1 if a run fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# mergekit pins its own dependencies: it lives in a virtualenv of its own (see bench/README.md)
MERGEKIT_PYTHON = Path(os.environ.get("PEFTEVAL_MERGEKIT_PYTHON", "../mergekit-venv/bin/python"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MAX_EXPERTS = 8
SEED = 1234
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}  # different draws in the two tools


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# --- the children: one merge each, in its own process --------------------------------------------------


def child_ours(job: dict) -> dict:
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from pefteval_harness.merging.engine import merge_models

    after_imports = _status("VmRSS")
    start = time.perf_counter()
    merge_models(
        method=job["method"],
        experts=[Path(e) for e in job["experts"]],
        base=Path(job["base"]),
        weights=job["weights"],
        params=job["parameters"],
        seed=job["seed"],
        out_dir=Path(job["out"]),
    )
    return {"seconds": time.perf_counter() - start, "after_imports": after_imports, "peak": _status("VmHWM")}


def child_mergekit(job: dict) -> dict:
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from mergekit.scripts.run_yaml import main

    after_imports = _status("VmRSS")
    start = time.perf_counter()
    args = [job["config"], job["out"], "--random-seed", str(job["seed"]), "--no-copy-tokenizer"]
    main(args, standalone_mode=False)  # exactly what the mergekit-yaml command runs
    return {"seconds": time.perf_counter() - start, "after_imports": after_imports, "peak": _status("VmHWM")}


# --- the parent ----------------------------------------------------------------------------------------


def model_shape(params_millions: float) -> dict:
    """A Llama config of about that many parameters: width and vocabulary by size, then the layer count."""
    hidden, inter, vocab = (768, 2048, 16000) if params_millions >= 50 else (256, 688, 8000)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params_millions * 1e6 - 2 * vocab * hidden) / per_layer))
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "architectures": ["LlamaForCausalLM"],  # mergekit picks its architecture definition from this
    }


def build_models(folder: Path, params_millions: float) -> tuple[Path, list[Path]]:
    """Base and experts (cached in `folder`; rebuilt when the shape asked for differs)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = model_shape(params_millions)
    stamp = folder / "shape.json"
    experts = [folder / f"expert{i}" for i in range(MAX_EXPERTS)]
    if stamp.is_file() and json.loads(stamp.read_text()) == shape:
        return folder / "base", experts
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = LlamaConfig(**shape)
    with torch.device("meta"):  # names and shapes only; the values are drawn below from a fixed seed
        names = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(SEED)
    base = {
        name: torch.ones(s) if name.endswith("norm.weight") else torch.randn(s, generator=gen).mul_(0.02)
        for name, s in names.items()
    }
    for path, state in [(folder / "base", base)]:
        path.mkdir()
        config.save_pretrained(path)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    for i, path in enumerate(experts):
        noise = torch.Generator().manual_seed(SEED + 1 + i)
        scale = 0.002 * (1 + i % 4)  # varied task-vector sizes
        state = {n: t + torch.randn(t.shape, generator=noise).mul_(scale) for n, t in base.items()}
        path.mkdir()
        config.save_pretrained(path)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        del state
    n = sum(math.prod(s) for s in names.values())
    stamp.write_text(json.dumps(shape))
    print(f"built base + {MAX_EXPERTS} experts of {n / 1e6:.1f}M parameters in {folder}", flush=True)
    return folder / "base", experts


def record_for(method: str, base: Path, experts: list[Path]) -> dict:
    """Our merge record (merge_config.json's fields) with the method's default parameters, equal weights."""
    from pefteval_harness.merging import get_method

    m = get_method(method)
    weights = [1.0] * len(experts)
    return {
        "method": method,
        "method_version": m.version,
        "parameters": m.validate_params({}).model_dump(),
        "weights": weights,
        "method_weights": m.resolve_weights(weights, len(experts)),
        "seed": SEED,
        "experts": [str(e) for e in experts],
        "base": str(base),
        "space": "delta_w",
        "expert_kind": "full",
    }


def run_child(python: str, tool: str, job: dict, work: Path) -> dict:
    job_file = work / f"{tool}.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    out = subprocess.run(
        [python, str(Path(__file__).resolve()), "--child", tool, str(job_file)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"merge.py: {tool} failed ({out.returncode}):\n" + "\n".join(out.stderr.splitlines()[-30:]))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "wall": wall}


def difference(a: Path, b: Path) -> tuple[float, int]:
    """max |a − b| over every entry, and how many entries differ by more than 1e-6 (inf, -1: names differ)."""
    from contextlib import ExitStack

    from pefteval_harness.merging.tensors import SafetensorsReader

    worst, differing = 0.0, 0
    with ExitStack() as stack:
        ra, rb = SafetensorsReader(a, "model", stack), SafetensorsReader(b, "model", stack)
        if set(ra.names()) != set(rb.names()):
            return math.inf, -1
        for name in ra.names():
            gap = (ra.get(name).float() - rb.get(name).float()).abs()
            worst, differing = max(worst, float(gap.max())), differing + int((gap > 1e-6).sum())
    return worst, differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100, help="model size, millions of parameters")
    parser.add_argument("--ks", default="2,4,8", help="numbers of experts, comma-separated (at most 8)")
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pefteval-bench-merge")
    parser.add_argument("--mergekit-python", default=str(MERGEKIT_PYTHON))
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if not all(1 <= k <= MAX_EXPERTS for k in ks):
        sys.exit(f"merge.py: --ks must be between 1 and {MAX_EXPERTS}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not Path(args.mergekit_python).exists():
        sys.exit(f"merge.py: no mergekit python at {args.mergekit_python} (--mergekit-python)")
    os.environ.update(OFFLINE)

    import yaml

    from pefteval_harness.merging.recipes import to_mergekit

    base, experts = build_models(args.cache / f"{args.params:g}M", args.params)
    rows = []
    for method in methods:
        for k in ks:
            record = record_for(method, base, experts[:k])
            config = to_mergekit(record)
            if config is None:
                print(f"{method} k={k}: mergekit cannot express this merge; skipped", flush=True)
                continue
            runs: dict[str, list[dict]] = {"ours": [], "mergekit": []}
            diff = None
            for r in range(args.repeats):
                order = ["ours", "mergekit"] if r % 2 == 0 else ["mergekit", "ours"]
                with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
                    work = Path(tmp)
                    (work / "mergekit.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                    for tool in order:
                        job = {**record, "out": str(work / f"out-{tool}"), "config": str(work / "mergekit.yaml")}
                        python = sys.executable if tool == "ours" else args.mergekit_python
                        runs[tool].append(run_child(python, tool, job, work))
                    if r == 0 and method not in RANDOM_METHODS:
                        diff = difference(work / "out-ours", work / "out-mergekit")
                done = runs["ours"][-1], runs["mergekit"][-1]
                print(
                    f"{method} k={k} run {r + 1}: ours {done[0]['seconds']:.2f} s {done[0]['peak'] / 2**20:.0f} MiB,"
                    f" mergekit {done[1]['seconds']:.2f} s {done[1]['peak'] / 2**20:.0f} MiB",
                    flush=True,
                )
            rows.append((method, k, runs, diff))
    print_table(rows, args)


def print_table(rows, args) -> None:
    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    def work_mem(runs):
        return statistics.median(r["peak"] - r["after_imports"] for r in runs)

    mib = 2**20
    header = (
        "| method | k | merge s ours | merge s mergekit | time ratio | wall s ours | wall s mergekit |"
        " peak MiB ours | peak MiB mergekit | working MiB ours | working MiB mergekit | working ratio |"
        " max abs diff (entries > 1e-6) |"
    )
    print()
    print(f"model: {args.params:g}M parameters (float32); medians of {args.repeats} run(s) each")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for method, k, runs, diff in rows:
        ours, mk = runs["ours"], runs["mergekit"]
        cells = [
            method,
            str(k),
            f"{med(ours, 'seconds'):.2f}",
            f"{med(mk, 'seconds'):.2f}",
            f"{med(ours, 'seconds') / med(mk, 'seconds'):.2f}",
            f"{med(ours, 'wall'):.2f}",
            f"{med(mk, 'wall'):.2f}",
            f"{med(ours, 'peak') / mib:.0f}",
            f"{med(mk, 'peak') / mib:.0f}",
            f"{work_mem(ours) / mib:.0f}",
            f"{work_mem(mk) / mib:.0f}",
            f"{work_mem(ours) / work_mem(mk):.2f}",
            "random" if diff is None else f"{diff[0]:.1e} ({diff[1]})",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        job = json.loads(Path(sys.argv[3]).read_text())
        result = (child_ours if sys.argv[2] == "ours" else child_mergekit)(job)
        print(json.dumps(result))
    else:
        main()
