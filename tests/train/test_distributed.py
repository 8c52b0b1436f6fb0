"""The process group's lifetime (`mom.train.distributed`)."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_process_group_is_left_at_exit():
    # atexit runs its handlers last-registered first: this one, registered before setup, sees the group after the
    # teardown setup registered (NCCL warns at exit about a group never destroyed)
    script = textwrap.dedent("""
        import atexit
        import torch
        atexit.register(lambda: print("at exit, joined:", torch.distributed.is_initialized()))
        from mom.train import distributed
        from mom.train.recipe import DeepSpeedConfig, TrainConfig
        distributed.setup(TrainConfig(device="cpu"), DeepSpeedConfig())
        print("after setup, joined:", torch.distributed.is_initialized())
    """)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["after setup, joined: True", "at exit, joined: False"]
