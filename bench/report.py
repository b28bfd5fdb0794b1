"""bench.py's results JSON -> bench/RESULTS.md: tables (median [min-max]), ratios, roofline, targets."""

from __future__ import annotations

import statistics

ENGINE_NAMES = {"neolm": "neolm", "transformers": "transformers", "ctranslate2": "CTranslate2", "llamacpp": "llama.cpp"}
PACKAGES = {"ctranslate2": "ctranslate2", "llamacpp": "llama-cpp-python (its vendored llama.cpp)"}
LLAMA_TYPES = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
NOISY_CORES = 0.1  # other processes' CPU use during a row (cores) above which the row is marked †
NOMINAL_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}  # per weight, when an engine does not say
# (key, column, higher is better, scale, format)
FIGURES = [
    ("decode_tps", "decode tok/s", True, 1, "{:.1f}"),
    ("ttft_s", "TTFT ms", False, 1000, "{:.0f}"),
    ("prefill_tps", "prefill-512 tok/s", True, 1, "{:.0f}"),
    ("batch_tps", "batch-8 decode tok/s", True, 1, "{:.1f}"),
    ("load_s", "load s", False, 1, "{:.2f}"),
]


def row_name(r: dict) -> str:
    name = ENGINE_NAMES[r["engine"]]
    if r["engine"] == "neolm" and r.get("variant"):
        name += f" {r['variant']}"
    if r["engine"] == "transformers":
        attn = (r.get("info") or {}).get("attn_implementation")
        name += f" {r['variant']}" + (f" ({attn})" if attn and attn != r["variant"] else "")
    if r["engine"] == "llamacpp":
        return f"{name} {LLAMA_TYPES[r['precision']]}"
    ct = (r.get("info") or {}).get("compute_type")
    return f"{name} {r['precision']}" + (f" ({ct})" if ct and r["engine"] == "ctranslate2" else "")


def med(r: dict, key: str) -> float | None:
    values = (r.get("figures") or {}).get(key)
    return statistics.median(values) if values else None


def paired(a: dict, b: dict, key: str, per_bandwidth: bool = False) -> list[float]:
    """a's figure over b's, round by round (bench.py --rounds): each ratio from two rows run back to back.
    Empty when the rows were measured once. per_bandwidth: each round's figure first divided by that round's
    bandwidth (`own_bandwidth`), the ratio at equal bandwidth, for memory-bound figures (decoding) whose two
    rows met different phases of the VM's memory; rounds without readings are left out."""

    def value(x: dict) -> float | None:
        v = x["figures"].get(key)
        if not per_bandwidth or not v:
            return v
        gbs = own_bandwidth(x)
        return v / gbs if gbs else None

    theirs = {x["round"]: value(x) for x in b.get("rounds", [])}
    return [value(x) / theirs[x["round"]] for x in a.get("rounds", []) if value(x) and theirs.get(x["round"])]


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median [min–max]"""
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def publish(lines: list[str], out: str | None) -> None:
    """Print a result's markdown lines, and append them to the file `out` (a script's --out), if given."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def ratio(a: dict, b: dict, key: str) -> tuple[float | None, str]:
    """a over b: the median of the per-round ratios when there are two or more, else of the medians; and
    how to print it (with the rounds' min-max)."""
    pairs = paired(a, b, key)
    if len(pairs) >= 2:
        return statistics.median(pairs), spread(pairs)
    x, y = med(a, key), med(b, key)
    return (x / y, f"{x / y:.2f}") if x and y else (None, "–")


def cell(values, scale=1, fmt="{:.1f}") -> str:
    if not values:
        return "–"
    values = [v * scale for v in values]
    m = fmt.format(statistics.median(values))
    if len(values) == 1:
        return m
    return f"{m} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def stream_bytes(r: dict, results: list[dict]) -> tuple[float | None, str]:
    """Weight bytes one decode step reads, and how they were obtained."""
    info = r.get("info") or {}
    if info.get("stream_bytes"):
        return info["stream_bytes"], "exact"
    for ref in results:  # nominal: the fp32 weight count at this precision's bytes per weight
        if (
            ref["model"] == r["model"]
            and ref["precision"] == "fp32"
            and (ref.get("info") or {}).get("stream_bytes")
            and ref["engine"] in ("neolm", "transformers")
        ):
            return ref["info"]["stream_bytes"] / 4 * NOMINAL_BYTES[r["precision"]], "nominal"
    return None, ""


def roofline(r: dict, doc: dict) -> float | None:
    """Measured decode rate / (read bandwidth / weight bytes per token)."""
    b, _ = stream_bytes(r, doc["results"])
    d = med(r, "decode_tps")
    if not b or not d:
        return None
    return d / (read_bandwidth(doc) * 1e9 / b)


