"""The serving benchmark, run as a user runs it (`pdserve bench`), on a tiny model for a few
seconds (so that it cannot rot): every request of every phase completes on both sides, and it
writes its JSON and plots. `benchmarks/serving.py`, its front in a checkout, answers too."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_serving_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "serving.json"
    result = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "bench", "--model", "dummy:tiny", "--rates", "8",
         "--burst", "6", "--num-requests", "6", "--input-len", "16:64", "--output-len", "8",
         "--num-kv-blocks", "128", "--router-args=--disaggregation always", "--out", str(out),
         "--plots", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [p["phase"] for p in report["phases"]] == ["8/s", "burst 6"]
    for phase in report["phases"]:
        for side in ("cluster", "engine"):
            row = phase[side]
            assert row["num_ok"] == row["num_requests"] == 6 and not row["errors"], (phase["phase"], side, row)
            assert row["ttft_ms"]["p50"] > 0 and row["output_tok_s"] > 0
        assert phase["cluster"]["num_prefilled_twice"] == 0
        assert phase["cluster"]["kv_bytes_per_request"] > 0  # every prompt's KV moved, and was counted
        assert phase["cluster"]["kv_tail_s_mean"] > 0  # and the prefill nodes timed its tail
    assert (tmp_path / "serving_latency.png").stat().st_size > 0
    assert (tmp_path / "serving_goodput.png").stat().st_size > 0
    assert "ratio" in result.stdout  # the table, cluster against engine


def test_the_checkout_front_takes_the_same_flags():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: pdserve bench" in result.stdout and "--rates" in result.stdout


def test_the_mix_workload_holds_a_third_of_each_kind_with_chat_turns_in_order():
    from pdserve.bench.serving_load import make_workload
    w = make_workload("mix", 1000, 30, (64, 128), 8, 0, seed=3, num_turns=5, turn_len=16)
    turns = [i for i, a in enumerate(w.after) if a is not None]
    assert all(w.after[i] < i for i in turns)  # a turn is sent after the one it follows
    firsts = {i for i, a in enumerate(w.after) if a is None and i in set(w.after)}
    assert len(turns) + len(firsts) == 10  # 2 chats of 5 turns: a third
    singles = [len(p) for i, p in enumerate(w.prompts) if w.after[i] is None and i not in firsts]
    assert sum(n <= 32 for n in singles) == 10 and sum(n >= 256 for n in singles) == 10
