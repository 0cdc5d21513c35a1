"""The logit-based methods (dkd, dist, ls, taid, nd, ofa): each term is its loss function's
value, gradients reach the student, schedules follow their papers, errors are clear."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinyViT
from torch import nn

import flowdistill
from flowdistill import losses
from flowdistill.distillers import get_method, method_options
from flowdistill.distillers.dkd import warmup_length
from flowdistill.errors import ConfigError, ShapeMismatchError, TapError
from flowdistill.models.small import MLP, SmallCNN

Y = torch.tensor([0, 1, 2, 3])
METHODS = ["dkd", "dist", "ls", "taid", "nd", "ofa"]
#: each method's own distillation term
TERM = {"dkd": "dkd", "dist": "dist", "ls": "kd", "taid": "taid", "nd": "nd", "ofa": "ofa"}


def make(name, teacher, student, x, **options):
    if name == "ofa":
        options.setdefault("student_taps", ["stage1", "stage2"])
    return flowdistill.make_distiller(name, teacher, student, example_input=x, **options)


def outputs(teacher, student, x):
    with torch.no_grad():
        return teacher.eval()(x), student(x)


# ---------------------------------------------------------------------------- all methods
@pytest.mark.parametrize("name", METHODS)
def test_the_distillation_term_alone_reaches_the_student(name, pair):
    teacher, student, x = pair
    d = make(name, teacher, student, x)
    d.train()
    terms = d(x, Y)
    assert set(terms) >= {"ce", TERM[name], "loss"}
    terms[TERM[name]].backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_docstring_cites_the_paper(name):
    doc = get_method(name).__doc__
    year = {"dkd": "2022", "dist": "2022", "ls": "2024", "taid": "2025", "ofa": "2023"}
    assert "et al." in doc
    if name in year:
        assert year[name] in doc


@pytest.mark.parametrize("name", METHODS)
def test_bad_temperature_or_weights_are_config_errors(name, pair):
    teacher, student, x = pair
    bad = {"taid": {"t_start": 1.0}, "nd": {"centers": "mean"}, "ofa": {"eps": 0.0}}
    with pytest.raises(ConfigError):
        make(name, teacher, student, x, **bad.get(name, {"temperature": 0.0}))


def test_defaults_are_the_authors():
    assert {k: method_options("dkd")[k] for k in ("alpha", "beta", "temperature")} == {
        "alpha": 1.0,
        "beta": 8.0,
        "temperature": 4.0,
    }
    assert method_options("dkd")["warmup_epochs"] == 20
    o = method_options("dist")
    assert (o["beta"], o["gamma"], o["temperature"], o["dist_weight"]) == (1.0, 1.0, 4.0, 2.0)
    o = method_options("ls")
    assert (o["temperature"], o["kd_weight"], o["ce_weight"]) == (2.0, 9.0, 0.1)
    o = method_options("taid")
    assert (o["t_start"], o["t_end"], o["alpha"], o["beta"]) == (0.4, 1.0, 5e-4, 0.99)
    o = method_options("ofa")
    assert (o["eps"], o["temperature"], o["ofa_weight"], o["kd_weight"]) == (1.0, 1.0, 1.0, 1.0)
    o = method_options("nd")
    assert (o["nd_weight"], o["kd_weight"], o["temperature"]) == (1.0, 1.0, 4.0)


# ---------------------------------------------------------------------------- DKD
def test_dkd_terms_follow_the_loss_and_warm_up_linearly(pair):
    teacher, student, x = pair
    d = make("dkd", teacher, student, x, alpha=0.5, beta=4.0, temperature=2.0)
    t, s = outputs(teacher, student, x)
    full = losses.dkd(s, t, Y, alpha=0.5, beta=4.0, temperature=2.0)
    torch.testing.assert_close(d(x, Y)["dkd"].detach(), full)  # not warmed up outside a run
    for epoch in range(25):  # 240-epoch run: W = 20, factor (e + 1) / 20 from mdistiller
        d.on_epoch_start(epoch, 240)
        factor = min((epoch + 1) / 20, 1.0)
        assert d.warmup == pytest.approx(factor)
        if epoch in (0, 9, 18, 19, 24):
            torch.testing.assert_close(d(x, Y)["dkd"].detach(), factor * full)
    assert d.diagnostics()["dkd_warmup"] == 1.0
    # a shorter run warms up over the same fraction of it: 24 epochs -> W = 2
    d.on_epoch_start(0, 24)
    assert d.warmup == pytest.approx(0.5)
    d.on_epoch_start(1, 24)
    assert d.warmup == pytest.approx(1.0)
    assert warmup_length(480, 20, 240) == 20 and warmup_length(24, 20, None) == 20
    off = make("dkd", teacher, student, x, warmup_epochs=0)
    off.on_epoch_start(0, 240)
    assert off.warmup == 1.0
    with pytest.raises(ConfigError, match="warmup_epochs"):
        make("dkd", teacher, student, x, warmup_epochs=-1)


# ---------------------------------------------------------------------------- DIST, LS
def test_dist_and_ls_terms_follow_their_losses(pair):
    teacher, student, x = pair
    t, s = outputs(teacher, student, x)
    d = make("dist", teacher, student, x, dist_weight=1.5, temperature=2.0, gamma=0.5)
    torch.testing.assert_close(
        d(x, Y)["dist"].detach(), 1.5 * losses.dist(s, t, 1.0, 0.5, temperature=2.0)
    )
    d = make("ls", teacher, student, x)
    torch.testing.assert_close(d(x, Y)["kd"].detach(), 9.0 * losses.ls(s, t, 2.0))


# ---------------------------------------------------------------------------- TAID
def test_taid_term_uses_the_current_t_and_t_is_a_checkpointed_buffer(pair):
    teacher, student, x = pair
    d = make("taid", teacher, student, x)
    d.eval()  # no schedule update in eval mode
    t, s = outputs(teacher, student, x)
    torch.testing.assert_close(d(x, Y)["taid"].detach(), losses.taid(s, t, 0.4))
    assert float(d.t) == pytest.approx(0.4)
    assert {"t", "momentum", "prev_loss"} <= set(d.trainable_state_dict())
    assert d.diagnostics() == {"taid_t": pytest.approx(0.4)}


def test_taid_schedule_is_monotone_and_bounded(pair):
    teacher, student, x = pair
    d = make("taid", teacher, student, x, t_start=0.2, t_end=0.9, alpha=0.05)
    g = torch.Generator().manual_seed(0)
    ts = [float(d.t)]
    steps = 200
    for step in range(steps):
        loss = float(torch.rand((), generator=g)) * 3 + 0.1  # losses rising and falling
        ts.append(d.update_t(loss, progress=step / steps))
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False))
    assert min(ts) == pytest.approx(0.2) and max(ts) <= 0.9
    assert ts[1] == ts[0]  # the first step only records the loss
    # the floor is the linear schedule, reached by the end of the run
    assert ts[-1] >= 0.2 + 0.7 * (steps - 1) / steps - 1e-6
    fixed = make("taid", teacher, student, x, adaptive=False)
    fixed.update_t(1.0, 0.0)
    assert fixed.update_t(0.5, 0.5) == pytest.approx(0.7)


def test_taid_adapts_faster_when_the_loss_falls(pair):
    teacher, student, x = pair
    falling = make("taid", teacher, student, x, alpha=0.1)
    rising = make("taid", teacher, student, x, alpha=0.1)
    for step in range(20):
        falling.update_t(10.0 - 0.4 * step, 0.0)
        rising.update_t(1.0 + 0.4 * step, 0.0)
    assert float(falling.t) > float(rising.t) > 0.4


def test_taid_progress_follows_the_engine(pair, tiny_data):
    teacher, student, x = pair
    d = make("taid", teacher, student, x)
    d.on_fit_start(8)
    d.on_epoch_start(1, 2)
    d.train()
    assert d.progress() == pytest.approx(0.5)
    d(x, Y)
    assert d.progress() == pytest.approx(0.75)
    result = flowdistill.fit(
        make("taid", teacher, SmallCNN(1, 4, (4, 4, 8)), x),
        tiny_data,
        flowdistill.OptimConfig(lr=0.02),
        flowdistill.TrainConfig(epochs=2, progress=False),
        batch_size=32,
    )
    ts = [row["taid_t"] for row in result.history]
    # 3 steps per epoch: the last step of epoch 2 starts at progress 5/6
    assert ts[0] <= ts[1] and ts[1] >= 0.4 + 0.6 * 5 / 6 - 1e-6


# ---------------------------------------------------------------------------- ND
def test_nd_terms_embeddings_and_running_class_means(pair):
    teacher, student, x = pair
    d = make("nd", teacher, student, x)
    assert isinstance(d.projector, nn.Module) and d.num_extra_params() > 0  # 8 -> 16 dims
    d.train()
    terms = d(x, Y)
    with torch.no_grad():
        t_emb = teacher.pool(teacher.stage3(teacher.stage2(teacher.stage1(x))))
    torch.testing.assert_close(d.class_means(), t_emb)  # one sample of each class so far
    d(x, torch.tensor([0, 0, 1, 1]))
    expected = torch.stack(
        [(2 * t_emb[0] + t_emb[1]) / 3, (t_emb[1] + t_emb[2] + t_emb[3]) / 3, t_emb[2], t_emb[3]]
    )
    torch.testing.assert_close(d.class_means(), expected)
    assert d.class_count.tolist() == [3.0, 3.0, 1.0, 1.0]
    t, s = outputs(teacher, student, x)
    torch.testing.assert_close(terms["kd"].detach(), losses.kd(s, t, 4.0), rtol=1e-5, atol=1e-6)
    # eval mode leaves the means alone
    before = d.class_means().clone()
    d.eval()
    d(x, Y)
    torch.testing.assert_close(d.class_means(), before)


def test_nd_term_is_the_nd_loss_without_projector():
    torch.manual_seed(0)
    teacher, student = SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 16))
    x = torch.randn(4, 1, 8, 8)
    d = make("nd", teacher, student, x, centers="classifier", nd_weight=2.0)
    assert isinstance(d.projector, nn.Identity) and d.num_extra_params() == 0
    d.train()
    terms = d(x, Y)
    with torch.no_grad():
        s_emb = student.pool(student.stage3(student.stage2(student.stage1(x))))
        t_emb = teacher.pool(teacher.stage3(teacher.stage2(teacher.stage1(x))))
    expected = 2.0 * losses.nd(s_emb, t_emb, teacher.fc.weight, Y)
    torch.testing.assert_close(terms["nd"].detach(), expected)
    means = torch.randn(4, 16)
    d.set_class_means(means)
    d(x, Y)
    torch.testing.assert_close(d.class_means(), means)
    with pytest.raises(ShapeMismatchError, match=r"\(4, 16\)"):
        d.set_class_means(torch.randn(4, 8))


def test_nd_warms_up_its_kd_term_from_zero(pair):
    teacher, student, x = pair
    d = make("nd", teacher, student, x)
    d.eval()
    full = d(x, Y)["kd"].detach()
    d.on_epoch_start(0, 240)
    assert d(x, Y)["kd"].item() == 0.0  # the authors' min(epoch / 20, 1), epochs from 0
    d.on_epoch_start(5, 240)
    torch.testing.assert_close(d(x, Y)["kd"].detach(), 0.25 * full)
    d.on_epoch_start(1, 24)  # W = 2 epochs in a 24-epoch run
    torch.testing.assert_close(d(x, Y)["kd"].detach(), 0.5 * full)


def test_nd_trains_on_a_single_sample_batch(pair):
    teacher, student, x = pair
    d = make("nd", teacher, student, x)
    d.train()
    d(x[:1], Y[:1])["loss"].backward()


def test_nd_errors_where_the_embedding_is_undefined(pair):
    teacher, student, x = pair

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, z):
            return self.conv(z).mean(dim=(2, 3))

    with pytest.raises(ConfigError, match="no nn.Linear with 4 outputs"):
        make("nd", teacher, NoLinear(), x)
    with pytest.raises(TapError):
        make("nd", teacher, student, x, student_classifier="fcc")

    class TokenHead(nn.Module):  # classifier applied to every token
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, z):
            return self.fc(z.flatten(2).transpose(1, 2).reshape(z.shape[0], 16, 4)).mean(1)

    with pytest.raises(ShapeMismatchError, match=r"\(batch, dim\)"):
        make("nd", teacher, TokenHead(), x)
    with pytest.raises(ConfigError, match="example_input"):
        flowdistill.make_distiller("nd", teacher, student)


def test_nd_with_mlps():
    torch.manual_seed(0)
    teacher, student = MLP(64, 4, (32,)), MLP(64, 4, (8,))
    x = torch.randn(4, 1, 8, 8)
    d = make("nd", teacher, student, x)
    d.train()
    d(x, Y)["loss"].backward()
    assert d.projector.linear.weight.shape == (32, 8)


# ---------------------------------------------------------------------------- OFA
def test_ofa_branches_follow_probed_shapes(pair):
    teacher, student, x = pair
    d = make("ofa", teacher, student, x, student_taps=["stage1", "stage2", "stage3", "pool"])
    # hidden width max(8, 16) = 16; stage1 (4, 4, 4) halves once to the last map (2×2)
    assert sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in d.branches[0].modules())
    assert isinstance(d.branches[1][0], nn.Conv2d) and d.branches[1][0].kernel_size == (1, 1)
    assert d.branches[1][0].out_channels == 16
    assert isinstance(d.branches[3], nn.Linear)
    d.train()
    s_out = d.student_forward(x)
    t_logits = teacher(x)
    for tap, head in zip(d.branch_taps, d.branches, strict=True):
        assert head(s_out[tap]).shape == (4, 4)
    terms = d(x, Y)
    assert terms["ofa"].item() > 0
    with torch.no_grad():
        expected = losses.ofa(student(x), t_logits, Y, 1.0)
    torch.testing.assert_close(terms["kd"].detach(), expected)


def test_ofa_eps_per_branch_and_errors(pair):
    teacher, student, x = pair
    d = make("ofa", teacher, student, x, student_taps=["stage2"], eps=[1.0, 1.5])
    assert d.eps == [1.0, 1.5]
    with pytest.raises(ConfigError, match="one per branch"):
        make("ofa", teacher, student, x, student_taps=["stage2"], eps=[1.0, 1.5, 2.0])
    with pytest.raises(ConfigError, match="student_taps"):
        flowdistill.make_distiller("ofa", teacher, student, example_input=x)


def test_ofa_token_student_branches():
    torch.manual_seed(0)
    teacher, student = SmallCNN(1, 4, (8, 8, 16)), TinyViT(8)
    x = torch.randn(4, 1, 8, 8)
    d = make("ofa", teacher, student, x, student_taps=["blocks"], eps=1.5)
    assert d.branches[0].cls_token  # 17 tokens: a 4×4 grid plus a class token
    d.train()
    terms = d(x, Y)
    terms["ofa"].backward()
    assert student.embed.weight.grad.abs().sum() > 0
