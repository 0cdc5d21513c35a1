"""FM-KT, FM-KT Θ and OFM-KT: shapes, gradients, the unrolled Euler flow, serial insertion,
the implicit ensemble, every metric and path option, and the two variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flowdistill
from flowdistill.distillers.fmkt import (
    FEATURE_STEPS,
    LOGIT_STEPS,
    MetaEncoder,
    MetaFlow,
    step_metric,
)
from flowdistill.errors import ConfigError, ShapeMismatchError
from flowdistill.flows import odeint
from flowdistill.losses import dist, dkd, kd, pkd
from flowdistill.models.small import SmallCNN

Y = torch.tensor([0, 1, 2, 3])


def _wake(module: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Give every parameter of ``module`` random values, so that the zero-initialised
    meta-encoder becomes a non-trivial field."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _make(name, pair, **options):
    teacher, student, x = pair
    return flowdistill.make_distiller(name, teacher, student, example_input=x, **options)


class TokenNet(nn.Module):
    """Four 16-pixel patches → ``embed`` tokens ``(4, width)`` → ``block`` → mean → fc."""

    def __init__(self, width: int, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.GELU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.reshape(x.shape[0], 4, 16)
        return self.fc(self.block(self.embed(patches)).mean(dim=1))


# ---------------------------------------------------------------------------- meta-encoder
@pytest.mark.parametrize("encoder", ["mlp", "conv", "transformer"])
@pytest.mark.parametrize("shape", [(6,), (4, 3, 3), (5, 6)])
def test_meta_encoder_keeps_the_shape_and_starts_at_zero(encoder, shape):
    net = MetaEncoder(shape, encoder)
    x = torch.randn(3, *shape)
    out = net(x, torch.tensor(0.25))
    assert out.shape == x.shape and bool((out == 0).all())
    _wake(net)
    out = net(x, 0.25)
    assert out.shape == x.shape and out.abs().sum() > 0
    assert not torch.allclose(out, net(x, 0.75))  # the time embedding matters


def test_auto_encoder_follows_the_feature_kind():
    assert MetaEncoder((10,)).encoder == "mlp"
    assert MetaEncoder((4, 3, 3)).encoder == "conv"
    assert MetaEncoder((5, 6)).encoder == "transformer"
    with pytest.raises(ConfigError, match="encoder"):
        MetaEncoder((10,), "lstm")


@pytest.mark.parametrize("path", ["straight", "vp", "ve"])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_unrolled_euler_matches_odeint_on_the_same_field(path, steps):
    torch.manual_seed(0)
    flow = MetaFlow((4, 3, 3), path=path)
    _wake(flow)
    s = torch.randn(2, 4, 3, 3)
    x1, preds = flow.unroll(s, steps)
    times = torch.linspace(0.0, 1.0, steps + 1)
    ref = odeint(flow.velocity, s, times, method="euler")[-1]
    torch.testing.assert_close(x1, ref, rtol=1e-5, atol=1e-5)
    assert len(preds) == steps and all(p.shape == s.shape for p in preds)


def test_straight_path_steps_follow_the_authors_rollout():
    """The authors' rollout: every step predicts a displacement from the start s,
    ŷ_k = s + g(x_k, t_k), and moves the state by g/N, so x_1 is the mean prediction."""
    torch.manual_seed(0)
    flow = MetaFlow((5,))
    _wake(flow)
    s = torch.randn(3, 5)
    x1, preds = flow.unroll(s, 2)
    g0 = flow.encoder(s, torch.tensor(0.0))
    torch.testing.assert_close(preds[0], s + g0)  # ŷ_0 = s + g(s, 0)
    x_half = s + g0 / 2  # dt = 1/2
    g1 = flow.encoder(x_half, torch.tensor(0.5))
    torch.testing.assert_close(preds[1], s + g1)  # from s, not from x_half
    torch.testing.assert_close(x1, x_half + g1 / 2)
    torch.testing.assert_close(x1, (preds[0] + preds[1]) / 2)  # the implicit ensemble
    torch.testing.assert_close(flow.velocity(0.0, s), g0)


@pytest.mark.parametrize("path", ["straight", "ve"])
def test_a_fresh_flow_is_the_identity(path):
    flow = MetaFlow((5,), path=path)
    s = torch.randn(3, 5)
    x1, preds = flow.unroll(s, 4)
    torch.testing.assert_close(x1, s)
    assert all(torch.equal(p, s) for p in preds)


def test_unknown_path_metric_and_steps_are_rejected(pair):
    with pytest.raises(ConfigError, match="path"):
        _make("fmkt", pair, path="sde")
    with pytest.raises(ConfigError, match="metric"):
        _make("fmkt", pair, metric="mse")
    with pytest.raises(ConfigError, match="train_steps"):
        _make("fmkt", pair, train_steps=[0, 2])
    with pytest.raises(ConfigError, match="dkd"):
        _make("fmkt", pair, tap="stage2", metric="dkd")


# ---------------------------------------------------------------------------- logit mode
def test_logit_mode_shapes_terms_and_defaults(pair):
    d = _make("fmkt", pair)
    assert not d.feature_mode and d.metric == "dist" and d.train_steps == LOGIT_STEPS
    assert d.inference_steps == 4 and d.train_steps == (8,)
    d.train()
    terms = d(pair[2], Y)
    assert set(terms) == {"ce", "fmkt", "loss"} and torch.isfinite(terms["loss"])
    assert d.predict(pair[2]).shape == (4, 4)
    assert d.num_extra_params() == sum(p.numel() for p in d.flow.parameters())
    assert d.num_deployed_params() == d.num_extra_params() + sum(
        p.numel() for p in d.student.parameters()
    )


def test_logit_prediction_is_the_mean_of_independently_computed_steps(pair):
    teacher, student, x = pair
    d = _make("fmkt", pair)
    _wake(d.flow)
    d.eval()
    calls = []
    d.flow.encoder.register_forward_hook(lambda *a: calls.append(1))
    pred = d.predict(x)
    assert len(calls) == 4  # four steps at inference by default
    with torch.no_grad():
        z = student.eval()(x)
        xt, outs, n = z, [], 4
        for k in range(n):
            t = k / n
            g = d.flow.encoder(xt, torch.tensor(t))
            outs.append(z + g)  # ŷ_k = s + g(x_k, t_k): a displacement from the start
            xt = xt + g / n
    torch.testing.assert_close(pred, torch.stack(outs).mean(0))
    assert not torch.allclose(pred, z, atol=1e-3)


@pytest.mark.parametrize("name", ["fmkt", "fmkt_theta"])
def test_head_tap_runs_the_flow_on_the_feature_and_a_learned_head(name, pair):
    """The authors' logit-based module: the flow on the last feature map, each step's
    prediction through global average pooling and a new linear layer; the terms and the
    prediction recomputed from those pieces, the student's classifier left out of them."""
    teacher, student, x = pair
    d = _make(name, pair, head_tap="stage3", train_steps=[3], inference_steps=3)
    assert d.flow.encoder.kind == "map" and d.head.linear.in_features == 8
    _wake(d.flow)
    d.eval()
    with torch.no_grad():
        s = student.stage3(student.stage2(student.stage1(x)))  # (4, 8, 2, 2)
        t = teacher(x)
        xt, logits, n = s, [], 3
        for k in range(n):
            g = d.flow.encoder(xt, torch.tensor(k / n))
            logits.append(d.head.linear((s + g).mean(dim=(2, 3))))  # head(ŷ_k)
            xt = xt + g / n
        terms = d(x, Y)
        fm = torch.stack([dist(z, t, beta=2.0, gamma=2.0) for z in logits]).mean()  # DIST, T=1
        ce = torch.stack([F.cross_entropy(z, Y) for z in logits]).mean()
        torch.testing.assert_close(terms["fmkt"], fm)
        torch.testing.assert_close(terms["ce"], ce)
        if name == "fmkt":
            torch.testing.assert_close(d.predict(x), torch.stack(logits).mean(0))
    d.train()
    d.zero_grad()
    d(x, Y)["fmkt"].backward()
    assert d.head.linear.weight.grad.abs().sum() > 0
    assert student.fc.weight.grad is None  # the student's classifier is not in FM-KT's terms
    if name == "fmkt":
        # the student up to head_tap (its classifier, which no prediction runs, left out)
        assert d.num_deployed_params() == sum(
            p.numel() for m in (student, d.flow, d.head) for p in m.parameters()
        ) - sum(p.numel() for p in student.fc.parameters())
    else:  # Θ: the student's classifier reads the same feature and is deployed alone
        d.zero_grad()
        d(x, Y)["theta"].backward()
        assert student.fc.weight.grad.abs().sum() > 0
        assert d.num_deployed_params() == sum(p.numel() for p in student.parameters())


