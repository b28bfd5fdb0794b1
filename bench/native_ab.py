"""Two versions of neolm's native kernels in one process: decode throughput, alternated call by call.

    python bench/native_ab.py OLD_TREE [--models gpt-neo-125M,pythia-1.4b/neolm-int8] [--dtype float32]
                              [--batch 8] [--rounds 6]

OLD_TREE is another checkout of neolm (e.g. `git worktree add /tmp/old HEAD~1`); its neolm/native/*.cpp are
compiled into a second library beside this tree's. Each model loads once; every round generates 128 tokens
after 32-token prompts with each library in turn (the decode step and the output head switched over), so that
both meet the same phases of this VM's memory, which swings between ~35 and ~75 GB/s within minutes and makes
runs in separate processes hard to compare. Models are folders under /tmp/neolm-bench/models (bench.py makes
them): `<shape>` for its hf checkpoint, `<shape>/neolm-int8` for a quantized folder.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import neolm
from neolm import native
from neolm.generate import iter_generate
from neolm.generation_config import GenerationConfig

MODELS = Path("/tmp/neolm-bench/models")


def build(tree: Path, out: Path) -> ctypes.CDLL:
    sources = sorted(str(path) for path in (tree / "neolm" / "native").glob("*.cpp"))
    subprocess.run(["g++", *native.FLAGS, *sources, "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    for name, argtypes in native._SIGNATURES.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int64 if name.endswith("_bytes") else None
    return lib


class _Either:
    """lib's functions, and this tree's for those it lacks (an older tree may predate a kernel)."""

    def __init__(self, lib, base):
        self.lib, self.base = lib, base

    def __getattr__(self, name):
        return getattr(self.lib if hasattr(self.lib, name) else self.base, name)


def use(model, lib, base) -> None:
    """Route the model's native calls to lib: the decode step's, and the module-level ones (the head's)."""
    either = _Either(lib, base)
    native._library = lambda: (either, "")  # a benchmark's patch of the module, never done by the library
    if model.decode_step is not None:
        model.decode_step.lib = lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old_tree", type=Path)
    p.add_argument("--models", default="gpt-neo-125M,pythia-160m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = native._library()[0]
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"old": build(args.old_tree, Path(tmp) / "old.so"),
                "new": build(Path(__file__).resolve().parents[1], Path(tmp) / "new.so")}  # fmt: skip
        print("| model | dtype | batch | old tok/s | new tok/s | new / old (per-round range) |\n|---|---|---|---|---|---|")
        for name in args.models.split(","):
            folder = MODELS / name if "/" in name else MODELS / name / "hf"
            model = neolm.load(folder, dtype=args.dtype).model
            prompts = [[1000 + 37 * i * (b + 1) % 29000 for i in range(32)] for b in range(args.batch)]
            rates: dict[str, list[float]] = {"old": [], "new": []}
            with torch.inference_mode():
                for r in range(args.rounds + 1):
                    for which, lib in libs.items():
                        use(model, lib, base)
                        config = GenerationConfig(max_new_tokens=128, min_new_tokens=128)
                        steps = [time.perf_counter() for _ in iter_generate(model, prompts, config)]
                        if r:  # round 0 warms up
                            rates[which].append(args.batch * (len(steps) - 2) / (steps[-1] - steps[1]))
            ratios = [b / a for a, b in zip(rates["old"], rates["new"])]
            old, new = statistics.median(rates["old"]), statistics.median(rates["new"])
            print(f"| {name} | {args.dtype} | {args.batch} | {old:.1f} | {new:.1f} | "
                  f"{new / old:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
