"""neolm against transformers, CTranslate2 and llama.cpp, in one run on one machine (see bench/README.md).

  python bench/bench.py --models gpt-neo-125M,pythia-160m,gpt-neo-1.3B,pythia-1.4b \
      --engines neolm,transformers,ctranslate2,llamacpp --precisions fp32,bf16,int8,int4 \
      --runs 3 --threads 2 --out bench/RESULTS.md
  python bench/bench.py --quick          # smoke test: small shapes, few tokens, one run

Each engine x model x precision runs in its own process (bench/engines/worker.py) with the
interpreter that has that engine; results are gathered as JSON (next to --out) and rendered by
bench/report.py. Checkpoints and converted files are cached under --cache.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import machine
import report

A8_PRECISION = {"W8A8": "int8", "W4A8": "int4"}  # neolm's int8-activation variants, each for its precision
# neolm variants are options joined by "+" (neolm_engine.py); kv16: a bf16 KV cache (fp32 activations only);
# kv8: an int8 KV cache; mmap: float weights left in the checkpoint's pages (fp32/bf16 only); hp: weights moved
# into transparent huge pages
ENGINE_VARIANTS = {
    "neolm": ["", "compile", "mmap", "W8A8", "W4A8", "kv16", "W8A8+kv16", "W4A8+kv16", "kv8", "W8A8+kv8", "W4A8+kv8",
              "hp"],
    "transformers": ["eager", "default"],
    "ctranslate2": [""], "llamacpp": [""],
}  # fmt: skip
PRECISIONS = {  # which precisions each engine has (others are not rows)
    "neolm": ["fp32", "bf16", "int8", "int4"], "transformers": ["fp32", "bf16"],
    "ctranslate2": ["fp32", "bf16", "int8"], "llamacpp": ["fp32", "bf16", "int8", "int4"],
}  # fmt: skip
GGUF = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


def family(model: str) -> str:
    return "neo" if model.startswith(("gpt-neo-", "neo-")) else "neox"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(cmd: list[str], logfile: Path, timeout: float, env=None) -> bool:
    with open(logfile, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            return (
                subprocess.run(
                    cmd, check=False, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env
                ).returncode
                == 0
            )
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout}s\n")
            return False


def probe(python: str, module: str) -> tuple[str | None, str]:
    """(version, reason): the module's version in that interpreter, or None and why not."""
    if not Path(python).exists():
        return None, f"not installed: no interpreter {python} (see bench/README.md)"
    code = f"import {module}, json; print(json.dumps(getattr({module}, '__version__', '?')))"
    out = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True)
    if out.returncode:
        return None, f"not installed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'import failed'}"
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


class Peers:
    """Where each peer lives: the main interpreter if it has it, else the venv bench/README.md makes."""

    def __init__(self, args):
        self.python = {"neolm": sys.executable, "transformers": sys.executable}
        self.versions, self.missing = {}, {}
        candidates = {"ctranslate2": [sys.executable, args.ct2_python], "llamacpp": [sys.executable, args.llama_python]}
        modules = {"ctranslate2": "ctranslate2", "llamacpp": "llama_cpp"}
        for engine, pythons in candidates.items():
            reasons = []
            for python in pythons:
                version, reason = probe(python, modules[engine])
                if version:
                    self.python[engine], self.versions[engine] = python, version
                    break
                reasons.append(reason)
            else:
                self.missing[engine] = reasons[-1]
        # both converters (ct2-transformers-converter, llama.cpp's convert_hf_to_gguf.py) need transformers < 5:
        # under 5, GPT-NeoX configs lose rotary_pct, which both read
        version, reason = probe(args.convert_python, "transformers")
        self.convert_python = args.convert_python if version and int(version.split(".")[0]) < 5 else None
        if not self.convert_python:
            self.convert_missing = f"conversion needs transformers < 5 in {args.convert_python} ({reason or version})"
        conv = Path(args.convert_python).parent / "ct2-transformers-converter"
        self.ct2_converter = str(conv) if self.convert_python and conv.exists() else None
        for engine in ("ctranslate2", "llamacpp"):
            if engine in self.python and not self.convert_python:
                self.missing[engine] = self.convert_missing
        if "ctranslate2" in self.python and not self.ct2_converter:
            self.missing["ctranslate2"] = f"no ct2-transformers-converter beside {args.convert_python}"


