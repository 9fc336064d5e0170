"""Restart drill (reduced): torchrun --max-restarts, a rank SIGKILLed at random moments, bit-identical result.

The full drill (10 kills in a row) is `python tools/restart_drill.py`; its figures are in the README.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_killed_ranks_resume_bit_identically(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "restart_drill.py"), "--kills", "2",
                          "--iters", "8", "--max-delay", "8", "--seed", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=420, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {**res, "kills": 2, "exit_code": 0, "losses_identical": True, "weights_identical": True}, \
        (res, out.stderr[-2000:])
