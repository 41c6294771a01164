import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# auto's per-machine answers (slaknet.layers.autotune) go to a folder of this test session, shared with the
# processes it starts (they inherit the variable), not to the user's ~/.cache
if not os.environ.get("SLAKNET_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="slaknet-test-cache-")
    os.environ["SLAKNET_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
# no timing of backends in the suite (results never depend on it; a timed question costs seconds per process):
# auto answers by its built-in rules, the same in every test process; tests/test_autotune.py times explicitly
os.environ.setdefault("SLAKNET_AUTOTUNE_BUDGET", "0")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def official_shapes():
    with open(DATA / "official_state_dict_shapes.json") as f:
        return json.load(f)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 2 - 1)


@pytest.fixture()
def one_thread():
    """torch on one thread for the test (the CI machine is shared: two OpenMP threads competing with other
    processes are many times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def subprocess_env() -> dict:
    """Environment for a `python -m slaknet` child: this checkout's src first, one OpenMP thread."""
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


_KILL_SCRIPT = """
import os, signal, sys
from slaknet.train.trainer import Callback, Trainer
argv = sys.argv[1:]
{build}

class Kill(Callback):
    def on_step_end(self, trainer, loss):
        if trainer.state.step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)

Trainer(cfg, callbacks=[Kill()]).fit()
"""


def run_killed_at_step(build: str, argv: list, step: int):
    """Train in a child process that SIGKILLs itself right after optimizer step ``step`` (the production loop
    has no kill switch). ``build`` is Python source that sets ``cfg`` (a TrainConfig) from ``argv``."""
    import subprocess
    import sys

    script = _KILL_SCRIPT.format(build=build, step=int(step))
    return subprocess.run([sys.executable, "-c", script, *argv], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


def run_torchrun(argv: list, nproc: int = 2):
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m slaknet ARGV`` on gloo (CPU)."""
    import subprocess
    import sys

    env = subprocess_env()
    env["MASTER_ADDR"] = "127.0.0.1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "slaknet", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
