"""`mom.cli.common`: output piped into a reader that stops early is not an error."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A command body printing 1 MB, far more than a pipe buffers: its reader (`true`) exits without reading any of it.
BODY = ("import sys\nfrom mom.cli.common import run\n"
        "sys.exit(run('mom-x', lambda: [print('x' * 999) for _ in range(1000)]))")


def test_a_closed_pipe_is_not_reported():
    command = f"{sys.executable} -c \"$BODY\" | true"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "BODY": BODY})
    assert result.stderr == "" and result.returncode == 0, result