def test_ofmkt_head_tap_is_its_own_ensemble_through_the_head(pair):
    teacher, student, x = pair
    d = flowdistill.make_distiller("ofmkt", None, student, example_input=x, head_tap="stage3",
                                   inference_steps=2)  # fmt: skip
    _wake(d.flow)
    d.eval()
    with torch.no_grad():
        s = student.stage3(student.stage2(student.stage1(x)))
        g0 = d.flow.encoder(s, torch.tensor(0.0))
        g1 = d.flow.encoder(s + g0 / 2, torch.tensor(0.5))
        want = (d.head(s + g0) + d.head(s + g1)) / 2
        torch.testing.assert_close(d.predict(x), want)
    assert d.num_deployed_params() == sum(
        p.numel() for m in (student, d.flow, d.head) for p in m.parameters()
    ) - sum(p.numel() for p in student.fc.parameters())


def test_deployed_count_with_a_head_includes_frozen_layers(pair):
    """Frozen student layers still run at deployment: counted (the classifier is not)."""
    teacher, student, x = pair
    student.stage1.requires_grad_(False)
    d = _make("fmkt", pair, head_tap="stage3")
    assert [p.requires_grad for p in student.stage1.parameters()] == [False] * 3
    assert d.num_deployed_params() == sum(
        p.numel() for m in (student, d.flow, d.head) for p in m.parameters()
    ) - sum(p.numel() for p in student.fc.parameters())