def prepare(model: str, engines: list[str], peers: Peers, args, notes: dict) -> Path:
    """Make (or reuse) the checkpoint and the peers' converted files; record failures in notes."""
    root = Path(args.cache) / "models" / model
    root.mkdir(parents=True, exist_ok=True)
    logfile = root / "prepare.log"
    hf = root / "hf"
    if not (hf / "config.json").exists():
        log(f"{model}: random checkpoint")
        if not sh([sys.executable, str(HERE / "prepare.py"), "checkpoint", model, str(hf)], logfile, 3600):
            raise SystemExit(f"could not build the {model} checkpoint: see {logfile}")
    if "neolm" in engines:
        for precision in ("int8", "int4"):
            out = root / f"neolm-{precision}"
            shutil.rmtree(out, ignore_errors=True)  # made afresh: by the neolm this run measures
            if precision in args.precisions:
                log(f"{model}: neolm {precision} folder")
                cmd = [sys.executable, str(HERE / "prepare.py"), "neolm-quantized", str(hf), str(out), precision]
                if not sh(cmd, logfile, 3600):
                    shutil.rmtree(out, ignore_errors=True)
                    problem = f"folder failed (see {logfile}); its rows quantize while loading"
                    notes.setdefault(model, {})[f"neolm {precision} folder"] = problem
                    log(f"{model}: neolm {precision} {problem}")
    if family(model) == "neo":
        return hf
    if "ctranslate2" in engines and peers.ct2_converter and not (root / "ct2" / "model.bin").exists():
        log(f"{model}: CTranslate2 conversion")
        cmd = [
            peers.ct2_converter,
            "--model",
            str(hf),
            "--output_dir",
            str(root / "ct2"),
            "--force",
            "--low_cpu_mem_usage",
        ]
        if not sh(cmd, logfile, 3600):
            notes.setdefault(model, {})["ctranslate2"] = f"conversion failed (see {logfile})"
    if "llamacpp" in engines and "llamacpp" in peers.python:
        src = llama_source(peers, args, logfile)
        lpy = peers.python["llamacpp"]
        for kind in ("f32", "bf16", "q8_0", "q4_0"):
            out = root / f"{kind}.gguf"
            if out.exists():
                continue
            log(f"{model}: GGUF {kind}")
            if kind in ("f32", "bf16"):
                if src is None:
                    notes.setdefault(model, {})["llamacpp"] = "no llama.cpp source for convert_hf_to_gguf.py"
                    break
                ok = sh(
                    [
                        peers.convert_python,
                        str(src / "convert_hf_to_gguf.py"),
                        str(hf),
                        "--outtype",
                        kind,
                        "--outfile",
                        f"{out}.tmp",
                    ],
                    logfile,
                    3600,
                )
                ok = ok and os.replace(f"{out}.tmp", out) is None
            else:
                ok = sh(
                    [lpy, str(HERE / "prepare.py"), "quantize", str(root / "f32.gguf"), str(out), kind], logfile, 3600
                )
            if ok and src is not None:
                sh([lpy, str(HERE / "prepare.py"), "gguf-bytes", str(out), str(src)], logfile, 600)
            if not ok:
                notes.setdefault(model, {})[f"llamacpp-{kind}"] = f"GGUF {kind} failed (see {logfile})"
    return hf


