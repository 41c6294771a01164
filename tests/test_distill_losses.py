"""Distillation losses vs independent float64 references, option parsing, and the teacher-output cache."""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.distill.args import parse_distill_type, resolve_distill_config
from slaknet.distill.cache import (TeacherCache, TeacherCacheError, TeacherCacheWriter, WithIndex,
                                   dataset_identity, teacher_identity)
from slaknet.distill.losses import (LOGIT_LOSSES, DistillCriterion, FeatureDistillLoss, KDLoss, LogitDistillLoss,
                                    NKDLoss, as_nchw, build_distill_loss, register_loss)
from slaknet.errors import ConfigError

# ---------------------------------------------------------------- float64 references (plain loops)


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    z = sum(e)
    return [x / z for x in e]


def ref_ce(s, y):
    """Mean over rows of -sum_k q_k log softmax(s)_k, y an index or a probability row."""
    total = 0.0
    for row, lab in zip(s, y):
        p = _softmax(row)
        q = [1.0 if k == lab else 0.0 for k in range(len(row))] if np.ndim(lab) == 0 else lab
        total += -sum(qk * math.log(pk) for qk, pk in zip(q, p) if qk > 0)
    return total / len(s)


def ref_kd(s, t, y, alpha, T):
    kl = 0.0
    for rs, rt in zip(s, t):
        ps, pt = _softmax([x / T for x in rs]), _softmax([x / T for x in rt])
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps) if a > 0)
    return kl / len(s) * T * T * alpha + (1 - alpha) * ref_ce(s, y)


def ref_nkd(s, t, y, T, alpha):
    """The research formula: -1000 at the target, softmax at T, divide by (1 - q[y]), skip the target."""
    n = len(s)
    term, dist = 0.0, 0.0
    for rs, rt, lab in zip(s, t, y):
        lab = int(np.argmax(lab)) if np.ndim(lab) else int(lab)
        term += -_softmax(rt)[lab] * math.log(_softmax(rs)[lab])
        ms = [x - 1000.0 * (k == lab) for k, x in enumerate(rs)]
        mt = [x - 1000.0 * (k == lab) for k, x in enumerate(rt)]
        qs, qt = _softmax([x / T for x in ms]), _softmax([x / T for x in mt])
        dist += sum(qt[k] / (1 - qt[lab]) * math.log(qs[k] / (1 - qs[lab])) for k in range(len(rs)) if k != lab)
    return term / n - alpha * T * T * dist / n


S = [[2.0, -1.0, 0.5, 3.0, 0.0], [0.1, 0.2, -0.3, 1.5, -2.0], [-1.0, 4.0, 0.0, 0.3, 0.7]]
TT = [[1.0, 0.0, 2.5, 2.0, -1.0], [3.0, -0.5, 0.0, 0.5, 0.2], [0.0, 2.0, 1.0, -1.0, 0.0]]
Y = [3, 0, 1]


