"""A shorter profile of scripts/benchmarks/soak.py (10 minutes there, LLMSERVE_SOAK_SECONDS here,
60 s by default): mixed load with auth, limits and the sidecar, then the books and the leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A leak of one kilobyte per request at this load would grow RSS by several MB a minute.
MAX_RSS_MB_PER_MINUTE = 5.0


@pytest.mark.slow
def test_mixed_load_leaks_nothing_and_loses_nothing(tmp_path: Path):
    seconds = float(os.environ.get("LLMSERVE_SOAK_SECONDS", "60"))
    report_path = tmp_path / "soak.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmarks" / "soak.py"),
            *("--seconds", str(seconds), "--sample-seconds", "3", "--json", str(report_path)),
        ],
        cwd=ROOT,
        check=True,
        timeout=seconds + 120,
    )
    report = json.loads(report_path.read_text())
    print(json.dumps(report, indent=2))
    assert report["failure_count"] == 0, report["failures"]
    assert {"200", "400", "401", "429"} <= set(report["statuses"])
    assert report["requests_logged"] == report["requests"]
    assert report["events_lost"] == 0
    for name, process in report["processes"].items():
        assert process["fds_idle_after"] <= process["fds_idle_before"] + 1, name
        assert process["rss_mb_per_minute_second_half"] < MAX_RSS_MB_PER_MINUTE, name
