"""`make demo`'s entry point end to end: the real reward node, the default bundle, the committed demo bags.

Runs `python -m robometer_ros.demo` as `make demo` does (on its own private ROS graph) and checks that the
outputs exist and parse: one PNG per episode, steps.csv, summary.json and the outputs bag.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_and_writes_its_outputs(tmp_path: Path) -> None:
    out = tmp_path / "demo_out"
    result = subprocess.run(
        [sys.executable, "-m", "robometer_ros.demo", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, f"demo failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    bags = sorted(p.name for p in (REPO / "demo_bags").iterdir() if (p / "metadata.yaml").is_file())
    assert "== summary" in result.stdout
    assert "the node's verdict was right on" in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert [episode["bag"] for episode in summary["episodes"]] == bags
    for episode in summary["episodes"]:
        assert episode["steps"] >= 1
        assert 0.0 <= episode["final_progress"] <= 1.0
        assert 0.0 <= episode["final_success_probability"] <= 1.0
        assert episode["model_id"].startswith("robometer-metaworld-demo")
        assert episode["truth"] in ("successful", "suboptimal", "failure")
        # the verdict follows the flags, and is judged against the simulator's label
        assert episode["verdict"] == ("failure" if episode["failure_flags"] else "success")
        assert episode["verdict_right"] == (episode["verdict"] == ("failure" if episode["truth"] == "failure"
                                                                   else "success"))
        png = out / f"{episode['bag']}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "steps.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert {row["bag"] for row in rows} == set(bags)
    assert all(0.0 <= float(row["progress"]) <= 1.0 for row in rows)

    from rosbags.rosbag2 import Reader

    from robometer_ros.recorder import make_typestore

    store = make_typestore()
    counts: dict[str, int] = {}
    with Reader(out / "outputs_bag") as reader:
        for connection, _, raw in reader.messages():
            message = store.deserialize_cdr(raw, connection.msgtype)
            counts[connection.topic] = counts.get(connection.topic, 0) + 1
            if connection.msgtype.endswith("StepReward"):
                assert 0.0 <= message.progress <= 1.0
    assert counts.get("/reward_node/step_reward", 0) == len(rows)
    assert counts.get("/reward_node/episode", 0) >= len(bags)