def _t(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("alpha,T", [(0.1, 1.0), (0.1, 3.0), (0.5, 4.0), (1.0, 1.0), (0.0, 2.0)])
def test_kd_matches_reference(alpha, T):
    got = KDLoss(alpha=alpha, T=T)(_t(S), _t(TT), torch.tensor(Y))
    assert got.item() == pytest.approx(ref_kd(S, TT, Y, alpha, T), rel=1e-6, abs=1e-7)


def test_kd_soft_targets_and_hard_variant():
    soft = [[0.0, 0.1, 0.0, 0.9, 0.0], [0.6, 0.0, 0.4, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]]
    got = KDLoss(alpha=0.3, T=2.0)(_t(S), _t(TT), _t(soft))
    assert got.item() == pytest.approx(ref_kd(S, TT, soft, 0.3, 2.0), rel=1e-6)
    t_arg = [int(np.argmax(r)) for r in TT]
    want = 0.5 * ref_ce(S, Y) + 0.5 * ref_ce(S, t_arg)
    assert KDLoss(hard=True)(_t(S), _t(TT), torch.tensor(Y)).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("T,alpha", [(1.0, 1.0), (3.0, 1.0), (2.0, 0.5)])
def test_nkd_matches_research_formula(T, alpha):
    got = NKDLoss(T=T, alpha=alpha)(_t(S), _t(TT), torch.tensor(Y))
    assert got.item() == pytest.approx(ref_nkd(S, TT, Y, T, alpha), rel=1e-6, abs=1e-7)


def test_nkd_soft_labels_use_argmax():
    soft = [[0.0, 0.1, 0.0, 0.9, 0.0], [0.1, 0.0, 0.4, 0.5, 0.0], [0.3, 0.2, 0.0, 0.0, 0.5]]
    got = NKDLoss(T=3.0)(_t(S), _t(TT), _t(soft))
    assert got.item() == pytest.approx(ref_nkd(S, TT, soft, 3.0, 1.0), rel=1e-6)
    # and it differs from using the (wrong) original hard labels, so the argmax matters
    assert abs(got.item() - ref_nkd(S, TT, Y, 3.0, 1.0)) > 1e-3


def test_nkd_two_classes_non_target_term_vanishes():
    s, t = [[0.3, -0.2], [1.0, 2.0]], [[2.0, 0.0], [0.0, 1.0]]
    want = sum(-_softmax(rt)[y] * math.log(_softmax(rs)[y]) for rs, rt, y in zip(s, t, [0, 1])) / 2
    assert NKDLoss(T=3.0)(_t(s), _t(t), torch.tensor([0, 1])).item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("loss", [KDLoss(T=1.0), KDLoss(T=4.0), KDLoss(hard=True), NKDLoss(), NKDLoss(T=3.0)])
def test_saturated_probabilities_stay_finite(loss):
    # teacher one-hot (target prob 1 in float32), student sure of a wrong class (target prob underflows)
    s = torch.tensor([[-1e4, 0.0, 1e4, 0.0], [50.0, 0.0, 0.0, -50.0]], requires_grad=True)
    t = torch.tensor([[1e4, 0.0, -1e4, 0.0], [1e4, 0.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    out = loss(s, t, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_teacher_probability_one_matches_ce():
    # a one-hot teacher at T=1: KL = CE(student, argmax) - 0, so KD(alpha=1) equals CE
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 1e4, 0.0]])
    got = KDLoss(alpha=1.0, T=1.0)(s, t, torch.tensor([0]))
    assert got.item() == pytest.approx(ref_ce([[1.0, 2.0, 0.5]], [1]), rel=1e-6)
    # NKD with p_t[y] = 1: target term -log p_s[y]; non-target term over the other classes only (teacher
    # uniform over logits (0, 0), student softmax over (1.0, 0.5)). The research "-1000 then divide by
    # 1 - q[y]" gives 0/0 here (a 1e4 margin survives -1000); excluding the target class does not.
    got = NKDLoss()(s, t, torch.tensor([1]))
    q_s = _softmax([1.0, 0.5])
    want = -math.log(_softmax([1.0, 2.0, 0.5])[1]) - (0.5 * math.log(q_s[0]) + 0.5 * math.log(q_s[1]))
    assert torch.isfinite(got) and got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["KD", "NKD", "KD+FD", "NKD+FD"])
def test_autocast_cpu_no_nan(dtype, kind):
    torch.manual_seed(0)
    head, t_head = nn.Linear(16, 100), nn.Linear(16, 100)
    s_feat, t_feat = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 12, 3, stride=2, padding=1)
    crit = build_distill_loss({"distill_type": kind, "distill_T": 4.0, "nkd_T": 3.0},
                              student_channels=8, teacher_channels=12)
    x, img, y = torch.randn(6, 16) * 30, torch.randn(6, 3, 8, 8), torch.randint(0, 100, (6,))
    try:
        with torch.autocast("cpu", dtype=dtype):
            s, t = head(x), t_head(x)
            fs, ft = s_feat(img), t_feat(img)
            loss = crit(s, y, t, fs, ft)
    except RuntimeError as exc:  # pragma: no cover - a torch build without CPU fp16 autocast
        pytest.skip(f"autocast {dtype} on CPU unavailable: {exc}")
    assert s.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for m in (head, s_feat, crit) for p in m.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- feature distillation


def _ref_smooth_l1(a, b, beta):
    d = np.abs(a - b)
    return float(np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean())


def _ref_layernorm(t):
    out = np.empty_like(t)
    for i in range(t.shape[0]):
        v = t[i]
        out[i] = (v - v.mean()) / np.sqrt(v.var() + 1e-5)
    return out


def test_fd_same_shape_smooth_l1_and_mse():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 4, 3, 3, generator=g) * 3, torch.randn(2, 4, 3, 3, generator=g) * 3
    loss = FeatureDistillLoss(4, 4)
    assert loss.proj is None
    assert loss(fs, ft).item() == pytest.approx(_ref_smooth_l1(fs.numpy(), ft.numpy(), 2.0), rel=1e-5)
    mse = FeatureDistillLoss(4, 4, loss_type="MSE")(fs, ft).item()
    assert mse == pytest.approx(float(((fs.numpy() - ft.numpy()) ** 2).mean()), rel=1e-5)