def own_bandwidth(x: dict) -> float | None:
    """The higher of the read bandwidths measured just before and just after a row (or one round of it), where
    recorded (the lower roofline fraction)."""
    gbs = [x[k]["read_gbs"] for k in ("bandwidth_before", "bandwidth_after") if x.get(k)]
    return max(gbs) if gbs else None


def roofline_then(r: dict, doc: dict) -> float | None:
    """Measured decode rate / (read bandwidth / weight bytes per token) with the bandwidth of the row's own time:
    per round, the higher of the readings just before and just after it (the lower fraction), then the median
    over rounds. None without readings."""
    b, _ = stream_bytes(r, doc["results"])
    if not b:
        return None
    per_round = [(x["figures"].get("decode_tps"), own_bandwidth(x)) for x in r.get("rounds", [])] or [
        (med(r, "decode_tps"), own_bandwidth(r))
    ]
    fractions = [d / (gbs * 1e9 / b) for d, gbs in per_round if d and gbs]
    return statistics.median(fractions) if fractions else None


def read_bandwidth(doc: dict) -> float:
    """The highest read bandwidth measured in the run (start, end, re-runs, and the reading before each row or
    round, the same measurement): the quietest, so the roofline is not lowered by a busy moment or by a slow
    phase of the memory at the start and end."""
    runs = [doc.get("bandwidth_start"), doc.get("bandwidth_end")] + [
        r.get("bandwidth_start") for r in doc.get("reruns", [])
    ]
    for r in doc.get("results", []):
        for x in [r, *r.get("rounds", [])]:
            runs += [x.get("bandwidth_before"), x.get("bandwidth_after")]
    return max(b["read_gbs"] for b in runs if b)


