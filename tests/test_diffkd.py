"""DiffKD: the DDIM schedule, denoising, shapes, gradient routing, options and errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flowdistill
from flowdistill.distillers.diffkd import (
    DiffusionBranch,
    add_noise,
    alphas_cumprod,
    ddim_step,
    ddim_timesteps,
    linear_betas,
    mix_noise,
    sinusoidal_embedding,
    to_nchw,
)
from flowdistill.errors import ConfigError, ShapeMismatchError
from flowdistill.models.small import SmallCNN, digits_student, digits_teacher

TAPS = {"student_taps": ["stage2"], "teacher_taps": ["stage2"]}
Y = torch.tensor([0, 1, 2, 3])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors (and hundreds of denoiser steps): intra-op threads only add fork/join
    overhead here, and stall badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make(teacher, student, x, **options):
    return flowdistill.make_distiller("diffkd", teacher, student, example_input=x, **options)


class _Tokens(nn.Module):
    """Rows of an 8×8 image as 8 tokens of width ``d``, mean-pooled into 4 logits."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.embed(x.flatten(1, 2)).mean(1))  # (B, 1, 8, 8) -> (B, 8, d)


# ---------------------------------------------------------------------- schedule math
def test_linear_schedule_and_alpha_bar_match_closed_forms():
    betas = linear_betas(1000)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    step = (0.02 - 1e-4) / 999
    for t in (0, 1, 499, 999):
        assert betas[t].item() == pytest.approx(1e-4 + t * step, rel=1e-12)
    abar = alphas_cumprod(betas)
    for t in (0, 1, 10, 399, 999):
        closed = math.prod(1 - (1e-4 + s * step) for s in range(t + 1))
        assert abar[t].item() == pytest.approx(closed, rel=1e-10)
    assert bool((abar[1:] < abar[:-1]).all()) and 0 < abar[-1] < 1e-4
    branch = DiffusionBranch(
        (4,),
        (4,),
        kind="mlp",
        use_ae=False,
        ae_channels=None,
        num_train_timesteps=1000,
        inference_steps=5,
    )
    torch.testing.assert_close(branch.alphas_cumprod, abar.float())


def test_ddim_timesteps_are_the_last_half_of_a_double_length_schedule():
    assert ddim_timesteps(1000, 5) == [400, 300, 200, 100, 0]
    assert ddim_timesteps(1000, 1) == [0]
    assert ddim_timesteps(1000, 10) == [450 - 50 * i for i in range(10)]
    for bad in (0, 501):
        with pytest.raises(ConfigError, match="inference_steps"):
            ddim_timesteps(1000, bad)


def test_ddim_step_with_the_true_noise_recovers_x0_exactly():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 5, 2, 2, generator=g, dtype=torch.float64)
    abar = alphas_cumprod(linear_betas(1000))
    for t, prev in ((400, 300), (100, 0), (999, 500)):
        x_prev, x0_hat = ddim_step(add_noise(x0, eps, abar[t]), eps, abar[t], abar[prev])
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(x_prev, add_noise(x0, eps, abar[prev]), rtol=0, atol=1e-12)
    x_last, _ = ddim_step(add_noise(x0, eps, abar[0]), eps, abar[0], 1.0)
    torch.testing.assert_close(x_last, x0, rtol=0, atol=1e-12)


def test_the_ddim_chain_with_an_oracle_denoiser_returns_x0():
    """The default 5-step chain (t = 400 … 0) walks the true trajectory back to x0."""
    branch = DiffusionBranch(
        (5, 2, 2),
        (5, 2, 2),
        kind="conv",
        use_ae=False,
        ae_channels=None,
        num_train_timesteps=1000,
        inference_steps=5,
    )
    x0, eps = torch.randn(3, 5, 2, 2), torch.randn(3, 5, 2, 2)

    class Oracle(nn.Module):
        def forward(self, x, t):
            return eps

    branch.denoiser = Oracle()
    x_t = add_noise(x0, eps, branch.alphas_cumprod[400])
    torch.testing.assert_close(branch.denoise(x_t), x0, rtol=0, atol=1e-5)


def test_noising_and_mixing_are_per_sample():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    w = torch.tensor([0.0, 1.0, 0.25])
    mixed = mix_noise(x, eps, w)
    torch.testing.assert_close(mixed[0], eps[0])
    torch.testing.assert_close(mixed[1], x[1])
    torch.testing.assert_close(mixed[2], 0.25 * x[2] + 0.75 * eps[2])
    noisy = add_noise(x, eps, w)
    torch.testing.assert_close(noisy[2], 0.5 * x[2] + 0.75**0.5 * eps[2])


