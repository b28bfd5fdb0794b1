"""bench/: rows merged from their rounds (bench.py --rounds), report.py's paired ratios and rooflines, and
worker.py's serve mode (duel.py)."""

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # bench.py imports its neighbours (machine, report) by name


def load(name):  # by path: the repository's bench/ folder would otherwise shadow bench.py as a package
    spec = importlib.util.spec_from_file_location(f"neolm_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench, report = load("bench"), load("report")


def round_result(engine, rnd, decode, batch=None, gbs=50.0):
    figures = {"decode_tps": [decode], "prefill_tps": [decode * 10]}
    if batch:
        figures["batch_tps"] = [batch]
    return {"status": "ok", "model": "m", "engine": engine, "variant": "", "precision": "fp32", "figures": figures,
            "wall_s": 1.0, "other_cpu_cores": 0.0, "bandwidth_before": {"read_gbs": gbs}, "round": rnd}  # fmt: skip


def test_merge_rounds_pools_runs_and_keeps_each_round():
    row = bench.merge_rounds([round_result("neolm", 1, 10.0, 40.0, 40), round_result("neolm", 2, 20.0, 100.0, 80)])
    assert row["figures"]["decode_tps"] == [10.0, 20.0]
    assert [r["round"] for r in row["rounds"]] == [1, 2]
    assert row["rounds"][1]["figures"]["batch_tps"] == 100.0
    assert row["rounds_failed"] == 0 and "round" not in row and "bandwidth_before" not in row
    assert report.bandwidth_cell(row) == "40–80"
    # batch over single per round (4x and 5x), not of the pooled medians (70 / 15)
    assert report.batch_over_single(row) == pytest.approx(4.5)


def test_merge_rounds_counts_failed_rounds():
    failed = {"status": "error", "reason": "worker failed", "round": 2}
    row = bench.merge_rounds([round_result("neolm", 1, 10.0), failed, round_result("neolm", 3, 30.0)])
    assert row["status"] == "ok" and row["rounds_failed"] == 1
    assert [r["round"] for r in row["rounds"]] == [1, 3]
    assert bench.merge_rounds([failed, failed])["status"] == "error"
    single = round_result("neolm", 1, 10.0)
    assert bench.merge_rounds([single]) is single


def test_ratios_pair_rounds_not_medians():
    # neolm fast in round 1 only when the peer is fast too: per-round ratios are 1.0, 1.0, 1.2
    neo = bench.merge_rounds([round_result("neolm", i + 1, v) for i, v in enumerate([100.0, 50.0, 60.0])])
    peer = bench.merge_rounds([round_result("llamacpp", i + 1, v) for i, v in enumerate([100.0, 50.0, 50.0])])
    value, shown = report.ratio(neo, peer, "decode_tps")
    assert value == pytest.approx(1.0) and shown == "1.00 [1.00–1.20]"
    # a round missing on one side is left out, not misaligned
    peer["rounds"] = peer["rounds"][1:]
    assert report.paired(neo, peer, "decode_tps") == pytest.approx([1.0, 1.2])
    # rows measured once: the ratio of the medians
    one, other = round_result("neolm", 1, 30.0), round_result("llamacpp", 1, 20.0)
    assert report.ratio(one, other, "decode_tps") == (pytest.approx(1.5), "1.50")


def test_targets_judge_by_the_paired_ratio():
    neo = bench.merge_rounds([round_result("neolm", i + 1, v) for i, v in enumerate([100.0, 48.0, 60.0])])
    peer = bench.merge_rounds([round_result("llamacpp", i + 1, v) for i, v in enumerate([100.0, 50.0, 50.0])])
    # medians 60 vs 50 would say met; the rounds say neolm was slower in one and equal in another
    lines = report.targets({"results": [neo, peer]})
    decode = next(line for line in lines if line.startswith("| fp32 decode ≥ llama.cpp F32"))
    # (every round read the same bandwidth here: at equal bandwidth, the same ratios)
    assert decode.endswith("| 1.00 [0.96–1.20]; at equal bandwidth 1.00 [0.96–1.20] | yes |")
    neo["rounds"][0]["figures"]["decode_tps"] = 90.0  # now 0.90, 0.96, 1.20: median below 1
    lines = report.targets({"results": [neo, peer]})
    assert any(line.startswith("| fp32 decode ≥ llama.cpp F32") and line.endswith("| **no** |") for line in lines)


def test_roofline_takes_the_highest_reading_of_the_run_rows_included():
    """The start and end readings can both fall in a slow phase of a VM's memory: the reading before a row (or
    a round of it) counts too, and the fastest of all sets the roofline."""
    row = bench.merge_rounds([round_result("neolm", 1, 10.0, gbs=85.0), round_result("neolm", 2, 20.0, gbs=40.0)])
    single = dict(round_result("llamacpp", 1, 12.0, gbs=70.0), bandwidth_before={"read_gbs": 70.0})
    doc = {"bandwidth_start": {"read_gbs": 35.0}, "bandwidth_end": {"read_gbs": 50.0}, "results": [row, single]}
    assert report.read_bandwidth(doc) == 85.0
    assert report.read_bandwidth({"bandwidth_start": {"read_gbs": 35.0}, "results": [single]}) == 70.0


def test_roofline_of_the_rows_own_time():
    """Each round's decode rate against the higher of the readings just before and after it; median over rounds."""
    rounds = [round_result("neolm", 1, 80.0, gbs=40.0), round_result("neolm", 2, 160.0, gbs=85.0),
              round_result("neolm", 3, 150.0, gbs=60.0)]  # fmt: skip
    for r, after in zip(rounds, (50.0, 80.0, 90.0)):
        r["bandwidth_after"] = {"read_gbs": after}
    row = bench.merge_rounds(rounds)
    row["info"] = {"stream_bytes": 0.5e9}  # 0.5 GB a token: 100 tok/s at 50 GB/s
    doc = {"bandwidth_start": {"read_gbs": 35.0}, "results": [row]}
    assert report.read_bandwidth(doc) == 90.0  # after-readings count for the run's best too
    assert report.roofline_then(row, doc) == pytest.approx(statistics.median([80 / 100, 160 / 170, 150 / 180]))
    assert report.roofline(row, doc) == pytest.approx(150 / 180)  # the pooled median at the run's best
    del row["rounds"]
    row["bandwidth_before"] = {"read_gbs": 60.0}  # a row without rounds: its own readings
    assert report.roofline_then(row, doc) == pytest.approx(150 / 120)
    row["info"] = {}  # no byte count (a peer without one): no roofline, no error
    assert report.roofline_then(row, {"results": [row]}) is None


def test_ratio_at_equal_bandwidth():
    """A memory-bound figure over its round's bandwidth, paired round by round: the engine that met the slower
    phase is not taken for the slower engine."""
    mine = [round_result("neolm", 1, 60.0, gbs=40.0), round_result("neolm", 2, 120.0, gbs=80.0)]
    peer = [round_result("llamacpp", 1, 110.0, gbs=80.0), round_result("llamacpp", 2, 100.0, gbs=80.0)]
    for r in mine + peer:
        r["bandwidth_after"] = dict(r["bandwidth_before"])
    n, p = bench.merge_rounds(mine), bench.merge_rounds(peer)
    assert report.paired(n, p, "decode_tps") == pytest.approx([60 / 110, 120 / 100])
    assert report.paired(n, p, "decode_tps", per_bandwidth=True) == pytest.approx([(60 / 40) / (110 / 80), (120 / 80) / (100 / 80)])
    n["rounds"][0]["bandwidth_before"] = n["rounds"][0]["bandwidth_after"] = None  # a round without readings
    assert report.paired(n, p, "decode_tps", per_bandwidth=True) == pytest.approx([(120 / 80) / (100 / 80)])


def test_worker_serves_decodes_on_request(tiny_checkpoints):
    """bench/duel.py's side of worker.py: load and warm up once, then one timed decode per "single" line."""
    import json
    import os
    import subprocess

    folder = tiny_checkpoints[next(iter(tiny_checkpoints))][1]
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(BENCH / "engines" / "worker.py"), "--serve", "--engine", "neolm", "--model-dir",
           str(folder), "--precision", "fp32", "--threads", "1", "--new-tokens", "8"]  # fmt: skip
    out = subprocess.run(cmd, input="single\nsingle\nquit\n", capture_output=True, text=True, env=env,
                         cwd=BENCH / "engines", timeout=300, check=True).stdout.splitlines()  # fmt: skip
    answers = [json.loads(line) for line in out]
    assert answers[0]["ready"] and answers[0]["info"]["neolm"]
    assert len(answers) == 3 and all(a["decode_tps"] > 0 for a in answers[1:])


def test_worker_reads_the_engines_files_before_timing_the_load(tiny_checkpoints, tmp_path):
    """worker.py reads the files the engine will load (Engine.files) before the first timed load, so that
    load_s is a warm-cache figure whichever engine ran first; a measured run records the bytes read."""
    import json
    import os
    import subprocess

    folder = tiny_checkpoints[next(iter(tiny_checkpoints))][1]
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent), OMP_NUM_THREADS="1")
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(BENCH / "engines" / "worker.py"), "--engine", "neolm", "--variant", "mmap",
           "--model-dir", str(folder), "--precision", "fp32", "--threads", "1", "--runs", "1", "--new-tokens", "4",
           "--figures", "single,load", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=BENCH / "engines", timeout=300, check=True)
    result = json.loads(out.read_text())
    assert result["status"] == "ok", result.get("reason")
    assert result["warmed_bytes"] == sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert result["figures"]["load_s"][0] > 0 and result["figures"]["decode_tps"][0] > 0