def brief(r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("reason", "")
    parts = [f"{col} {fmt.format(med(r, k) * s)}" for k, col, _, s, fmt in FIGURES if med(r, k) is not None]
    return ", ".join(parts + [f"RSS {r.get('peak_rss_mb', 0):.0f} MB"])


def agreement(r: dict, rows: list[dict]) -> str:
    """Leading greedy tokens equal to the reference's (neolm fp32, else transformers eager fp32)."""
    for engine, variant in (("neolm", ""), ("transformers", "eager")):
        ref = [
            x
            for x in rows
            if x["engine"] == engine and x["variant"] == variant and x["precision"] == "fp32" and x.get("greedy_tokens")
        ]
        if ref:
            a, b = r.get("greedy_tokens") or [], ref[0]["greedy_tokens"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"{same}/{len(b)}" if a else "–"
    return "–"


def model_table(model: str, doc: dict) -> list[str]:
    rows = [r for r in doc["results"] if r["model"] == model]
    s = doc["settings"]
    names = [c.replace("512", str(s["prefill_len"])).replace("batch-8", f"batch-{s['batch']}") for _, c, *_ in FIGURES]
    out = [
        f"### {model}",
        "",
        f"| engine | {names[0]} | % roofline | "
        + " | ".join(names[1:])
        + " | batch/single | peak RSS MB | greedy = ref | read GB/s before |",
        "|---" * (len(FIGURES) + 6) + "|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {row_name(r)} | {r.get('reason', r.get('status'))} |" + " |" * (len(FIGURES) + 4))
            continue
        f = r["figures"]
        roof = roofline(r, doc)
        _b, how = stream_bytes(r, doc["results"])
        roof_cell = f"{100 * roof:.0f}%" + ("*" if how == "nominal" else "") if roof else "–"
        then = roofline_then(r, doc)
        roof_cell += f" ({100 * then:.0f}%)" if roof and then else ""
        own = batch_over_single(r)
        cells = [cell(f.get(k), s, fmt) for k, _, _, s, fmt in FIGURES]
        noisy = " †" if (r.get("other_cpu_cores") or 0) > NOISY_CORES else ""
        noisy += " (stopped at the time limit: missing cells not measured)" if r.get("incomplete") else ""
        noisy += f" ({r['rounds_failed']} round(s) failed: see the logs)" if r.get("rounds_failed") else ""
        out.append(
            f"| {row_name(r)}{noisy} | {cells[0]} | {roof_cell} | "
            + " | ".join(cells[1:])
            + f" | {f'{own:.1f}×' if own else '–'} | {r.get('peak_rss_mb') or 0:.0f} | {agreement(r, rows)} | "
            + f"{bandwidth_cell(r)} |"
        )
    return out + [""]


def batch_over_single(r: dict) -> float | None:
    """Batch decode rate over single-stream: per round (both figures come from one process) when there are
    rounds, else of the medians."""
    per_round = [x["figures"]["batch_tps"] / x["figures"]["decode_tps"] for x in r.get("rounds", [])
                 if x["figures"].get("batch_tps") and x["figures"].get("decode_tps")]  # fmt: skip
    if len(per_round) >= 2:
        return statistics.median(per_round)
    b, d = med(r, "batch_tps"), med(r, "decode_tps")
    return b / d if b and d else None


def bandwidth_cell(r: dict) -> str:
    reads = [x["bandwidth_before"]["read_gbs"] for x in r.get("rounds", [])] or (
        [r["bandwidth_before"]["read_gbs"]] if r.get("bandwidth_before") else []
    )
    if not reads:
        return "–"
    return f"{min(reads):.0f}" if len(reads) == 1 else f"{min(reads):.0f}–{max(reads):.0f}"


def ratio_table(doc: dict) -> list[str]:
    res = [r for r in doc["results"] if r.get("status") == "ok"]
    keys = [
        ("decode_tps", "decode ↑"),
        ("prefill_tps", "prefill ↑"),
        ("batch_tps", "batch-8 ↑"),
        ("ttft_s", "TTFT ↓"),
        ("load_s", "load ↓"),
        ("peak_rss_mb", "RSS ↓"),
    ]
    out = [
        "| model | precision | neolm / peer | " + " | ".join(c for _, c in keys) + " |",
        "|---" * (len(keys) + 3) + "|",
    ]
    for n in [r for r in res if r["engine"] == "neolm"]:
        for peer in [
            r for r in res if r["engine"] != "neolm" and r["model"] == n["model"] and r["precision"] == n["precision"]
        ]:
            cells = []
            for k, _ in keys:
                if k == "peak_rss_mb":
                    a, b = n.get("peak_rss_mb"), peer.get("peak_rss_mb")
                    cells.append(f"{a / b:.2f}" if a and b else "–")
                else:
                    cells.append(ratio(n, peer, k)[1])
            out.append(f"| {n['model']} | {n['precision']} | {row_name(n)} / {row_name(peer)} | " + " | ".join(cells) + " |")
    return out + [
        "",
        (
            "Ratios are neolm's median over the peer's (measured in rounds, `--rounds`: the median [min–max] of "
            "the ratios round by round, each from the two rows run back to back): above 1 is better for ↑ "
            "figures, below 1 for ↓ ones."
        ),
        "",
    ]


def targets(doc: dict) -> list[str]:
    """Issue 6's targets. A comparison with a peer is judged by the ratio column: the median of the per-round
    ratios when the run had rounds (rows run back to back), else the ratio of the medians."""
    res = [r for r in doc["results"] if r.get("status") == "ok"]
    out = [
        (
            "Judged on the ratio column's first figure (the median of the per-round ratios, or of the medians without "
            "rounds). For decoding, which is memory-bound, the ratio at equal bandwidth follows where the rounds have "
            "bandwidth readings: each row's rate over its own round's bandwidth (the higher reading just before and "
            "after it), shown to tell a slower engine from one that met a slower phase of the memory."
        ),
        "",
        "| target | model | neolm | reference | ratio | met |",
        "|---|---|---|---|---|---|",
    ]

    def find(model, engine, precision, variant=None):
        return [r for r in res if r["model"] == model and r["engine"] == engine and r["precision"] == precision
                and (variant is None or r.get("variant", "") == variant)]  # fmt: skip

    variant = ""  # of the neolm rows being checked

    def line(what, model, mine, ref, shown, ok):
        who = f" (neolm {variant})" if variant else ""
        out.append(f"| {what}{who} | {model} | {mine} | {ref} | {shown} | {'yes' if ok else '**no**'} |")

    def against(n, rows, key, what, model, times=1.0):
        """n against the strongest of rows: the lowest ratio must reach `times`."""
        pairs = [(ratio(n, r, key), r) for r in rows if med(r, key)]
        pairs = [((x, shown), r) for (x, shown), r in pairs if x]
        if not pairs or not med(n, key):
            return
        (x, shown), r = min(pairs, key=lambda p: p[0][0])
        per_bandwidth = paired(n, r, key, per_bandwidth=True) if key == "decode_tps" else []
        if len(per_bandwidth) >= 2:  # shown, not judged: the target stays on the plain paired ratio
            shown += f"; at equal bandwidth {spread(per_bandwidth)}"
        ref = f"{med(r, key):.1f} ({row_name(r)})"
        line(what, model, f"{med(n, key):.1f}", ref if times == 1 else f"{times:g} × {ref}", shown, x >= times)

    variants = dict.fromkeys(r.get("variant", "") for r in res if r["engine"] == "neolm")
    for model, variant in [(m, v) for m in dict.fromkeys(r["model"] for r in doc["results"]) for v in variants]:
        neo = {p: (find(model, "neolm", p, variant) or [None])[0] for p in ("fp32", "bf16", "int8", "int4")}
        if neo["fp32"] and med(neo["fp32"], "decode_tps"):
            against(neo["fp32"], find(model, "transformers", "fp32"), "decode_tps",
                    "fp32 decode ≥ 2× transformers (best attention)", model, times=2.0)  # fmt: skip
            against(neo["fp32"], find(model, "llamacpp", "fp32"), "decode_tps", "fp32 decode ≥ llama.cpp F32", model)
            if model in ("gpt-neo-125M", "pythia-160m"):
                roof, then = roofline(neo["fp32"], doc), roofline_then(neo["fp32"], doc)
                shown = f"{100 * roof:.0f}% of the run's best bandwidth"
                shown += f"; {100 * then:.0f}% of the row's" if then else ""
                line("fp32 decode ≥ 70% of roofline (125M shape)", model, shown, "70%", "–", (then or roof) >= 0.7)
        if neo["int8"]:
            against(neo["int8"], find(model, "llamacpp", "int8"), "decode_tps", "int8 decode ≥ 1.2× llama.cpp Q8_0",
                    model, times=1.2)  # fmt: skip
            against(neo["int8"], find(model, "ctranslate2", "int8"), "decode_tps",
                    "int8 decode ≥ 2× CTranslate2 int8", model, times=2.0)  # fmt: skip
        for p, n in neo.items():
            if not n:
                continue
            peers = [r for r in res if r["model"] == model and r["precision"] == p and r["engine"] != "neolm"]
            against(n, peers, "prefill_tps", f"{p} prefill-512 ≥ best peer", model)
            against(n, peers, "decode_tps", f"{p} decode ≥ best peer (fastest)", model)
            own = batch_over_single(n)
            if own:
                line(f"{p} batch-8 ≥ 4× own single stream", model, f"{own:.1f}×", "4×", "–", own >= 4)
    return out + [""]


def other_cpu(doc: dict) -> str:
    """How quiet the machine stayed: other processes' CPU use during each measured row."""
    vals = sorted((r["other_cpu_cores"], row_name(r), r["model"]) for r in doc["results"] if "other_cpu_cores" in r)
    if not vals:
        return "- Other processes' CPU use during the rows: not recorded"
    noisy = [v for v in vals if v[0] > NOISY_CORES]
    return (
        f"- Other processes' CPU use while each row ran (cores, from /proc/stat minus the worker's own): median "
        f"{statistics.median(v[0] for v in vals):.2f}, max {vals[-1][0]:.2f} ({vals[-1][2]} {vals[-1][1]}); "
        + (
            f"{len(noisy)} row(s) above {NOISY_CORES} cores are marked †"
            if noisy
            else f"no row above {NOISY_CORES} cores"
        )
    )


def rounds_text(s: dict) -> str:
    rounds = s.get("rounds", 1)
    if rounds < 2:
        return ""
    return (
        f" in each of {rounds} rounds (every row of a model × precision ran once per round, the engines' order "
        f"reversed every other round; ratios, targets and batch/single are medians of per-round ratios)"
    )


def render(doc: dict) -> str:
    m, s = doc["machine"], doc["settings"]
    q0, q1 = doc["quiet_start"], doc.get("quiet_end", {})
    bw0, bw1 = doc["bandwidth_start"], doc.get("bandwidth_end", {})
    lines = [
        "# neolm benchmark results", "",
        "Generated by `bench/bench.py` (see `bench/README.md`); raw per-run numbers in `RESULTS.json` beside this file.", "",
        "```", doc["command"], "```", "",
        "## Machine and conditions", "",
        (f"- CPU: {m['cpu']}" + (f" ({m['cpu_id']})" if m.get("cpu_id") else "") + f", {m['cpus']} CPUs ({m['cores_per_socket']} cores/socket × {m['sockets']} socket, "
        f"{m['threads_per_core']} thread/core), L2 {m['l2']}, L3 {m['l3']}; {m['simd']}; {m['memory_gib']} GiB RAM; Linux {m['kernel']}"),
        f"- Python {m['python']}, torch {m.get('torch')}, transformers {m.get('transformers')}; neolm at commit {m.get('neolm_commit')}; "
        + "peers: " + ", ".join(f"{PACKAGES[k]} {v}" for k, v in doc["peers"]["versions"].items()),
        f"- Threads: {s['threads']} (torch.set_num_threads, OMP/MKL_NUM_THREADS, CTranslate2 intra_threads, llama.cpp n_threads)",
        f"- Started {q0['time']}, load average {q0['loadavg']}, training run active: {q0['neolm_train_running']}"
        + (f", other busy processes: {'; '.join(q0['busy'])}" if q0["busy"] else ", no other busy process"),
        f"- Ended {q1.get('time')}, load average {q1.get('loadavg')}; total wall time {doc.get('wall_s', 0) / 60:.0f} min",
        other_cpu(doc),
        *[
            f"- Re-measured {', '.join(r['models'])} (these rows replace the first pass's): started "
            f"{r['quiet_start']['time']}, load average {r['quiet_start']['loadavg']}, read bandwidth "
            f"{r['bandwidth_start']['read_gbs']:.1f} GB/s"
            for r in doc.get("reruns", [])
        ],
        f"- Memory bandwidth ({s['threads']} threads, 1 GiB fp32): read (sum) {bw0['read_gbs']:.1f} GB/s, copy {bw0['copy_gbs']:.1f} GB/s"
        + (f" at the start; {bw1['read_gbs']:.1f} / {bw1['copy_gbs']:.1f} GB/s at the end" if bw1 else ""), "",
        "## Method", "",
        (f"Random weights of the real shapes (saved by transformers, real tokenizers), the same token ids for every engine. "
        f"Decode: {s['prompt_len']}-token prompt, {s['new_tokens']} new tokens, greedy, eos banned so every engine makes all "
        f"{s['new_tokens']}; decode tok/s = (n−1)/(time of token n − time of token 1); TTFT = time to the first new token "
        f"(prefill + one step). Prefill: a {s['prefill_len']}-token prompt to last-token logits. Batch: {s['batch']} different "
        f"{s['prompt_len']}-token prompts at once, decode tokens/s over all sequences after the first step. Load: from a warm "
        f"page cache; quantized rows load each engine's own quantized files, made before the run (neolm: a folder as "
        f"`neolm quantize` writes it, output head included; llama.cpp: GGUF; CTranslate2 quantizes its converted float model as it loads). Peak RSS: VmHWM of the engine's own process after load and all measurements. Each cell: median "
        f"[min–max] of {s['runs']} runs ({s['big_runs'] or s['runs']} on {s['big_models']}){rounds_text(s)}, after an untimed "
        f"warm-up; every engine × model × precision in its own process, run model by model and precision by precision, "
        f"each precision's rows back to back (this VM's memory speed drifts within minutes)."), "",
        (f"% roofline = decode tok/s ÷ (read bandwidth ÷ weight bytes a step reads), with the highest read bandwidth "
            f"measured in the run, start, end and before each row ({read_bandwidth(doc):.1f} GB/s), and in parentheses with the "
            "row's own: per round, the higher of the readings just before and just after it, median over the rounds (the "
            "70% target is judged on this one where it exists: the VM's bandwidth moves between ~35 and ~88 GB/s); the bytes are the engine's own "
        "(neolm, transformers: its tensors; llama.cpp: the GGUF tensor table), or, marked *, the fp32 weight count × "
        "nominal bytes per weight (CTranslate2). Embedding tables count one row; a tied output head counts in full. "
        "greedy = ref: how many leading greedy tokens equal neolm fp32's (random weights give near-flat logits, so "
        "lower precisions drift early; fp32 engines should agree for long). read GB/s before: the read bandwidth "
        "measured just before the row's job (a VM's memory can move between slow and fast phases within minutes: "
        "compare rows measured at similar bandwidth)."), "",
    ]  # fmt: skip
    if s.get("skip"):
        lines += [f"Rows not run, to fit the time budget: `{', '.join(s['skip'])}`.", ""]
    if s.get("batch_precisions") and set(s["batch_precisions"]) != {"fp32", "bf16", "int8", "int4"}:
        lines += [f"The batch figure was measured for {', '.join(s['batch_precisions'])} only (time budget).", ""]
    lines += ["## Results (CPU)", ""]
    for model in dict.fromkeys(r["model"] for r in doc["results"]):
        lines += model_table(model, doc)
    lines += ["## neolm / peer", ""] + ratio_table(doc) + ["## Targets (issue 6)", ""] + targets(doc)
    cuda = doc.get("cuda_note", "Measured apart: `bench/gpu.py` on an NVIDIA GPU writes `GPU.md` beside this file.")
    lines += ["## CUDA", "", cuda, ""]
    return "\n".join(lines)
