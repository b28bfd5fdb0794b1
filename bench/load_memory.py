"""Peak memory while loading a real-sized checkpoint (default: gpt-neo-1.3B shape, fp32, random weights).

    python bench/load_memory.py [--preset gpt-neo-1.3B] [--dtype float32] [--dir /tmp/neolm-bench]

Writes a Hugging Face checkpoint of the preset's shape (random weights), then loads it in a fresh
process with neolm.load() and runs one forward pass (which touches every weight), reporting the
process's peak RSS (VmHWM) against the checkpoint's size. Appends the result to bench/LOAD_MEMORY.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

PROBE = """
import sys, time, torch, neolm
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
base = peak()
t = time.perf_counter()
lm = neolm.load(sys.argv[1], dtype=sys.argv[2])
seconds = time.perf_counter() - t
loaded = peak()
with torch.no_grad():
    lm.model(torch.tensor([[1, 2, 3]]))
print(base, loaded, peak(), seconds)
"""


def cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    from neolm import checkpoint
    from neolm.model import GPT
    from neolm.train.presets import preset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-neo-1.3B")
    p.add_argument("--dtype", default="float32", help="dtype to load as (the checkpoint is fp32)")
    p.add_argument("--dir", default="/tmp/neolm-bench", type=Path)
    args = p.parse_args()

    folder = args.dir / args.preset
    if not (folder / "model.safetensors").exists():
        t = time.perf_counter()
        model = GPT(preset(args.preset))  # PyTorch's default init: random, right shapes
        checkpoint.save_checkpoint(model, folder, dtype=torch.float32)
        del model
        print(f"wrote {folder} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    size = (folder / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder), args.dtype], capture_output=True, text=True,
                         check=True)  # fmt: skip
    base, loaded, used, seconds = out.stdout.split()
    base, loaded, used = int(base), int(loaded), int(used)
    gib = 2**30
    line = (
        f"| {datetime.date.today()} | {args.preset} fp32 -> {args.dtype} | {size / gib:.2f} GiB | "
        f"{(loaded - base) / gib:.2f} GiB | {(used - base) / gib:.2f} GiB | {(used - base) / size:.2f}x | "
        f"{used / size:.2f}x | {float(seconds):.1f}s |"
    )
    results = Path(__file__).with_name("LOAD_MEMORY.md")
    if not results.exists():
        results.write_text(
            "# Peak memory while loading\n\n"
            "`python bench/load_memory.py --preset PRESET --dtype DTYPE`: a random-weight checkpoint of the preset's\n"
            "shape in Hugging Face format (fp32 safetensors), loaded by `neolm.load()` in a fresh process, then one\n"
            "forward pass (touching every weight). Peak RSS is the process's VmHWM; 'growth' subtracts the\n"
            "Python + torch baseline measured before loading.\n\n"
            "| date | checkpoint -> dtype | file | peak growth after load | after forward | growth / file | "
            "total peak / file | load time |\n|---|---|---|---|---|---|---|---|\n"
        )
    with open(results, "a") as f:
        f.write(line + "\n")
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(line)


if __name__ == "__main__":
    main()