def llama_source(peers: Peers, args, logfile: Path) -> Path | None:
    """llama.cpp's source as vendored in the installed llama-cpp-python's sdist (for its converter)."""
    src = Path(args.llama_cpp_src)
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    version = peers.versions.get("llamacpp")
    dl = Path(args.cache) / "sdist"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "-d",
        str(dl),
        f"llama-cpp-python=={version}",
    ]
    if not sh(cmd, logfile, 600):
        return None
    import tarfile

    with tarfile.open(next(dl.glob(f"llama_cpp_python-{version}.tar.gz"))) as tar:
        tar.extractall(dl, filter="data")
    os.replace(dl / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp", src)
    return src


def run_job(job: dict, peers: Peers, args, hf: Path, workdir: Path, suffix: str = "") -> dict:
    engine, variant, precision = job["engine"], job["variant"], job["precision"]
    name = f"{job['model']}-{engine}{'-' + variant if variant else ''}-{precision}{suffix}"
    out = workdir / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(REPO))  # fmt: skip
    cmd = [peers.python[engine], str(HERE / "engines" / "worker.py"), "--engine", engine, "--variant", variant,
           "--model-dir", str(hf), "--precision", precision, "--threads", str(args.threads), "--runs", str(job["runs"]),
           "--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len), "--batch", str(args.batch),
           "--figures", job["figures"], "--out", str(out)]  # fmt: skip
    out.unlink(missing_ok=True)
    t, busy, mine = time.perf_counter(), machine.cpu_busy_seconds(), sum(os.times()[2:4])
    ok = sh(cmd, workdir / f"{name}.log", args.job_timeout, env)
    wall = time.perf_counter() - t
    # CPU that other processes used meanwhile, in cores (the worker's own CPU time subtracted)
    foreign = (machine.cpu_busy_seconds() - busy - (sum(os.times()[2:4]) - mine)) / wall
    result = (
        json.loads(out.read_text())
        if out.exists()
        else {
            "status": "error",
            "reason": f"worker {'failed' if not ok else 'wrote nothing'}: see {workdir / (name + '.log')}",
        }
    )
    if result.get("status") == "partial":  # killed at --job-timeout: keep the runs it finished
        result.update(status="ok", incomplete=True, peak_rss_mb=result.get("rss_so_far_mb"))
        result["figures"] = {k: v for k, v in result.get("figures", {}).items() if v}
    result.update(model=job["model"], engine=engine, variant=variant, precision=precision, wall_s=wall)
    result["other_cpu_cores"] = round(max(foreign, 0.0), 3)
    return result


def merge_rounds(results: list[dict]) -> dict:
    """One row from its rounds: every run's figures pooled; per round, its medians and conditions (the
    pairing report.py does). Rounds that failed are counted; the row is an error only if all failed."""
    ok = [r for r in results if r.get("status") == "ok"]
    if len(results) == 1 or not ok:
        return results[0] if len(results) == 1 else dict(results[-1], rounds_failed=len(results))
    row = dict(ok[0])
    row["figures"] = {k: [v for r in ok for v in r["figures"].get(k, [])] for k in ok[0]["figures"]}
    row["peak_rss_mb"] = max(r.get("peak_rss_mb") or 0 for r in ok)
    row["wall_s"] = sum(r["wall_s"] for r in ok)
    row["other_cpu_cores"] = max(r["other_cpu_cores"] for r in ok)
    row["incomplete"] = any(r.get("incomplete") for r in ok)
    row["rounds"] = [
        {"round": r["round"], "figures": {k: statistics.median(v) for k, v in r["figures"].items() if v},
         "bandwidth_before": r["bandwidth_before"], "bandwidth_after": r.get("bandwidth_after"),
         "other_cpu_cores": r["other_cpu_cores"]}
        for r in results if r.get("status") == "ok"
    ]  # fmt: skip
    row["rounds_failed"] = len(results) - len(ok)
    row.pop("bandwidth_before", None)
    row.pop("bandwidth_after", None)
    row.pop("round", None)
    return row


def variant_fits(variant: str, precision: str) -> bool:
    """W8A8, W4A8: neolm int8, int4 with quantize_activations; kv16: a bf16 cache beside fp32 activations; kv8: an
    int8 cache (any precision); mmap: float weights in the file's pages (quantized weights are copies anyway); hp:
    weights in huge pages (any precision; not with mmap, which leaves them in the file)."""
    options = variant.split("+")
    if ("kv16" in options and precision == "bf16") or ("mmap" in options and precision not in ("fp32", "bf16")):
        return False
    if "mmap" in options and "hp" in options:
        return False
    return all(A8_PRECISION.get(option, precision) == precision for option in options)


