"""The `slaknet` command: dispatch, info output, one-line errors."""
import json
import subprocess
import sys

from slaknet.cli import main


def test_info_json(capsys):
    assert main(["info", "slak_pico", "--input-size", "64", "--sparsity", "0.4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["params"] == 1414056
    assert out["at_sparsity"]["params_nonzero"] < out["counts"]["params"]
    assert "kernels 31/29/27/13" in out["architecture"]


def test_info_table(capsys):
    assert main(["info", "slak_pico_k7", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "parameters (dense)" in out and "MACs dense" in out


def test_user_errors_are_one_line(capsys, tmp_path):
    assert main(["info", "slak_tinyy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slaknet info: error: unknown model") and "\n" not in err
    assert main(["info", "slak_pico", "--sparsity", "1.5"]) == 2
    assert "--sparsity" in capsys.readouterr().err
    assert main(["info", "slak_pico", "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert "not found" in capsys.readouterr().err


def test_console_entry_point_module():
    proc = subprocess.run([sys.executable, "-m", "slaknet", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "info" in proc.stdout
