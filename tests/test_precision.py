"""``--precision auto``: bf16 autocast only on CPUs with bf16 matrix units (AMX), fp32 elsewhere."""
import torch

from slaknet.train import machine


def test_auto_precision_follows_the_matrix_units(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(machine, "cpu_has_bf16_matrix_units", lambda: True)
    assert machine.autocast_dtype("auto", cpu) is torch.bfloat16
    assert machine.autocast_dtype("auto", cuda) is None  # GPUs: fp32 until parity is measured there
    monkeypatch.setattr(machine, "cpu_has_bf16_matrix_units", lambda: False)
    assert machine.autocast_dtype("auto", cpu) is None
    # the explicit settings are unchanged
    assert machine.autocast_dtype("bf16", cpu) is torch.bfloat16 and machine.autocast_dtype("fp32", cpu) is None
    assert machine.autocast_dtype("amp", cuda) is torch.float16


def test_matrix_unit_probe_matches_cpuinfo():
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return
    assert machine.cpu_has_bf16_matrix_units() == ("amx_tile" in flags)


def test_train_accepts_precision_auto(capsys):
    from slaknet.cli import main

    assert main(["train", "--precision", "auto", "--print-config"]) == 0
    assert "precision: auto" in capsys.readouterr().out