def plan(args, peers: Peers, notes: dict) -> list[dict]:
    """Every engine x model x precision: a job, or a row saying why not."""
    jobs = []
    big = set(args.big_models.split(",")) if args.big_models else set()
    for model in args.models:
        for engine in args.engines:
            for variant in ENGINE_VARIANTS[engine]:
                for precision in args.precisions:
                    if precision not in PRECISIONS[engine] or not variant_fits(variant, precision):
                        continue
                    batch = precision in args.batch_precisions
                    job = {"model": model, "engine": engine, "variant": variant, "precision": precision,
                           "runs": args.runs, "figures": "single,prefill,load" + (",batch" if batch else "")}  # fmt: skip
                    key = f"{model}/{engine}{'-' + variant if variant else ''}:{precision}"
                    reason = peers.missing.get(engine)
                    if engine in ("ctranslate2", "llamacpp") and family(model) == "neo":
                        reason = f"unsupported: {report.ENGINE_NAMES[engine]} has no GPT-Neo architecture"
                    elif any(fnmatch.fnmatchcase(key, pattern) for pattern in args.skip):
                        reason = "not run, to fit the time budget (see Method)"
                    reason = (
                        reason
                        or notes.get(model, {}).get(engine)
                        or notes.get(model, {}).get(f"{engine}-{GGUF[precision]}")
                    )
                    if reason:
                        job.update(status="unavailable", reason=reason)
                    elif model in big:
                        job.update(runs=args.big_runs or args.runs)
                    jobs.append(job)
    return jobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt-neo-125M,pythia-160m,gpt-neo-1.3B,pythia-1.4b")
    p.add_argument("--engines", default="neolm,transformers,ctranslate2,llamacpp")
    p.add_argument("--precisions", default="fp32,bf16,int8,int4")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each model x precision's rows this many times, the engines' order reversed every other "
        "round; ratios and targets then pair the rows round by round (use with --runs 1)",
    )
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--big-models", default="gpt-neo-1.3B,pythia-1.4b", help="shapes that get --big-runs")
    p.add_argument("--big-runs", type=int, default=0, help="runs on the big shapes (0: --runs)")
    p.add_argument("--skip", default="", help="rows not run: MODEL/ENGINE[-VARIANT]:PRECISION patterns (fnmatch)")
    p.add_argument("--batch-precisions", default="fp32,bf16,int8,int4", help="precisions that get the batch figure")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--cache", default="/tmp/neolm-bench")
    p.add_argument("--ct2-python", default="/tmp/neolm-bench/ct2-venv/bin/python")
    p.add_argument("--llama-python", default="/tmp/neolm-bench/llama-venv/bin/python")
    p.add_argument(
        "--convert-python",
        default="/tmp/neolm-bench/ct2-venv/bin/python",
        help="an interpreter with torch and transformers < 5 (and ctranslate2) for the converters",
    )
    p.add_argument("--llama-cpp-src", default="/tmp/neolm-bench/llama.cpp-src")
    p.add_argument("--job-timeout", type=float, default=1800)
    p.add_argument("--quick", action="store_true", help="smoke test: 8 new tokens, 64-token prefill, batch 2, 1 run")
    p.add_argument(
        "--prepare-only", action="store_true", help="build the checkpoints and converted files, measure nothing"
    )
    p.add_argument("--render", metavar="JSON", help="only re-render --out from a results JSON")
    args = p.parse_args()
    command = "python bench/bench.py " + shlex.join(sys.argv[1:])
    if args.render:
        Path(args.out).write_text(report.render(json.loads(Path(args.render).read_text())))
        return
    if args.quick:
        args.new_tokens, args.prefill_len, args.batch, args.runs, args.big_runs = 8, 64, 2, 1, 1
        if "--models" not in sys.argv:
            args.models = "gpt-neo-125M,pythia-160m"
        if "--out" not in sys.argv:
            args.out = str(Path(args.cache) / "QUICK.md")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # (before the first job, not after it)
    args.models, args.engines, args.precisions = (s.split(",") for s in (args.models, args.engines, args.precisions))
    args.skip = sorted(filter(None, args.skip.split(",")))
    args.batch_precisions = args.batch_precisions.split(",")
    started = time.time()
    doc = {
        "command": command,
        "machine": machine.describe(),
        "quiet_start": machine.quietness(),
        "settings": {
            k: getattr(args, k) for k in ("threads", "runs", "rounds", "big_runs", "new_tokens", "prefill_len", "batch", "quick")
        },
    }
    doc["settings"].update(
        prompt_len=32, big_models=args.big_models, skip=args.skip, batch_precisions=args.batch_precisions
    )
    log(f"machine: {doc['machine']['cpu']}; load {doc['quiet_start']['loadavg']}")
    peers = Peers(args)
    doc["peers"] = {"versions": peers.versions, "missing": peers.missing, "python": peers.python}
    for engine, reason in peers.missing.items():
        log(f"{engine}: {reason}")
    notes: dict = {}
    dirs = {m: prepare(m, args.engines, peers, args, notes) for m in args.models}
    if args.prepare_only:
        log(f"prepared {', '.join(args.models)}; problems: {notes or 'none'}")
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    bw = lambda: json.loads(
        subprocess.run(
            [sys.executable, str(HERE / "machine.py"), "bandwidth", str(args.threads)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
    )
    doc["bandwidth_start"] = bw()
    log(
        f"memory bandwidth: read {doc['bandwidth_start']['read_gbs']:.1f} GB/s, copy {doc['bandwidth_start']['copy_gbs']:.1f} GB/s"
    )
    workdir = Path(args.cache) / "runs" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    jobs = plan(args, peers, notes)  # in table order: per model, engine by engine
    # Run order: per model, precision by precision, every engine's row of a precision right after the other,
    # so that the rows a ratio compares run within a minute or two of each other: this VM's memory moves
    # between a slow and a fast phase within minutes, which a run engine by engine turned into ratios.
    # With --rounds N, a precision's rows run N times over, the engines' order reversed every other round,
    # and report.py pairs the rows round by round (a ratio per round, from rows run back to back).
    groups: dict = {}
    for i, job in enumerate(jobs):
        groups.setdefault((args.models.index(job["model"]), args.precisions.index(job["precision"])), []).append(i)
    rounds: list[list] = [[] for _ in jobs]  # each job's result per round
    json_path = Path(args.out).with_suffix(".json")
    total = sum(job.get("status") != "unavailable" for job in jobs) * args.rounds
    n = 0
    for key in sorted(groups):
        for rnd in range(args.rounds):
            for i in groups[key][:: -1 if rnd % 2 else 1]:
                job = jobs[i]
                if job.get("status") == "unavailable":
                    continue
                n += 1
                log(f"[{n}/{total}] {job['model']} {job['engine']} {job['variant']} {job['precision']}"
                    + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""))  # fmt: skip
                before = bw()  # this VM's memory moves between slow and fast phases within minutes: note the row's
                result = run_job(job, peers, args, dirs[job["model"]], workdir, f"-r{rnd + 1}" if args.rounds > 1 else "")
                result.update(bandwidth_before=before, bandwidth_after=bw(), round=rnd + 1)  # (the row's roofline)
                log(f"    {result['status']} in {result['wall_s']:.0f}s (read {before['read_gbs']:.0f} GB/s before) {report.brief(result)}")
                rounds[i].append(result)
                doc["results"] = [merge_rounds(r) if r else job for job, r in zip(jobs, rounds) if r or job.get("status")]
                json_path.write_text(json.dumps(doc, indent=1))  # partial results survive an interruption
    results = [merge_rounds(r) if r else job for job, r in zip(jobs, rounds)]
    doc.update(bandwidth_end=bw(), quiet_end=machine.quietness(), wall_s=time.time() - started, results=results)
    json_path.write_text(json.dumps(doc, indent=1))
    Path(args.out).write_text(report.render(doc))
    log(f"done in {doc['wall_s'] / 60:.1f} min: {args.out}, {json_path}")


if __name__ == "__main__":
    main()