def test_fd_projection_channels_by_hand():
    loss = FeatureDistillLoss(3, 5)
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    w = loss.proj.weight.detach().numpy()[:, :, 0, 0]
    b = loss.proj.bias.detach().numpy()
    proj = np.einsum("oc,nchw->nohw", w, fs.numpy()) + b[None, :, None, None]
    assert loss(fs, ft).item() == pytest.approx(_ref_smooth_l1(proj, ft.numpy(), 2.0), rel=1e-5)


@pytest.mark.parametrize("s_hw,t_hw", [((7, 7), (14, 14)), ((14, 14), (7, 7)), ((8, 6), (4, 3))])
def test_fd_resolution_and_channels_differ(s_hw, t_hw):
    torch.manual_seed(0)
    loss = FeatureDistillLoss(6, 10, target_lnorm=True)
    fs, ft = torch.randn(2, 6, *s_hw, requires_grad=True), torch.randn(2, 10, *t_hw) * 4 + 1
    # reference: always project first at the student's resolution, then resize (plain torch), LN by numpy
    ref_s = F.interpolate(F.conv2d(fs, loss.proj.weight, loss.proj.bias), size=t_hw, mode="bilinear",
                          align_corners=False)
    want = _ref_smooth_l1(ref_s.detach().numpy(), _ref_layernorm(ft.numpy()), 2.0)
    got = loss(fs, ft)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert torch.isfinite(fs.grad).all() and loss.proj.weight.grad is not None


def test_fd_bad_shapes_and_layouts():
    with pytest.raises(ConfigError):
        FeatureDistillLoss(4, 8)(torch.randn(1, 5, 2, 2), torch.randn(1, 8, 2, 2))
    with pytest.raises(ConfigError):
        FeatureDistillLoss(4, 4, loss_type="L1")
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(as_nchw(x.permute(0, 2, 3, 1), "NHWC"), x)
    tokens = torch.randn(2, 9, 6)
    assert torch.equal(as_nchw(tokens, "NLC")[:, :, 1, 2], tokens[:, 5, :])
    with pytest.raises(ConfigError):
        as_nchw(torch.randn(2, 10, 6), "NLC")


# ---------------------------------------------------------------- combination, registry, options


def test_criterion_combines_like_the_research_step():
    s, t, y = _t(S, grad=True), _t(TT), torch.tensor(Y)
    fs, ft = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    fd = _ref_smooth_l1(fs.numpy(), ft.numpy(), 2.0)
    crit = build_distill_loss({"distill_type": "NKDFD", "lr_fd": 0.5}, student_channels=4, teacher_channels=4)
    terms = crit.terms(s, y, t, fs, ft)
    assert terms["loss"].item() == pytest.approx(ref_nkd(S, TT, Y, 1.0, 1.0) + 0.5 * fd, rel=1e-6)
    # FD alone: the trainer's base criterion + lr_fd * FD
    crit = build_distill_loss({"distill_type": "FD"}, base_criterion=nn.CrossEntropyLoss(),
                              student_channels=4, teacher_channels=4)
    assert not crit.needs_teacher_logits and crit.needs_features
    assert crit(s, y, None, fs, ft).item() == pytest.approx(ref_ce(S, Y) + fd, rel=1e-6)
    with pytest.raises(ConfigError):
        build_distill_loss({"distill_type": "None"})  # no base criterion
    with pytest.raises(ConfigError):
        build_distill_loss({"distill_type": "KD+FD"})  # no channels


def test_registry_accepts_a_new_small_loss():
    @register_loss("MAXT")
    class MaxTeacher(LogitDistillLoss):
        @classmethod
        def from_config(cls, cfg):
            return cls()

        def forward(self, s, t, target):
            return F.cross_entropy(s, t.argmax(1))

    try:
        crit = build_distill_loss({"distill_type": "MAXT"})
        assert isinstance(crit.logit_loss, MaxTeacher)
        want = ref_ce(S, [int(np.argmax(r)) for r in TT])
        assert crit(_t(S), torch.tensor(Y), _t(TT)).item() == pytest.approx(want, rel=1e-6)
    finally:
        LOGIT_LOSSES.pop("MAXT")


@pytest.mark.parametrize("text,want", [("KD", ("KD", None)), ("NKD", ("NKD", None)), ("None", (None, None)),
                                       ("FD", (None, "FD")), ("KDFD", ("KD", "FD")), ("nkd+fd", ("NKD", "FD")),
                                       ("NKD_FD", ("NKD", "FD")), ("FD-KD", ("KD", "FD"))])
def test_parse_distill_type(text, want):
    assert parse_distill_type(text) == want