def test_time_embedding_starts_sinusoidal_or_random():
    emb = sinusoidal_embedding(1000, 5)
    assert emb.shape == (1000, 5) and emb.abs().max() <= 1
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
    common = {
        "kind": "mlp",
        "use_ae": False,
        "ae_channels": None,
        "num_train_timesteps": 1000,
        "inference_steps": 5,
    }
    sin = DiffusionBranch((5,), (5,), **common).denoiser.time_embedding.weight
    rnd = DiffusionBranch((5,), (5,), time_embedding="random", **common)
    torch.testing.assert_close(sin.detach(), emb)
    assert not torch.allclose(rnd.denoiser.time_embedding.weight, emb)


# ---------------------------------------------------------------------- the denoiser learns
def _fixed_teacher_batch(tap: str) -> tuple[DiffusionBranch, torch.Tensor]:
    """A branch and a fixed batch of 16 standardised teacher features (4 classes)."""
    torch.manual_seed(0)
    teacher, student = SmallCNN(1, 4, (16, 32, 32)), SmallCNN(1, 4, (4, 4, 8))
    y = torch.arange(16) % 4
    x = torch.randn(16, 1, 8, 8) * 0.2
    for k in range(4):
        x[y == k, 0, 2 * k : 2 * k + 2, :] += 1.5
    d = _make(teacher, student, x[:4], student_taps=[tap], teacher_taps=[tap], use_ae=False)
    x0 = to_nchw(d.teacher_forward(x)[tap])
    x0 = (x0 - x0.mean((0, 2, 3), keepdim=True)) / (x0.std((0, 2, 3), keepdim=True) + 1e-3)
    return d.branches[0], x0