def test_head_tap_is_refused_where_it_cannot_give_the_logits(pair):
    with pytest.raises(ConfigError, match="leave tap='logits'"):
        _make("fmkt", pair, tap="stage2", head_tap="stage3")
    with pytest.raises(ConfigError, match="head_tap is the student module path"):
        _make("fmkt", pair, head_tap="logits")
    torch.manual_seed(0)
    seq = TokenNet(8)
    with pytest.raises(ShapeMismatchError, match=r"gives logits of shape \(4, 4\)"):
        flowdistill.make_distiller("fmkt", TokenNet(16), seq, example_input=torch.randn(2, 64),
                                   head_tap="block")  # fmt: skip


def test_gradients_reach_student_and_meta_encoder_and_teacher_is_untouched(pair):
    teacher, student, x = pair
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for options in ({}, {"tap": "stage2"}):
        d = _make("fmkt", pair, **options)
        d.train()
        d.zero_grad()
        d(x, Y)["loss"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.flow.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
        opt.step()
        assert not teacher.training
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("metric", ["kd", "dkd", "pkd", "dist"])
def test_every_metric_runs_in_logit_mode(metric, pair):
    d = _make("fmkt", pair, metric=metric, train_steps=[2])
    d.train()
    terms = d(pair[2], Y)
    assert torch.isfinite(terms["loss"]) and terms["fmkt"] > 0


def test_step_metric_calls_the_library_losses():
    torch.manual_seed(0)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(step_metric("kd", a, b, temperature=2.0), kd(a, b, 2.0))
    torch.testing.assert_close(step_metric("pkd", a, b), pkd(a, b))
    torch.testing.assert_close(
        step_metric("dist", a, b, dist_beta=2.0, dist_gamma=2.0, dist_temperature=4.0),
        dist(a, b, beta=2.0, gamma=2.0, temperature=4.0),
    )
    torch.testing.assert_close(
        step_metric("dkd", a, b, Y, dkd_alpha=1.0, dkd_beta=2.0, temperature=4.0),
        dkd(a, b, Y, 1.0, 2.0, 4.0),
    )
    maps = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)  # channels are the classes
    torch.testing.assert_close(
        step_metric("kd", *maps), kd(maps[0].movedim(1, -1), maps[1].movedim(1, -1))
    )


@pytest.mark.parametrize("path", ["straight", "vp", "ve"])
@pytest.mark.parametrize("tap", ["logits", "stage2"])
def test_every_path_runs(path, tap, pair):
    d = _make("fmkt", pair, path=path, tap=tap, train_steps=[2])
    _wake(d.flow, 0.05)
    d.train()
    terms = d(pair[2], Y)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert torch.isfinite(d.predict(pair[2])).all()


def test_dkd_warms_up_over_epochs(pair):
    d = _make("fmkt", pair, metric="dkd", dkd_warmup=4)
    d.on_epoch_start(0, 10)
    assert d.warmup_factor == 0.25
    d.on_epoch_start(5, 10)
    assert d.warmup_factor == 1.0


