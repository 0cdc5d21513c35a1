"""The feature-distillation baselines as methods: shapes, errors, gradients, memory banks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TinyViT
from torch import nn

import flowdistill
from flowdistill import losses
from flowdistill.distillers import get_method, method_options
from flowdistill.distillers.fitnet import ConvRegressor
from flowdistill.errors import ConfigError, ShapeMismatchError
from flowdistill.models.small import MLP, SmallCNN

METHODS = ["fitnet", "at", "sp", "rkd", "pkt", "vid", "crd", "reviewkd", "pkd"]
#: the name of each method's own loss term
TERM = {m: m for m in METHODS} | {"rkd": "rkd_distance"}
Y = torch.tensor([0, 1, 2, 3])


def make(name, teacher, student, x, s_taps, t_taps, **options):
    taps = {"student_taps": s_taps, "teacher_taps": t_taps}
    return flowdistill.make_distiller(name, teacher, student, example_input=x, **taps, **options)


def step(d, x):
    """One forward in training mode (memory bank sized, indices set)."""
    d.on_fit_start(16)
    d.on_fit_targets(torch.arange(16) % 4)
    d.batch_index = torch.tensor([3, 0, 7, 12])
    d.train()
    return d(x, Y)


def cnn_pair():
    torch.manual_seed(0)
    return SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 8)), torch.randn(4, 1, 8, 8)


def assert_student_gets_gradient(d, term, module):
    assert torch.isfinite(term) and term.requires_grad
    d.zero_grad()
    term.backward()
    grads = [p.grad for p in module.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", METHODS)
def test_docstring_cites_paper_and_options_have_defaults(name):
    cls = get_method(name)
    first = cls.__doc__.strip().splitlines()[0]
    assert "et al." in first or "&" in first
    assert cls.needs_shapes
    opts = method_options(name)
    assert opts["kd_weight"] == 0.0 and opts["ce_weight"] == 1.0


def test_authors_defaults():
    assert method_options("fitnet")["hint_weight"] == 100.0
    assert method_options("at")["at_weight"] == 1000.0 and method_options("at")["p"] == 2.0
    assert method_options("sp")["sp_weight"] == 3000.0
    o = method_options("rkd")
    assert (o["distance_weight"], o["angle_weight"], o["rkd_weight"]) == (25.0, 50.0, 1.0)
    assert method_options("pkt")["pkt_weight"] == 30000.0
    assert method_options("vid")["init_var"] == 5.0 and method_options("vid")["vid_weight"] == 1
    o = method_options("crd")
    assert (o["nce_k"], o["nce_t"], o["nce_m"], o["feat_dim"]) == (16384, 0.07, 0.5, 128)
    assert o["crd_weight"] == 0.8 and o["mode"] == "memory"
    o = method_options("reviewkd")
    assert (o["review_weight"], o["warmup_epochs"], o["max_mid_channels"]) == (1.0, 20.0, 512)
    assert method_options("pkd")["pkd_weight"] == 1.0


@pytest.mark.parametrize("name", METHODS)
def test_cnn_maps_gradient_reaches_the_student(name):
    teacher, student, x = cnn_pair()
    d = make(name, teacher, student, x, ["stage2"], ["stage2"])
    terms = step(d, x)
    assert set(terms) >= {"ce", TERM[name], "loss"}
    assert_student_gets_gradient(d, terms[TERM[name]], student.stage1)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name", [m for m in METHODS if m != "at"])
def test_mlp_vectors(name):
    torch.manual_seed(0)
    teacher, student = MLP(64, 4, (32, 16)), MLP(64, 4, (8,))
    x = torch.randn(4, 1, 8, 8)
    d = make(name, teacher, student, x, ["layers.0"], ["layers.1"])
    assert_student_gets_gradient(d, step(d, x)[TERM[name]], student.layers)


@pytest.mark.parametrize("name", METHODS)
def test_transformer_tokens(name):
    torch.manual_seed(0)
    teacher, student, x = TinyViT(16), TinyViT(8), torch.randn(4, 1, 8, 8)
    d = make(name, teacher, student, x, ["blocks"], ["blocks"])
    assert_student_gets_gradient(d, step(d, x)[TERM[name]], student.embed)


@pytest.mark.parametrize("name", ["fitnet", "at", "vid", "reviewkd", "pkd"])
def test_tokens_to_maps(name):
    torch.manual_seed(0)
    teacher, student, x = SmallCNN(1, 4, (8, 8, 16)), TinyViT(8), torch.randn(4, 1, 8, 8)
    d = make(name, teacher, student, x, ["blocks"], ["stage1"])  # 4x4 tokens → 4x4 map
    assert_student_gets_gradient(d, step(d, x)[TERM[name]], student.embed)


def test_at_refuses_vectors_with_a_clear_error():
    teacher, student, x = cnn_pair()
    with pytest.raises(ShapeMismatchError, match=r"'pool'.*vector.*spatial"):
        make("at", teacher, student, x, ["pool"], ["pool"])


@pytest.mark.parametrize("name", ["at", "vid", "reviewkd"])
def test_vector_paired_with_map_is_refused(name):
    teacher, student, x = cnn_pair()
    kind = "vector" if name != "at" else "spatial"
    with pytest.raises(ShapeMismatchError, match=kind):
        make(name, teacher, student, x, ["pool"], ["stage2"])


def test_non_grid_tokens_with_maps_are_refused():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(8, 6)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            t = self.tok(x.reshape(x.shape[0], 8, 8)[:, :3])  # (B, 3, 6): 3 is no grid
            return self.fc(t.mean(1))

    teacher, _, x = cnn_pair()
    with pytest.raises(ShapeMismatchError, match="square"):
        make("at", teacher, Seq(), x, ["tok"], ["stage2"])


def test_fitnet_refuses_vector_to_map():
    teacher, student, x = cnn_pair()
    with pytest.raises(ShapeMismatchError, match="vector"):
        make("fitnet", teacher, student, x, ["pool"], ["stage2"])


def test_unpaired_taps_are_reported():
    teacher, student, x = cnn_pair()
    with pytest.raises(ConfigError, match="pair up"):
        make("sp", teacher, student, x, ["stage1", "stage2"], ["stage2"])
    with pytest.raises(ConfigError, match="1 student tap"):
        make("crd", teacher, student, x, ["stage1", "stage2"], ["stage1", "stage2"])
    with pytest.raises(ConfigError, match="example_input"):
        flowdistill.make_distiller("at", teacher, student)


def test_kd_term_is_optional():
    teacher, student, x = cnn_pair()
    d = make("at", teacher, student, x, ["stage2"], ["stage2"], kd_weight=0.5)
    terms = step(d, x)
    with torch.no_grad():
        ref = 0.5 * losses.kd(student(x), teacher(x), 4.0)
    torch.testing.assert_close(terms["kd"].detach(), ref)
    assert "kd" not in step(make("at", teacher, student, x, ["stage2"], ["stage2"]), x)


# ---------------------------------------------------------------------------- FitNet
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((4, 8, 8), (6, 4, 4)),
        ((4, 4, 4), (6, 8, 8)),
        ((4, 5, 5), (6, 3, 3)),
        ((4, 3, 3), (6, 5, 5)),
    ],
)
def test_fitnet_conv_regressor_reaches_the_teacher_shape(src, dst):
    reg = ConvRegressor(src, dst)
    y = reg(torch.randn(2, *src))
    assert y.shape == (2, *dst) and (y >= 0).all()
    assert ConvRegressor(src, dst, relu=False)(torch.randn(2, *src)).min() < 0


def test_fitnet_term_is_the_hint_of_the_regressed_feature():
    teacher, student, x = cnn_pair()
    d = make("fitnet", teacher, student, x, ["stage1", "stage2"], ["stage1", "stage2"])
    assert len(d.regressors) == 2 and d.num_extra_params() > 0
    d.eval()
    terms = d(x, Y)
    with torch.no_grad():
        s = d.student_forward(x)
        t = d.teacher_forward(x)
        ref = sum(
            losses.hint(r(s[k]), t[k])
            for r, k in zip(d.regressors, ["stage1", "stage2"], strict=True)
        )
    torch.testing.assert_close(terms["fitnet"].detach(), 100.0 * ref)


# ---------------------------------------------------------------------------- VID
def test_vid_variance_starts_at_init_var():
    teacher, student, x = cnn_pair()
    d = make("vid", teacher, student, x, ["stage1", "stage2"], ["stage1", "stage2"])
    for head in d.heads:
        var = F.softplus(head.log_scale) + 1e-5
        torch.testing.assert_close(var, torch.full_like(var, 5.0))
        assert [m.bias for m in head.regressor if isinstance(m, nn.Conv2d)] == [None] * 3
    terms = step(d, x)
    assert_student_gets_gradient(d, terms["vid"], student.stage1)
    assert d.heads[0].log_scale.grad is not None


# ---------------------------------------------------------------------------- PKD
def test_pkd_adapts_only_when_needed():
    teacher, student, x = cnn_pair()
    same = make("pkd", teacher, SmallCNN(1, 4, (8, 8, 16)), x, ["stage2"], ["stage2"])
    assert same.num_extra_params() == 0
    resized = make("pkd", teacher, SmallCNN(1, 4, (8, 8, 16)), x, ["stage1"], ["stage2"])
    assert resized.num_extra_params() == 0  # 8 channels both: bilinear resize only
    assert make("pkd", teacher, student, x, ["stage2"], ["stage2"]).num_extra_params() > 0
    assert_student_gets_gradient(resized, step(resized, x)["pkd"], resized.student.stage1)


# ---------------------------------------------------------------------------- ReviewKD
def test_reviewkd_several_taps():
    teacher, student, x = cnn_pair()
    taps = ["stage1", "stage2", "stage3", "pool"]
    d = make("reviewkd", teacher, student, x, taps, taps)
    assert [abf.att_conv is not None for abf in d.abfs] == [True, True, True, False]
    assert all(abf.conv1[0].out_channels == 8 for abf in d.abfs)  # min(512, deepest = 8)
    d.train()
    s_feats, t_feats, _, _ = d.features(x)
    outs = d.review(s_feats)
    for out, t in zip(outs, t_feats, strict=True):
        assert out.shape == losses.feature.as_map(t).shape
    terms = d(x, Y)
    assert_student_gets_gradient(d, terms["reviewkd"], student.stage1)
    assert d.abfs[0].att_conv[0].weight.grad is not None  # the fusion of the shallowest level


def test_reviewkd_deep_residual_reaches_shallow_outputs():
    teacher, student, x = cnn_pair()
    taps = ["stage1", "stage2"]
    d = make("reviewkd", teacher, student, x, taps, taps)
    d.train()
    s_feats, _, _, _ = d.features(x)
    deep = s_feats[1].detach().requires_grad_(True)
    outs = d.review([s_feats[0].detach(), deep])
    outs[0].sum().backward()
    assert deep.grad is not None and deep.grad.abs().sum() > 0


def test_reviewkd_warmup():
    teacher, student, x = cnn_pair()
    d = make("reviewkd", teacher, student, x, ["stage2"], ["stage2"])
    full = step(d, x)["reviewkd"].item()
    assert full > 0
    d.on_epoch_start(0, 240)
    assert step(d, x)["reviewkd"].item() == 0.0
    d.on_epoch_start(10, 240)
    assert d.warmup_factor == 0.5
    d.on_epoch_start(30, 240)
    assert d.warmup_factor == 1.0
    # a 24-epoch run warms up over 2 epochs (20 of 240, in proportion), as dkd and nd do
    d.on_epoch_start(1, 24)
    assert d.warmup_factor == 0.5
    d.on_epoch_start(2, 24)
    assert d.warmup_factor == 1.0
    fixed = make("reviewkd", teacher, student, x, ["stage2"], ["stage2"], reference_epochs=None)
    fixed.on_epoch_start(1, 24)
    assert fixed.warmup_factor == 1 / 20


# ---------------------------------------------------------------------------- CRD
def test_crd_memory_bank_momentum_update_at_batch_index():
    teacher, student, x = cnn_pair()
    d = make("crd", teacher, student, x, ["stage3"], ["stage3"])
    d.on_fit_start(16)
    d.on_fit_targets(torch.arange(16) % 4)
    assert d.memory_student.shape == (16, 128) and d.num_negatives == 15
    d.train()
    idx = torch.tensor([3, 0, 7, 12])
    d.batch_index = idx
    before_s, before_t = d.memory_student.clone(), d.memory_teacher.clone()
    with torch.no_grad():
        s_feats, t_feats, _, _ = d.features(x)
        v_s, v_t = d.embed_s(s_feats[0]), d.embed_t(t_feats[0])
    d(x, Y)
    for memory, before, v in ((d.memory_student, before_s, v_s), (d.memory_teacher, before_t, v_t)):
        expected = F.normalize(0.5 * before[idx] + 0.5 * v, dim=1)
        torch.testing.assert_close(memory[idx], expected)
        rest = torch.ones(16, dtype=torch.bool)
        rest[idx] = False
        torch.testing.assert_close(memory[rest], before[rest])
    assert d.normalizer.min() > 0  # Z is set on the first batch and kept
    z = d.normalizer.clone()
    d(x, Y)
    torch.testing.assert_close(d.normalizer, z)


def test_crd_uniform_negatives_skip_the_positive_and_are_capped():
    teacher, student, x = cnn_pair()
    d = make("crd", teacher, student, x, ["pool"], ["pool"], nce_k=40, negatives="uniform")
    d.on_fit_start(10)
    assert d.num_negatives == 9
    idx = torch.tensor([3, 0, 9, 5])
    keys = d.sample_keys(idx)
    assert keys.shape == (4, 10) and torch.equal(keys[:, 0], idx)
    assert not (keys[:, 1:] == idx[:, None]).any() and keys.max() < 10 and keys.min() >= 0


def test_crd_class_negatives_are_drawn_uniformly_from_the_other_classes():
    """The default, as the authors' CIFAR loader: every negative of a sample is of another
    class, and each sample of another class is drawn about equally often."""
    teacher, student, x = cnn_pair()
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0, 2, 2, 0, 1, 2, 0, 2])  # unsorted, uneven
    d = make("crd", teacher, student, x, ["pool"], ["pool"], nce_k=20_000)
    d.on_fit_start(16)
    d.on_fit_targets(labels)
    torch.manual_seed(0)
    idx = torch.arange(16)
    keys = d.sample_keys(idx)
    assert keys.shape == (16, 16) and torch.equal(keys[:, 0], idx)  # capped at 15 others
    for i in range(16):  # many draws for each positive
        drawn = d.sample_keys(torch.full((4000,), i))[:, 1:].flatten()
        others = (labels != labels[i]).nonzero().flatten()
        assert set(drawn.tolist()) == set(others.tolist()), i  # every other-class sample
        counts = torch.bincount(drawn, minlength=16)[others].double()
        expected = drawn.numel() / len(others)
        assert ((counts - expected).abs() / expected).max() < 0.05, i  # about uniform


def test_crd_class_negatives_need_class_labels():
    teacher, student, x = cnn_pair()
    d = make("crd", teacher, student, x, ["pool"], ["pool"])
    d.on_fit_start(16)
    with pytest.raises(ConfigError, match="on_fit_targets"):
        d.sample_keys(torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="one integer class label per training sample"):
        d.on_fit_targets(torch.zeros(16, 5, dtype=torch.long))  # token ids
    with pytest.raises(ConfigError, match="at least two classes"):
        d.on_fit_targets(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ConfigError, match="negatives must be one of"):
        make("crd", teacher, student, x, ["pool"], ["pool"], negatives="hard")
    u = make("crd", teacher, student, x, ["pool"], ["pool"], negatives="uniform")
    u.on_fit_start(16)
    u.on_fit_targets(torch.zeros(16, 5, dtype=torch.long))  # not needed: accepted
    assert u.sample_keys(torch.tensor([0, 1])).shape == (2, 16)


def test_crd_needs_memory_and_indices_but_batch_mode_does_not():
    teacher, student, x = cnn_pair()
    d = make("crd", teacher, student, x, ["pool"], ["pool"])
    with pytest.raises(ConfigError, match="on_fit_start"):
        d(x, Y)
    d.on_fit_start(16)
    with pytest.raises(ConfigError, match="batch_index"):
        d(x, Y)
    d.batch_index = torch.tensor([0, 1, 2, 16])
    with pytest.raises(ConfigError, match=r"\[0, 16\)"):
        d(x, Y)
    b = make("crd", teacher, student, x, ["pool"], ["pool"], mode="batch")
    b.train()
    terms = b(x, Y)
    assert_student_gets_gradient(b, terms["crd"], student.stage1)
    assert b.embed_t.linear.weight.grad is not None  # the teacher's head trains too
    with pytest.raises(ConfigError, match="mode"):
        make("crd", teacher, student, x, ["pool"], ["pool"], mode="queue")


def test_crd_memory_round_trips_through_the_state_dict():
    teacher, student, x = cnn_pair()
    d = make("crd", teacher, student, x, ["pool"], ["pool"])
    step(d, x)
    state = d.trainable_state_dict()
    assert {"memory_student", "memory_teacher", "normalizer"} <= set(state)
    fresh = make("crd", teacher, SmallCNN(1, 4, (4, 4, 8)), x, ["pool"], ["pool"])
    fresh.load_state_dict(state, strict=False)
    torch.testing.assert_close(fresh.memory_teacher, d.memory_teacher)
    assert fresh.num_data == 16


def test_crd_loss_drops_when_the_student_copies_the_teacher():
    """Training only the student's embedding head against a fixed teacher lowers CRD's loss."""
    teacher, student, x = cnn_pair()
    d = make("crd", teacher, student, x, ["pool"], ["pool"], mode="batch")
    d.train()
    opt = torch.optim.Adam(d.embed_s.parameters(), lr=0.05)
    first = None
    for _ in range(8):
        loss = d(x, Y)["crd"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert d(x, Y)["crd"].item() < first
