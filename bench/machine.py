"""The machine a benchmark ran on, and its memory bandwidth (measured, torch, the benchmark's threads).

`python bench/machine.py bandwidth THREADS` prints {"read_gbs": ..., "copy_gbs": ...}: a large read-only
reduction (sum of 1 GiB of fp32: the access pattern of a weight-streaming decode step) and a copy
(counted as read + write bytes). Each the median of several passes, after a warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def bandwidth(threads: int, gib: float = 1.0, passes: int = 7) -> dict:
    import torch

    torch.set_num_threads(threads)
    n = int(gib * 2**30) // 4
    x = torch.ones(n, dtype=torch.float32)
    y = torch.empty_like(x)
    reads, copies = [], []
    for i in range(passes + 1):
        t = time.perf_counter()
        x.sum()
        dt_read = time.perf_counter() - t
        t = time.perf_counter()
        y.copy_(x)
        dt_copy = time.perf_counter() - t
        if i:  # first pass: page faults and warm-up
            reads.append(x.numel() * 4 / dt_read / 1e9)
            copies.append(2 * x.numel() * 4 / dt_copy / 1e9)
    return {
        "read_gbs": statistics.median(reads),
        "read_gbs_max": max(reads),
        "copy_gbs": statistics.median(copies),
        "threads": threads,
        "bytes": x.numel() * 4,
    }


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def describe() -> dict:
    lscpu = {}
    for line in _run(["lscpu"]).splitlines():
        key, _, value = line.partition(":")
        lscpu[key.strip()] = value.strip()
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    flags = lscpu.get("Flags", "").split()
    info = {
        "cpu": lscpu.get("Model name", platform.processor()),
        # a VM's model name can hide the maker ("Intel(R) Xeon(R) Processor" on an AMD host too): these do not
        "cpu_id": " ".join(f"{k} {lscpu[key]}" for k, key in (("", "Vendor ID"), ("family", "CPU family"),
                           ("model", "Model"), ("stepping", "Stepping")) if key in lscpu).strip(),
        "cpus": lscpu.get("CPU(s)"), "cores_per_socket": lscpu.get("Core(s) per socket"),
        "threads_per_core": lscpu.get("Thread(s) per core"), "sockets": lscpu.get("Socket(s)"),
        "l2": lscpu.get("L2 cache"), "l3": lscpu.get("L3 cache"),
        "simd": " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16") if f in flags),
        "memory_gib": round(mem_kb / 2**20, 1), "kernel": platform.release(), "python": platform.python_version(),
    }  # fmt: skip
    try:
        import torch
        import transformers

        info["torch"], info["transformers"] = torch.__version__, transformers.__version__
    except ImportError:
        pass
    repo = str(Path(__file__).resolve().parent.parent)
    info["neolm_commit"] = _run(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    if _run(["git", "-C", repo, "status", "--porcelain", "--", "neolm"]):
        info["neolm_commit"] += " + uncommitted changes in neolm/"
    return info


def cpu_busy_seconds() -> float:
    """CPU seconds all processes have used since boot (all cores; /proc/stat, idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def quietness() -> dict:
    """Load average and other heavy processes (a training run, other benchmarks) at this moment."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    busy = []
    for line in _run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"]).splitlines()[1:6]:
        pid, pcpu, args = line.split(None, 2)
        if float(pcpu) >= 20 and int(pid) != os.getpid():
            busy.append(f"{pcpu}% {args[:80]}")
    training = bool(_run(["pgrep", "-f", "neolm train"]))
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg": " ".join(load),
        "busy": busy,
        "neolm_train_running": training,
    }


if __name__ == "__main__":
    if sys.argv[1] == "bandwidth":
        print(json.dumps(bandwidth(int(sys.argv[2]))))
    else:
        print(json.dumps({"machine": describe(), "quiet": quietness()}, indent=1))