# ---------------------------------------------------------------------------- feature mode
def test_feature_mode_on_maps_inserts_the_flow_serially(pair):
    teacher, student, x = pair
    d = _make("fmkt", pair, tap="stage2")
    assert d.feature_mode and d.metric == "pkd" and d.train_steps == FEATURE_STEPS
    assert d.flow.encoder.encoder == "conv"
    student.eval()
    with torch.no_grad():
        plain = student(x)
    # a fresh (zero) meta-encoder on the straight path is the identity
    torch.testing.assert_close(d.predict(x), plain)
    _wake(d.flow)
    seen = {}
    handle = student.stage3.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    pred = d.predict(x)
    handle.remove()
    with torch.no_grad():
        raw = d.student_taps(x)[1]["stage2"]  # the tap sees the module's own output
        x1, _ = d.flow.unroll(raw, d.inference_steps)
    torch.testing.assert_close(seen["x"], x1)  # the downstream layers see the flow output
    assert not torch.allclose(pred, plain, atol=1e-4)
    assert pred.shape == (4, 4)
    # training: terms, step predictions shaped like the student feature, projected target
    d.train()
    terms = d(x, Y)
    assert set(terms) == {"ce", "fmkt", "loss"}
    assert d.target_proj(torch.randn(4, 8, 2, 2)).shape == (4, 4, 2, 2)
    deployed = {id(p) for m in d.deployed_modules() for p in m.parameters()}
    assert all(
        id(p) not in deployed for p in [*d.target_proj.parameters(), *d.target_norm.parameters()]
    )


def test_feature_mode_distillers_copy_pickle_and_leave_with_their_hooks(pair, tmp_path):
    """The flow is inserted by hooks on the student: a distiller copied or saved whole
    predicts as the original and independently of it; the student alone pickles; a student
    whose distiller is gone computes its own forward pass again (no hook left)."""
    import copy
    import gc
    import pickle

    teacher, student, x = pair
    bare = copy.deepcopy(student).eval()  # (before any hook)
    d = _make("fmkt", pair, tap="stage2")
    _wake(d.flow)
    d.eval()
    with torch.no_grad():
        plain, want = bare(x), d.predict(x)
    assert not torch.allclose(want, plain, atol=1e-4)
    twin = copy.deepcopy(d)
    torch.save(d, tmp_path / "d.pt")
    loaded = torch.load(tmp_path / "d.pt", weights_only=False)
    for other in (twin, loaded):
        torch.testing.assert_close(other.predict(x), want)
    with torch.no_grad():
        for p in twin.flow.parameters():
            p.zero_()  # the copy's own flow: the original does not move
    torch.testing.assert_close(d.predict(x), want)
    torch.testing.assert_close(twin.predict(x), plain)
    pickle.loads(pickle.dumps(student))  # the student alone
    alone = copy.deepcopy(student)  # a copy of the student alone: no flow, no hook
    gc.collect()
    assert not alone._forward_pre_hooks and not alone.stage2._forward_hooks
    torch.testing.assert_close(torch.jit.script(alone).eval()(x), plain)
    # the student saved alone takes its flow along, not the distiller (nor its teacher)
    size = len(pickle.dumps(bare)) + len(pickle.dumps(d.flow))
    assert len(pickle.dumps(student)) < size + 4096
    with pytest.raises(ConfigError, match="one student takes one inserted flow"):
        _make("fmkt", pair, tap="stage2")
    for bad in (0, 2.7, "2"):
        with pytest.raises(ConfigError, match="inference_steps must be an integer >= 1"):
            d.inference_steps = bad
    d.inference_steps = 1  # the student called directly follows it too
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(x), d.predict(x))
    del d, twin, loaded
    gc.collect()
    assert not student._forward_pre_hooks and not student.stage2._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(student(x), plain)


def test_feature_mode_compares_displacements_from_the_tapped_feature(pair):
    """The authors' feature-mode loss: PKD between the displacement the student needs,
    s - y, and the one each step predicts, s - ŷ_k (recomputed here from the pieces)."""
    teacher, student, x = pair
    d = _make("fmkt", pair, tap="stage2", train_steps=[2])
    _wake(d.flow)
    d.train()
    terms = d(x, Y)
    with torch.no_grad():
        s = d.student_taps(x)[1]["stage2"]  # the tapped module's own output
        _, preds = d.flow.unroll(s, 2)
        target = d.target_proj(d.target_norm(d.teacher_taps(x)[1][d.teacher_tap]))
        expected = torch.stack([pkd(s - target, s - p) for p in preds]).mean()
        plain = torch.stack([pkd(p, target) for p in preds]).mean()
    torch.testing.assert_close(terms["fmkt"], d.fm_weight * d.warmup_factor * expected)
    assert not torch.allclose(expected, plain)  # (another loss than PKD(ŷ_k, y))