@pytest.mark.parametrize(
    ("tap", "steps", "lr", "chain"),
    [("stage2", 600, 1e-2, None), ("pool", 800, 1e-2, [200, 100, 0])],
    ids=["map-conv-denoiser", "vector-mlp-denoiser"],
)
def test_the_denoiser_learns_to_denoise_a_fixed_teacher_batch(tap, steps, lr, chain):
    """Noise prediction on a fixed batch falls well below its start, and the DDIM chain then
    brings a noised copy of the batch closer to it than the noisy input: from the method's
    own start (t = 400) for maps; from t = 200 for the MLP denoiser, which memorises a
    batch more slowly (measured: MSE ratio ~0.4 for maps, ~0.6 for vectors)."""
    branch, x0 = _fixed_teacher_batch(tap)
    opt = torch.optim.Adam(branch.denoiser.parameters(), lr=lr)

    def held_out_noise_loss() -> float:
        state = torch.get_rng_state()
        torch.manual_seed(123)
        with torch.no_grad():
            loss = sum(branch.noise_loss(x0).item() for _ in range(10)) / 10
        torch.set_rng_state(state)
        return loss

    first = held_out_noise_loss()
    for _ in range(steps):
        loss = branch.noise_loss(x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_noise_loss() < 0.5 * first
    # noise the batch to the chain's first timestep and run the DDIM chain back
    start = 400 if chain is None else chain[0]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = add_noise(x0, eps, branch.alphas_cumprod[start])
    branch.eval()
    with torch.no_grad():
        denoised = branch.denoise(x_t, chain)
    assert F.mse_loss(denoised, x0) < 0.8 * F.mse_loss(x_t, x0)


# ---------------------------------------------------------------------- the method
def test_map_pair_terms_shapes_and_weights(pair):
    teacher, student, x = pair
    d = _make(teacher, student, x, **TAPS)
    (branch,) = d.branches
    assert branch.latent_shape == (4, 2, 2)  # 8 teacher channels halved by the autoencoder
    assert branch.timesteps == [400, 300, 200, 100, 0]
    d.train()
    terms = d(x, Y)
    assert set(terms) == {"ce", "feat", "diff_feat", "ae", "logit", "diff_logit", "loss"}
    assert all(torch.isfinite(v) for v in terms.values())
    s = d.student_forward(x)["stage2"]
    refined, target, _, rec, gamma = branch(s, d.teacher_forward(x)["stage2"])
    assert refined.shape == target.shape == (4, 4, 2, 2) and rec is not None
    assert gamma.shape == (4,) and bool(((gamma > 0) & (gamma < 1)).all())
    assert not target.requires_grad  # the autoencoder latent is a detached target
    torch.manual_seed(5)
    base = d(x, Y)
    d.feat_weight, d.diff_weight, d.ae_weight, d.logit_weight = 2.0, 3.0, 0.5, 0.0
    torch.manual_seed(5)
    scaled = d(x, Y)
    for key, w in (("feat", 2.0), ("diff_feat", 3.0), ("diff_logit", 3.0), ("ae", 0.5)):
        torch.testing.assert_close(scaled[key], w * base[key])
    assert scaled["logit"].item() == 0.0
    assert 0 < d.diagnostics()["diffkd_gamma"] < 1
    d.on_epoch_start(1, 2)
    assert d.diagnostics() == {}


def test_vector_and_token_pairs_use_the_mlp_denoiser(pair):
    teacher, student, x = pair
    d = _make(teacher, student, x, student_taps=["pool"], teacher_taps=["pool"], ae_channels=6)
    (branch,) = d.branches
    assert branch.latent_shape == (6,) and not any(
        isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in branch.modules()
    )
    assert set(d(x, Y)) >= {"feat", "diff_feat", "ae", "logit", "diff_logit"}
    d(x[:1], Y[:1])  # a batch of one vector trains too
    torch.manual_seed(0)
    tok_t, tok_s = _Tokens(12), _Tokens(6)
    d = _make(tok_t, tok_s, x, student_taps=["embed"], teacher_taps=["embed"])
    (branch,) = d.branches
    assert branch.latent_shape == (8, 6)
    refined, target, *_ = branch(tok_s.embed(x.flatten(1, 2)), tok_t.embed(x.flatten(1, 2)))
    assert refined.shape == target.shape == (4, 6, 8, 1)  # per-token channels first
    terms = d(x, Y)
    terms["loss"].backward()
    assert tok_s.embed.weight.grad is not None and tok_s.embed.weight.grad.abs().sum() > 0


def test_gradients_reach_the_student_and_every_diffusion_module(pair):
    teacher, student, x = pair
    d = _make(teacher, student, x, **TAPS)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d.train()
    d(x, Y)["loss"].backward()
    for name in ("stage1.0.weight", "stage2.0.weight", "fc.weight"):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    for branch in (d.branches[0], d.logit_branch):
        for part in ("trans", "denoiser", "noise_adapter", "proj"):
            grads = [p.grad for p in getattr(branch, part).parameters()]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), part
    for part in (d.branches[0].ae.encoder, d.branches[0].ae.decoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_feature_grads_flow_through_the_denoising_chain(pair):
    """With only the feature term, the student's stage2 still learns (via trans → DDIM)."""
    teacher, student, x = pair
    d = _make(
        teacher,
        student,
        x,
        **TAPS,
        ce_weight=0.0,
        diff_weight=0.0,
        ae_weight=0.0,
        distill_logits=False,
    )
    terms = d(x, Y)
    assert set(terms) == {"ce", "feat", "diff_feat", "ae", "loss"}
    terms["loss"].backward()
    assert student.stage2[0].weight.grad.abs().sum() > 0
    assert student.fc.weight.grad is None or student.fc.weight.grad.abs().sum() == 0
    assert d.branches[0].denoiser.time_embedding.weight.grad.abs().sum() > 0


def test_predict_is_the_plain_student_and_extra_params_are_counted(pair):
    teacher, student, x = pair
    d = _make(teacher, student, x, **TAPS)
    d.eval()
    torch.testing.assert_close(d.predict(x), student.eval()(x))
    assert d.deployed_modules() == [student]
    branches = [*d.branches, d.logit_branch]
    extra = sum(p.numel() for b in branches for p in b.parameters())
    assert d.num_extra_params() == extra > 0
    assert d.num_deployed_params() == sum(p.numel() for p in student.parameters())
    no_ae = _make(teacher, student, x, **TAPS, use_ae=False)
    assert no_ae.branches[0].ae is None and "ae" not in no_ae(x, Y)
    assert no_ae.branches[0].latent_shape == (8, 2, 2)
    logits_only = _make(teacher, student, x)  # default taps: the logit branch alone
    assert len(logits_only.branches) == 0
    assert set(logits_only(x, Y)) == {"ce", "logit", "diff_logit", "loss"}


def test_digits_pair_extra_parameter_count():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    d = _make(digits_teacher(), digits_student(), x, **TAPS)
    # stage2: student 6 -> latent 12 (teacher 24 halved), logits 10 -> 10
    assert d.branches[0].latent_shape == (12, 2, 2)
    assert d.num_extra_params() == sum(
        p.numel() for m in (d.branches, d.logit_branch) for p in m.parameters()
    )
    # dominated by the two time embeddings, 1000 × 12 and 1000 × 10
    assert d.num_extra_params() == 26_227


def test_errors_are_clear(pair):
    teacher, student, x = pair
    with pytest.raises(ShapeMismatchError, match="'stage2'.*'pool'"):
        _make(teacher, student, x, student_taps=["stage2"], teacher_taps=["pool"])
    with pytest.raises(ConfigError, match="pair up"):
        _make(teacher, student, x, student_taps=["stage2", "stage3"], teacher_taps=["stage2"])
    with pytest.raises(ConfigError, match="nothing to distill"):
        _make(teacher, student, x, distill_logits=False)
    for bad in (
        {"tau": 0.0},
        {"inference_steps": 0},
        {"inference_steps": 501},
        {"ae_channels": 0},
        {"time_embedding": "learned"},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            _make(teacher, student, x, **TAPS, **bad)
    with pytest.raises(ConfigError, match="example_input"):
        flowdistill.make_distiller("diffkd", teacher, student, **TAPS)
