"""FlowDistill: the flow learns an exact transport, schedules, gradient routing, options."""

import pytest
import torch
from torch import nn

import flowdistill
from flowdistill.errors import ConfigError
from flowdistill.models.small import SmallCNN

TAPS = {"student_taps": ["stage2"], "teacher_taps": ["stage2"]}


class _Twist(nn.Module):
    """An exact bijection of R^4: g(x) = 1.5 (x + 0.5 tanh(W x)) + b with ||W||_2 = 1.

    Every straight-path interpolant (1 - u) x + u g(x) has Jacobian
    (1 + 0.5u) I + 0.75u D W with ||0.75u D W|| < 1 + 0.5u, so it is a bijection too: the
    paths never cross and the flow that follows them is exact (orientation-preserving, as
    every flow map must be)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        w = torch.randn(4, 4, generator=g)
        self.register_buffer("w", w / torch.linalg.matrix_norm(w, ord=2))
        self.register_buffer("b", torch.randn(4, generator=g))

    def forward(self, x):
        return 1.5 * (x + 0.5 * torch.tanh(x @ self.w.T)) + self.b


def _synthetic_pair():
    torch.manual_seed(0)
    student = nn.Sequential()
    student.add_module("feat", nn.Linear(6, 4))
    student.add_module("head", nn.Linear(4, 3))
    teacher = nn.Sequential()
    teacher.add_module("feat", nn.Linear(6, 4))
    teacher.add_module("twist", _Twist())
    teacher.add_module("head", nn.Linear(4, 3))
    teacher.feat.load_state_dict(student.feat.state_dict())  # teacher = twist(student)
    return teacher, student


def test_flow_learns_an_exact_invertible_relation():
    teacher, student = _synthetic_pair()
    student.requires_grad_(False)  # only the flow learns: the relation stays exact
    x = torch.randn(256, 6)
    d = flowdistill.make_distiller(
        "flowdistill",
        teacher,
        student,
        example_input=x[:2],
        student_taps=["feat"],
        teacher_taps=["twist"],
        distill_logits=False,
        kd_weight=0.0,
        ce_weight=0.0,
        standardize=False,
        steps=4,
        hidden=64,
        depth=2,
        progressive_target=False,
        progressive_steps=False,
        progressive_stages=False,
        conditional=False,
    )
    assert isinstance(d.adapters["p0"], nn.Identity)  # equal shapes: no adapter needed
    opt = torch.optim.Adam(d.trainable_parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    d.train()
    first = d.diagnostics()
    for _ in range(400):
        terms = d(x, torch.zeros(256, dtype=torch.long))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        sched.step()
    diag = d.diagnostics()
    assert first == {} or first["feat/transport_error"] > 0.3
    assert diag["feat/adapter_error"] > 0.3  # the teacher feature is far from the student's
    assert diag["feat/transport_error"] < 0.02  # the flow carries one onto the other (0.004)
    assert diag["feat/roundtrip_error"] < 1e-4  # a bijection, numerically
    # the 4-step Euler transport run backwards, recomputed by hand: what it loses
    held = d._held
    d.eval()  # (as diagnostics run)
    with torch.no_grad():
        a = d.endpoints(held)[1][0][2]
        x, v = a, d.velocities["p0"]
        for k in range(4):
            x = x + v(x, torch.full((len(x),), k / 4)) / 4
        for k in range(4, 0, -1):
            x = x - v(x, torch.full((len(x),), k / 4)) / 4
    rel = float((x - a).norm(dim=1).mean() / a.norm(dim=1).mean())  # mean per-sample norms
    assert diag["feat/transport_roundtrip_error"] == pytest.approx(rel, rel=1e-4, abs=1e-7)
    assert rel > diag["feat/roundtrip_error"]  # the coarse map loses more than the flow
    # independent check of the transport on fresh inputs
    xs = torch.randn(64, 6)
    with torch.no_grad():
        a, t = student.feat(xs), teacher.twist(teacher.feat(xs))
        moved = d._transport("p0", a, 1.0, 4, None, True)
    assert (moved - t).norm() / t.norm() < 0.05


def test_progressive_schedules():
    t, s = SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 8))
    d = flowdistill.make_distiller(
        "flowdistill", t, s, example_input=torch.randn(2, 1, 8, 8), steps=4, ramp=0.5, **TAPS
    )
    seen = []
    for epoch in range(10):
        d.on_epoch_start(epoch, 10)
        seen.append((d.tau, d.active_steps, d.active_pairs))
    assert seen[0] == (0.2, 1, 1) and seen[4] == (1.0, 4, 2) and seen[9] == (1.0, 4, 2)
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)  # monotone ramps
    assert [s[1] for s in seen] == sorted(s[1] for s in seen)
    flat = flowdistill.make_distiller(
        "flowdistill",
        t,
        s,
        example_input=torch.randn(2, 1, 8, 8),
        steps=4,
        progressive_target=False,
        progressive_steps=False,
        progressive_stages=False,
        **TAPS,
    )
    flat.on_epoch_start(0, 10)
    assert (flat.tau, flat.active_steps, flat.active_pairs) == (1.0, 4, 2)


@pytest.mark.parametrize("flow_grad", ["fm", "all"])
def test_transport_gradients_reach_student_and_flow_only_when_asked(flow_grad, pair):
    teacher, student, x = pair
    d = flowdistill.make_distiller(
        "flowdistill", teacher, student, example_input=x, flow_grad=flow_grad, **TAPS
    )
    with torch.no_grad():  # move the zero-initialised output layers off zero
        for v in d.velocities.values():
            v.out.weight.normal_(0, 0.1)
    d.train()
    d.on_epoch_start(9, 10)
    terms = d(x, torch.tensor([0, 1, 2, 3]))
    assert {"ce", "kd", "fm", "feature", "logit", "loss"} == set(terms)
    terms["feature"].backward()
    flow_grads = [p.grad for p in d.velocities["p0"].parameters() if p.grad is not None]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.adapters.parameters())
    if flow_grad == "fm":
        assert not flow_grads
    else:
        assert any(g.abs().sum() > 0 for g in flow_grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_context_conditions_the_transport(pair):
    teacher, student, x = pair
    d = flowdistill.make_distiller("flowdistill", teacher, student, example_input=x, **TAPS)
    with torch.no_grad():
        for p in d.velocities.parameters():
            p.add_(0.1 * torch.randn_like(p))
    a = torch.randn(4, 4)  # logits pair: (B, classes)
    c1, c2 = torch.rand(4, d.velocities["p1"].embed.cond_dim), None
    c2 = torch.rand_like(c1)
    with torch.no_grad():
        m1 = d._transport("p1", a, 1.0, 2, c1, True)
        m2 = d._transport("p1", a, 1.0, 2, c2, True)
    assert (m1 - m2).abs().max() > 1e-4


@pytest.mark.parametrize(
    "options",
    [
        {"flow": False},
        {"conditional": False},
        {"solver": "midpoint", "steps": 3},
        {"num_tasks": 3, "task": 2},
        {"distill_logits": False},
        {"inference": "flow"},
        {"sigma": 0.1, "flow_grad": "all"},
        {"field": "pointwise"},
        {"field": "spatial"},
        {"logit_weight": 0.0},
    ],
)
def test_options_train_a_step(options, pair):
    teacher, student, x = pair
    d = flowdistill.make_distiller(
        "flowdistill", teacher, student, example_input=x, **TAPS, **options
    )
    d.train()
    terms = d(x, torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert ("fm" in terms) == options.get("flow", True)
    logits_matched = options.get("distill_logits", True) and options.get("logit_weight", 1.0)
    assert ("logit" in terms) == bool(logits_matched)
    assert d.predict(x).shape == (4, 4)
    diag = d.diagnostics()
    assert all(torch.isfinite(torch.tensor(v)) for v in diag.values())


def test_inference_modes(pair):
    teacher, student, x = pair
    d = flowdistill.make_distiller(
        "flowdistill", teacher, student, example_input=x, inference="flow", **TAPS
    )
    d.eval()
    torch.testing.assert_close(d.predict(x), student(x))  # a fresh flow is the identity
    with torch.no_grad():
        d.velocities["p1"].out.bias.fill_(1.0)
    moved = d.predict(x)
    assert (moved - student(x)).abs().max() > 0.5
    plain = flowdistill.make_distiller("flowdistill", teacher, student, example_input=x, **TAPS)
    torch.testing.assert_close(plain.predict(x), student(x))


def test_token_features_from_a_transformer():
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.embed = nn.Linear(4, dim)
            layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, 1)
            self.head = nn.Linear(dim, 3)

        def forward(self, x):  # x: (B, 9, 4) tokens
            return self.head(self.encoder(self.embed(x)).mean(1))

    teacher, student, x = Tokens(16), Tokens(8), torch.randn(2, 9, 4)
    d = flowdistill.make_distiller(
        "flowdistill",
        teacher,
        student,
        example_input=x,
        student_taps=["encoder"],
        teacher_taps=["encoder"],
    )
    d.train()
    terms = d(torch.randn(4, 9, 4), torch.tensor([0, 1, 2, 0]))
    terms["loss"].backward()
    assert student.embed.weight.grad.abs().sum() > 0


def test_bad_configuration_is_named(pair):
    teacher, student, x = pair
    with pytest.raises(ConfigError, match="pairs student and teacher taps"):
        flowdistill.make_distiller(
            "flowdistill",
            teacher,
            student,
            example_input=x,
            student_taps=["stage1", "stage2"],
            teacher_taps=["stage2"],
        )
    with pytest.raises(ConfigError, match="solver"):
        flowdistill.make_distiller(
            "flowdistill", teacher, student, example_input=x, solver="dopri5"
        )
    with pytest.raises(ConfigError, match="inference='flow'"):
        flowdistill.make_distiller(
            "flowdistill", teacher, student, example_input=x, inference="flow", distill_logits=False
        )
    with pytest.raises(ConfigError, match="example_input"):
        flowdistill.make_distiller("flowdistill", teacher, student)


def _perturbed_field(pair, field):
    teacher, student, x = pair
    d = flowdistill.make_distiller(
        "flowdistill", teacher, student, example_input=x, field=field, **TAPS
    )
    net = d.velocities["p0"]  # teacher stage2 maps: (8, 2, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("field", ["pointwise", "lean"])
def test_per_position_fields_act_on_each_position_alone(pair, field):
    net = _perturbed_field(pair, field)
    z, t = torch.randn(3, 8, 2, 2), torch.rand(3)
    ctx = torch.rand(3, net.embed.cond_dim)
    out = net(z, t, context=ctx)
    perm = torch.randperm(4)
    shuffled = z.flatten(2)[:, :, perm].reshape(3, 8, 2, 2)
    torch.testing.assert_close(net(shuffled, t, context=ctx).flatten(2), out.flatten(2)[:, :, perm])
    # a map and its rows of positions (B, H*W, C) give the same field
    rows = z.flatten(2).transpose(1, 2)
    torch.testing.assert_close(net(rows, t, context=ctx), out.flatten(2).transpose(1, 2))
    if field == "pointwise":  # each position equals the vector field on its channels
        torch.testing.assert_close(out[:, :, 1, 0], net.field(z[:, :, 1, 0], t, context=ctx))


def test_lean_field_is_one_film_hidden_layer(pair):
    net = _perturbed_field(pair, "lean")
    z, t = torch.randn(3, 8, 2, 2), torch.rand(3)
    ctx = torch.rand(3, net.embed.cond_dim)
    # independent formula: v = W2 SiLU((W1 x + b1) * (1 + gamma) + beta) + b2 per position
    e = net.embed(t, z, ctx)  # (3, 32)
    gamma, beta = (e @ net.film.proj.weight.T + net.film.proj.bias).chunk(2, dim=1)
    x = z[:, :, 0, 1]  # (3, 8): one position's channels
    h = x @ net.inp.weight.T + net.inp.bias
    h = h * (1 + gamma) + beta
    want = (h * torch.sigmoid(h)) @ net.out.weight.T + net.out.bias
    torch.testing.assert_close(net(z, t, context=ctx)[:, :, 0, 1], want)


def test_default_field_is_per_position_and_starts_as_identity(pair):
    teacher, student, x = pair
    d = flowdistill.make_distiller("flowdistill", teacher, student, example_input=x, **TAPS)
    s_out, t_out = d.student_forward(x), d.teacher_forward(x)
    key, _, a, t = d._endpoints(s_out, t_out)[0]
    assert a.shape == t.shape == (4, 4, 8)  # stage2 (8, 2, 2) as 4 rows of 8 channels
    moved = d._transport(key, a, 1.0, d.steps, d._context(s_out), True)
    torch.testing.assert_close(moved, a)  # zero-initialised output: the identity flow


def test_anchor_matches_the_adapter_output_itself(pair):
    """anchor_weight adds w · MSE(A(s), standardised t) on each feature pair, computed here
    from hooked features and the per-channel batch statistics; it trains the student and
    adapter, never the flow."""
    teacher, student, x = pair
    feats = {}
    student.stage2.register_forward_hook(lambda m, i, o: feats.__setitem__("s", o.detach()))
    teacher.stage2.register_forward_hook(lambda m, i, o: feats.__setitem__("t", o.detach()))
    d = flowdistill.make_distiller(
        "flowdistill", teacher, student, example_input=x, anchor_weight=2.0, **TAPS
    )
    d.train()
    d.on_epoch_start(9, 10)  # full transfer: the target is the teacher feature itself
    terms = d(x, torch.tensor([0, 1, 2, 3]))
    t = feats["t"]
    mean, var = (
        t.mean(dim=(0, 2, 3), keepdim=True),
        t.var(dim=(0, 2, 3), keepdim=True, unbiased=False),
    )
    expected = 2.0 * ((d.adapters["p0"](feats["s"]) - (t - mean) / (var + 1e-5).sqrt()) ** 2).mean()
    torch.testing.assert_close(terms["anchor"], expected)
    terms["anchor"].backward()
    assert all(p.grad is None for p in d.velocities.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    plain = flowdistill.make_distiller("flowdistill", teacher, student, example_input=x, **TAPS)
    assert "anchor" not in plain(x, torch.tensor([0, 1, 2, 3]))
    alone = flowdistill.make_distiller(
        "flowdistill", teacher, student, example_input=x, anchor_weight=2.0, feature_weight=0.0,
        **TAPS,
    )  # fmt: skip
    alone.train()
    alone.on_epoch_start(9, 10)
    terms = alone(x, torch.tensor([0, 1, 2, 3]))
    assert "feature" not in terms and "anchor" in terms  # the anchor does not need the flow term
    with pytest.raises(ConfigError, match="anchor_weight"):
        flowdistill.make_distiller(
            "flowdistill", teacher, student, example_input=x, anchor_weight=-1.0, **TAPS
        )


def test_endpoints_are_the_adapted_student_and_standardised_teacher_features(pair):
    """``endpoints`` gives, per pair, the adapter output of the hooked student feature and
    the teacher feature standardised with the batch's per-channel statistics (training
    mode) as rows of positions, without gradients; the logits pair last."""
    teacher, student, x = pair
    feats = {}
    student.stage2.register_forward_hook(lambda m, i, o: feats.__setitem__("s", o.detach()))
    teacher.stage2.register_forward_hook(lambda m, i, o: feats.__setitem__("t", o.detach()))
    d = flowdistill.make_distiller("flowdistill", teacher, student, example_input=x, **TAPS)
    d.train()
    context, pairs = d.endpoints(x)
    assert [(k, s) for k, s, _, _ in pairs] == [("p0", "stage2"), ("p1", "logits")]
    _, _, a, t = pairs[0]
    rows = lambda m: m.flatten(2).transpose(1, 2)  # noqa: E731  (B, H*W, C)
    torch.testing.assert_close(a, rows(d.adapters["p0"](feats["s"])))
    mean = feats["t"].mean(dim=(0, 2, 3), keepdim=True)
    var = feats["t"].var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    torch.testing.assert_close(t, rows((feats["t"] - mean) / (var + 1e-5).sqrt()))
    assert not a.requires_grad and not t.requires_grad and context.shape[0] == len(x)
    torch.testing.assert_close(pairs[1][2], student(x))  # logits: the identity adapter