@pytest.mark.parametrize("text", ["MGD", "KD+NKD", "FDFD", "XKD"])
def test_parse_distill_type_rejects(text):
    with pytest.raises(ConfigError):
        parse_distill_type(text)


def _distill_options(argv):
    import dataclasses

    from slaknet.train.config import config_from_argv

    return resolve_distill_config(dataclasses.asdict(config_from_argv(["--teacher-checkpoint", "t.pth", *argv],
                                                                      "distillation").task))


def test_research_flag_names_and_defaults():
    cfg = _distill_options([])
    assert (cfg["distill_type"], cfg["distill_alpha"], cfg["distill_T"], cfg["nkd_T"], cfg["lr_fd"],
            cfg["fd_loss"], cfg["fd_beta"], cfg["target_lnorm"]) == ("KD", 0.1, 1.0, 1.0, 1.0, "smoothL1", 2.0,
                                                                     False)
    cfg = _distill_options(["--distill_type", "KD", "--T", "3.0", "--alpha", "0.5", "--distill-hard", "--lr_fd",
                            "3e-5"])
    assert (cfg["distill_T"], cfg["distill_alpha"], cfg["distill_hard"], cfg["lr_fd"]) == (3.0, 0.5, True, 3e-5)
    cfg = _distill_options(["--distill-type", "NKD+FD", "--FDLoss_type", "mse", "--target_Lnorm", "--nkd-T", "3"])
    assert (cfg["logit_loss"], cfg["feature_loss"], cfg["fd_loss"], cfg["target_lnorm"], cfg["nkd_T"]) == \
        ("NKD", "FD", "MSE", True, 3.0)
    for bad in (["--alpha", "1.5"], ["--T", "0"], ["--distill_type", "NKD", "--hard"],
                ["--target_Lnorm"], ["--FDLoss_type", "L1", "--distill_type", "FD"]):
        with pytest.raises(ConfigError):
            _distill_options(bad)
    with pytest.raises(SystemExit):  # --feature-n has one allowed value: argparse refuses others (exit 2)
        _distill_options(["--feature_n", "2"])


def test_args_module_imports_no_torch():
    path = os.path.join(os.path.dirname(__file__), "..", "src", "slaknet", "distill", "args.py")
    tree = ast.parse(open(path).read())
    mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in mods if m.split(".")[0] in ("torch", "numpy", "timm")]


# ---------------------------------------------------------------- teacher cache


def _write(path, logits, feats=None, teacher="t1", data="d1", dtype="float32", commit=True):
    w = TeacherCacheWriter(path, dataset_id=data, teacher_id=teacher, num_items=logits.shape[0],
                           num_classes=logits.shape[1], random_augmentation=False, dtype=dtype,
                           feature_shape=None if feats is None else feats.shape[1:])
    order = np.random.default_rng(0).permutation(logits.shape[0])
    for chunk in np.array_split(order, 3):  # out of order, in batches, like a shuffled loader
        w.write(torch.from_numpy(chunk), logits[chunk], None if feats is None else feats[chunk])
    return w.commit() if commit else w


def _open(path, teacher="t1", data="d1", **kw):
    return TeacherCache.open(path, dataset_id=data, teacher_id=teacher, random_augmentation=False, **kw)


def test_cache_round_trip(tmp_path):
    logits, feats = torch.randn(10, 7), torch.randn(10, 3, 2, 2)
    _write(tmp_path / "c", logits, feats)
    cache = _open(tmp_path / "c", verify=True)
    got, gf = cache.get(torch.tensor([9, 0, 4]))
    assert torch.equal(got, logits[[9, 0, 4]]) and torch.equal(gf, feats[[9, 0, 4]])
    assert (cache.num_items, cache.num_classes, cache.has_features) == (10, 7, True)
    _write(tmp_path / "h", logits, dtype="float16")
    got, gf = _open(tmp_path / "h").get([1, 2])
    assert gf is None and torch.allclose(got, logits[[1, 2]], atol=2e-3, rtol=1e-3)


def test_cache_refuses_other_teacher_dataset_and_random_augmentation(tmp_path):
    _write(tmp_path / "c", torch.randn(4, 3))
    with pytest.raises(TeacherCacheError, match="another teacher"):
        _open(tmp_path / "c", teacher="t2")
    with pytest.raises(TeacherCacheError, match="another dataset"):
        _open(tmp_path / "c", data="d2")
    with pytest.raises(TeacherCacheError, match="fixed"):
        TeacherCache.open(tmp_path / "c", dataset_id="d1", teacher_id="t1", random_augmentation=True)
    with pytest.raises(TeacherCacheError, match="mixup"):
        TeacherCache.open(tmp_path / "c", dataset_id="d1", teacher_id="t1", random_augmentation=False, mixup=True)
    with pytest.raises(TeacherCacheError):
        TeacherCacheWriter(tmp_path / "x", dataset_id="d", teacher_id="t", num_items=2, num_classes=2,
                           random_augmentation=True)
    assert _open(tmp_path / "missing") is None


