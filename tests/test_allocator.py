"""slaknet.train.machine.keep_freed_memory: glibc tuned once per process, opt-out by SLAKNET_MALLOC=default."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from slaknet.train.machine import keep_freed_memory as k; print(k(), k())"


def _run(**env: str) -> str:
    e = dict(os.environ, **env)
    src = os.path.join(os.path.dirname(__file__), os.pardir, "src")
    e["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-c", CODE], env=e, capture_output=True, text=True, timeout=120,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_once_and_opt_out():
    assert _run() == "True True"
    assert _run(SLAKNET_MALLOC="default") == "False False"
