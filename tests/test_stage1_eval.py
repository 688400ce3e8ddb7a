"""bench/stage1_eval.py's arithmetic, on made-up accuracies: the paired differences and their 95 % intervals (against
scipy's paired t-test), the −2-point verdict of the table, and --merge writing its three files from worker parts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "stage1_eval.py"


@pytest.fixture(scope="module")
def s1e():
    spec = importlib.util.spec_from_file_location("stage1_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXACT = [80.0, 84.0, 82.5, 79.0, 85.5, 83.0]
GOOD = [81.0, 83.5, 83.0, 80.5, 85.0, 84.0]  # within a point of the exact run, seed by seed
BAD = [77.0, 79.5, 80.5, 75.0, 83.0, 78.5]  # 2 to 5 points under it


def part(seeds: range) -> dict:
    """A worker's file: official recipe, exact / ddim 25 / dpmpp 15 under both protocols (hard shifted by -1)."""
    evals, sets = {}, {}
    for s in seeds:
        for name, acc in (("exact", EXACT), ("ddim 25", GOOD), ("dpmpp 15", BAD)):
            for p, shift in (("soft", 0.0), ("hard", -1.0)):
                evals[f"official|{name}|{p}|{s}"] = {"top1": acc[s] + shift, "seconds": 1.0}
            sets[f"official|{name}|{s}"] = {"candidate_accuracy": 0.9, "stage1_dit_forwards_per_class":
                                            {"exact": 4000, "ddim 25": 2000, "dpmpp 15": 1200}[name]}
    return {"evals": evals, "sets": sets}


def test_the_paired_interval_is_scipys_paired_t_interval(s1e):
    from scipy.stats import ttest_rel

    results = part(range(6))
    s1e.summarise(results)
    for name, acc in (("ddim 25", GOOD), ("dpmpp 15", BAD)):
        e = results["paired"][f"official|{name}|soft"]
        want = ttest_rel(acc, EXACT).confidence_interval(0.95)
        assert e["n"] == 6 and e["mean"] == pytest.approx(sum(acc) / 6 - sum(EXACT) / 6)
        assert e["ci95"] == pytest.approx([want.low, want.high])
    table = s1e.table_md(results)
    rows = {line.split("|")[2].strip(): line for line in table.splitlines()[2:]}
    assert rows["ddim 25"].rstrip(" |").endswith("yes") and rows["dpmpp 15"].rstrip(" |").endswith("no")
    assert "| 50 % |" in rows["ddim 25"] and "| 70 % |" in rows["dpmpp 15"]  # DiT work saved, from the sets
    assert results["imagenet_ipc10"]["ddim 25"]["minutes_at_peak"] < results["imagenet_ipc10"]["exact"][
        "minutes_at_peak"]


def test_merge_joins_worker_parts_into_one_table(s1e, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(part(range(0, 6, 2))))
    b.write_text(json.dumps(part(range(1, 6, 2))))
    out = tmp_path / "merged.json"
    assert s1e.main(["--merge", str(a), str(b), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["paired"]["official|ddim 25|hard"]["n"] == 6
    assert out.with_suffix(".png").stat().st_size > 0 and "| official | ddim 25 |" in out.with_suffix(".md").read_text()
    assert "official|dpmpp 15|soft:" in capsys.readouterr().out