def test_cache_incomplete_build_is_never_valid(tmp_path):
    w = TeacherCacheWriter(tmp_path / "c", dataset_id="d1", teacher_id="t1", num_items=4, num_classes=3,
                           random_augmentation=False)
    w.write([0, 1], torch.ones(2, 3))
    with pytest.raises(TeacherCacheError, match="incomplete"):
        w.commit()
    assert _open(tmp_path / "c") is None  # arrays exist on disk but nothing was committed
    w.abort()
    assert os.listdir(tmp_path / "c") == []


def test_cache_killed_writer_keeps_previous_cache(tmp_path):
    old = torch.randn(6, 4)
    _write(tmp_path / "c", old)
    code = (
        "import os, torch\n"
        "from slaknet.distill.cache import TeacherCacheWriter\n"
        f"w = TeacherCacheWriter({str(tmp_path / 'c')!r}, dataset_id='d1', teacher_id='t1', num_items=6,"
        " num_classes=4, random_augmentation=False)\n"
        "w.write([0, 1, 2], torch.zeros(3, 4))\n"
        "os._exit(9)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 9
    assert len([n for n in os.listdir(tmp_path / "c") if n.endswith(".npy")]) == 2  # the killed build's array
    got, _ = _open(tmp_path / "c").get(range(6))
    assert torch.equal(got, old)  # the committed cache is untouched and still the one read
    new = torch.randn(6, 4)
    _write(tmp_path / "c", new)  # a later build replaces it and removes the abandoned array
    assert torch.equal(_open(tmp_path / "c").get(range(6))[0], new)
    assert len([n for n in os.listdir(tmp_path / "c") if n.endswith(".npy")]) == 1


def test_cache_damage_is_detected(tmp_path):
    _write(tmp_path / "c", torch.randn(8, 5))
    meta = json.load(open(tmp_path / "c" / "meta.json"))
    arr = tmp_path / "c" / meta["files"]["logits"]["name"]
    data = arr.read_bytes()
    arr.write_bytes(data[:-8])  # truncated
    with pytest.raises(TeacherCacheError, match="truncated"):
        _open(tmp_path / "c")
    arr.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one byte flipped
    assert _open(tmp_path / "c") is not None
    with pytest.raises(TeacherCacheError, match="hash"):
        _open(tmp_path / "c", verify=True)
    (tmp_path / "c" / "meta.json").write_text("{not json")
    with pytest.raises(TeacherCacheError, match="unreadable"):
        _open(tmp_path / "c")


def test_identities_change_with_weights_settings_and_transform():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    a = teacher_identity(m)
    assert a == teacher_identity(m) and a != teacher_identity(m, reparameterized=True)
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] += 1e-3
    assert teacher_identity(m) != a

    class DS(torch.utils.data.Dataset):
        def __init__(self, transform):
            self.transform = transform
            self.samples = [("a.jpg", 0), ("b.jpg", 1)]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.full((1,), float(i)), i

    assert dataset_identity(DS("center")) != dataset_identity(DS("random-crop"))
    assert dataset_identity(DS("center")) != dataset_identity(DS("center"), split="val")
    assert WithIndex(DS("x"))[1][-1] == 1 and len(WithIndex(DS("x"))) == 2


def test_distill_flags_coexist_with_train_flags():
    import dataclasses

    from slaknet.train.config import config_from_argv

    run = config_from_argv(["--model", "convnext_tiny", "--teacher", "slak_tiny", "--distill_type", "NKD",
                            "--T", "3.0", "--lr_fd", "3e-5", "-b", "8"], "distillation")
    cfg = resolve_distill_config(dataclasses.asdict(run.task))
    assert (run.model.name, run.task.teacher, cfg["logit_loss"], cfg["distill_T"], cfg["nkd_T"], run.optim.batch_size) \
        == ("convnext_tiny", "slak_tiny", "NKD", 3.0, 1.0, 8)


def test_package_lazy_names_resolve():
    import slaknet.distill as distill

    assert distill.KDLoss is KDLoss and distill.TeacherCacheError is TeacherCacheError
    assert all(getattr(distill, name) is not None for name in distill.__all__)
    with pytest.raises(AttributeError):
        distill.no_such_name