def test_training_step_counts_are_drawn_from_the_set(pair):
    d = _make("fmkt", pair, tap="stage2", train_steps=[1, 2, 4])
    d.train()
    counts = []
    d.flow.encoder.register_forward_hook(lambda *a: counts.append(1))
    seen = set()
    for _ in range(12):
        counts.clear()
        d(pair[2], Y)
        seen.add(len(counts))
    assert seen <= {1, 2, 4} and len(seen) > 1
    assert 1 <= d.diagnostics()["fmkt_steps"] <= 4


def test_feature_mode_on_vectors(pair):
    d = _make("fmkt", pair, tap="pool", metric="kd")
    assert d.flow.encoder.encoder == "mlp" and d.student_shapes["pool"] == (8,)
    d.train()
    assert torch.isfinite(d(pair[2], Y)["loss"])
    _wake(d.flow)
    assert d.predict(pair[2]).shape == (4, 4)


def test_feature_mode_on_tokens_with_the_transformer_encoder():
    torch.manual_seed(0)
    teacher, student, x = TokenNet(12), TokenNet(6), torch.randn(4, 1, 8, 8)
    d = flowdistill.make_distiller(
        "fmkt", teacher, student, example_input=x, tap="block", metric="dist", train_steps=[2]
    )
    assert d.flow.encoder.encoder == "transformer" and d.student_shapes["block"] == (4, 6)
    d.train()
    terms = d(x, Y)
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.flow.parameters())
    _wake(d.flow)
    assert d.predict(x).shape == (4, 4)


# ---------------------------------------------------------------------------- variants
def test_fmkt_theta_deploys_the_student_alone(pair):
    teacher, student, x = pair
    d = _make("fmkt_theta", pair)
    assert d.num_deployed_params() == sum(p.numel() for p in student.parameters())
    assert d.num_extra_params() == sum(p.numel() for p in d.flow.parameters()) > 0
    _wake(d.flow)
    calls = []
    d.flow.encoder.register_forward_hook(lambda *a: calls.append(1))
    d.eval()
    with torch.no_grad():
        torch.testing.assert_close(d.predict(x), student(x))
    assert not calls  # no meta-encoder at inference
    d.train()
    terms = d(x, Y)
    assert set(terms) == {"ce", "fmkt", "theta", "loss"} and calls
    terms["theta"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in d.flow.parameters())  # the ensemble target is detached
    with pytest.raises(ConfigError, match="logits"):
        _make("fmkt_theta", pair, tap="stage2")


def test_ofmkt_runs_without_a_teacher():
    torch.manual_seed(0)
    student, x = SmallCNN(1, 4, (4, 4, 8)), torch.randn(4, 1, 8, 8)
    d = flowdistill.make_distiller("ofmkt", None, student, example_input=x)
    assert d.teacher is None and not d.uses_teacher
    d.train()
    terms = d(x, Y)
    assert set(terms) == {"ce", "ofmkt", "loss"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.flow.parameters())
    _wake(d.flow)
    d.eval()
    with torch.no_grad():
        _, preds = d.flow.unroll(student(x), 4)
    torch.testing.assert_close(d.predict(x), torch.stack(preds).mean(0))
    for metric in ("kd", "dkd", "pkd"):
        d = flowdistill.make_distiller("ofmkt", None, student, example_input=x, metric=metric)
        assert torch.isfinite(d.train()(x, Y)["loss"])


def test_a_short_fit_learns(tiny_data):
    """A few epochs of logit-mode FM-KT from a briefly trained teacher learn the tiny
    4-class problem (chance is 0.25)."""
    torch.manual_seed(0)
    teacher, student = SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 8))
    optim = flowdistill.OptimConfig(lr=0.05)
    train = flowdistill.TrainConfig(epochs=8, progress=False)
    flowdistill.fit(flowdistill.make_distiller("student", None, teacher), tiny_data, optim, train)
    d = flowdistill.make_distiller("fmkt", teacher, student, example_input=tiny_data.train.x[:8])
    result = flowdistill.fit(d, tiny_data, optim, train, batch_size=32)
    assert result.test_acc_last > 0.6
    assert set(result.history[-1]) >= {"fmkt_steps", "fmkt_spread"}
    assert result.history[-1]["fmkt_steps"] == 8.0
