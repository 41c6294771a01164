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


def _imported_modules(*argv: str) -> set:
    """Top-level modules a `python -m slaknet ARGV` process imports (from -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "slaknet", *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_help_never_imports_torch():
    # torch + timm take seconds to import; help text must not need them (top level and every command)
    from slaknet.cli import COMMANDS

    for argv in ([], *[[name] for name in COMMANDS]):
        mods = _imported_modules(*argv, "--help")
        assert "torch" not in mods and "timm" not in mods, argv


def test_options_are_not_abbreviated(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["info", "slak_pico", "--input", "64"])  # --input-size exists; a prefix must not be taken for it
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --input 64" in err
    assert err.startswith("usage: slaknet info")  # the sub-command's usage, not the top-level one


def test_debug_keeps_exit_code_and_adds_traceback(capsys, monkeypatch):
    monkeypatch.setenv("SLAKNET_DEBUG", "1")
    assert main(["info", "slak_tinyy"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "slaknet info: error: unknown model" in err
