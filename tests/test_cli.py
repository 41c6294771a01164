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
    assert err.startswith("slaknet info: error:") and err.count("\n") == 1  # one line, the sub-command's name


def test_debug_keeps_exit_code_and_adds_traceback(capsys, monkeypatch):
    monkeypatch.setenv("SLAKNET_DEBUG", "1")
    assert main(["info", "slak_tinyy"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "slaknet info: error: unknown model" in err


# option strings that may be declared by more than one literal add_argument call, with the reason; every option
# that several commands share is a field of slaknet.settings (CommonOptions or a section), added with add_setting
SHARED_LITERAL_OPTIONS: dict = {}


def test_each_option_string_is_declared_in_one_place():
    """One flag name per idea: no literal option string in two add_argument calls (the shared ones come from
    slaknet.settings)."""
    import ast
    import collections
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "src" / "slaknet"
    declared = collections.defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                for a in node.args:
                    if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("-"):
                        declared[a.value].append(f"{path.relative_to(root)}:{node.lineno}")
    assert declared, "no add_argument calls found"
    repeated = {k: v for k, v in declared.items() if len(v) > 1 and k not in SHARED_LITERAL_OPTIONS}
    assert not repeated, "\n".join(f"{k}: {', '.join(v)}" for k, v in sorted(repeated.items()))


def _parse(command, *argv):
    from slaknet.cli import build_command_parser

    return build_command_parser(command).parse_args(list(argv))


def test_old_flag_spellings_are_still_accepted():
    """The names before the settings layer keep working (not listed in --help)."""
    ns = _parse("erf", "slak_pico", "--out", "d", "--size", "64")
    assert (ns.output_dir, ns.input_size) == ("d", 64)
    assert _parse("kernels", "c.pth", "--out", "d").output_dir == "d"
    assert _parse("study", "--out", "d").output_dir == "d"
    ns = _parse("export", "--output", "m.onnx", "--reparameterize", "dense", "--size", "32")
    assert (ns.output_file, ns.reparam, ns.input_size) == ("m.onnx", "dense", [32])
    assert _parse("convert", "a.pth", "b.safetensors", "--reparameterize", "strips").reparam == "strips"
    ns = _parse("segment", "export", "--checkpoint", "c.pth", "--output", "s.onnx")  # --output-file is required
    assert ns.output_file == "s.onnx"
    assert _parse("detect", "predict", "x.png", "--checkpoint", "c.pth", "--output", "p").output_dir == "p"
    assert _parse("segment", "predict", "--checkpoint", "c.pth", "--out", "p").output_dir == "p"
    ns = _parse("bench", "--size", "64", "--json", "r.json")
    assert (ns.size, ns.json) == (64, "r.json")
    ns = _parse("eval", "--resume", "c.pth", "--data_path", "d", "--input_size", "32")
    assert (ns.checkpoint, ns.data, ns.input_size) == ("c.pth", "d", 32)
    for command, argv in (("erf", ["m"]), ("export", []), ("study", []), ("bench", [])):
        from slaknet.cli import build_command_parser

        text = build_command_parser(command).format_help()
        assert "--out " not in text and "--size " not in text and "--reparameterize" not in text, command


def test_new_flag_names():
    ns = _parse("eval", "--checkpoint", "c.pth", "--reparam", "--no-ema", "--threads", "1", "-b", "8", "-j", "0")
    assert (ns.reparam, ns.ema, ns.threads, ns.batch_size, ns.num_workers) == ("strips", False, "1", 8, 0)
    assert _parse("eval", "--checkpoint", "c.pth").reparam == "none"
    ns = _parse("predict", "--json", "--ema", "a.png", "b.png", "--checkpoint", "c.pth", "--threads", "auto")
    assert (ns.json, ns.ema, ns.images, ns.threads) == (True, True, ["a.png", "b.png"], "auto")
    ns = _parse("info", "--json", "slak_pico")  # a switch: the model name is not taken for its value
    assert (ns.json, ns.model) == (True, "slak_pico")
    ns = _parse("export", "-o", "m.onnx", "--input-size", "32", "48", "--format", "torchscript")
    assert (ns.output_file, ns.input_size, ns.fmt, ns.reparam) == ("m.onnx", [32, 48], "torchscript", "strips")
    assert _parse("segment", "export", "--checkpoint", "c", "-o", "s.onnx", "--input-size", "64", "32").input_size \
        == [64, 32]
    assert _parse("study", "-o", "d", "--threads", "2").threads == "2"
