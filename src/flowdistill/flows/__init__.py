r"""Flows: probability paths, velocity networks, ODE solvers and invertible maps.

Time convention: ``t = 0`` is the source ``x0`` (student features / noise) and ``t = 1``
the target ``x1`` (teacher features / data); paths are ``x_t = alpha_t x1 + sigma_t x0``
with velocity ``dx_t = alpha'_t x1 + sigma'_t x0``.  The package depends only on torch
(torchdiffeq is optional).

Public names, each with a short example (they run as doctests):

Paths and schedulers (:mod:`.paths`) -- ``Scheduler``, ``SchedulerOutput``,
``StraightScheduler``, ``VPScheduler``, ``VEScheduler``, ``AffinePath``, ``StraightPath``,
``VPPath``, ``VEPath``, ``PathSample``, ``get_path``, ``PATHS``, ``PREDICTION_TYPES``:

>>> import torch
>>> from flowdistill.flows import StraightPath, VPPath, VEPath, AffinePath, get_path
>>> from flowdistill.flows import StraightScheduler, VPScheduler, VEScheduler
>>> x0, x1, t = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
>>> s = StraightPath().sample(x0, x1, t)            # PathSample(x_t, dx_t, t, x0, x1)
>>> torch.allclose(s.dx_t, x1 - x0)
True
>>> c = VPScheduler("cosine")(torch.tensor([0.0, 1.0]))   # SchedulerOutput
>>> [round(v, 6) for v in c.alpha_t.tolist()]
[0.0, 1.0]
>>> round(VEScheduler(sigma_min=0.01, sigma_max=10.0)(torch.tensor(1.0)).sigma_t.item(), 6)
0.01
>>> path = AffinePath(StraightScheduler(sigma_min=1e-4))
>>> s = path.sample(x0, x1, t)
>>> torch.allclose(path.velocity_to_x1(s.dx_t, s.x_t, t), x1, atol=1e-5)
True
>>> vp = VPPath("linear"); s = vp.sample(x0, x1, t)
>>> torch.allclose(vp.convert(s.dx_t, s.x_t, t, "velocity", "noise"), x0, atol=1e-4)
True
>>> type(get_path("ve", sigma_max=5.0)).__name__, "noise" in PREDICTION_TYPES
('VEPath', True)

Velocity networks (:mod:`.nets`) -- ``MLPVelocity``, ``ConvVelocity``, ``TokenVelocity``,
``TimeEmbedding``, ``ConditionEmbedding``, ``FiLM``; all called as
``net(x, t, context=None)`` and zero at initialisation:

>>> from flowdistill.flows import MLPVelocity, ConvVelocity, TokenVelocity
>>> from flowdistill.flows import TimeEmbedding, ConditionEmbedding, FiLM
>>> v = MLPVelocity(3, hidden=32, depth=2, cond_dim=5)
>>> out = v(x0, 0.3, context=torch.eye(5)[:4])
>>> out.shape, bool((out == 0).all())
(torch.Size([4, 3]), True)
>>> ConvVelocity(4, hidden=16)(torch.randn(2, 4, 8, 8), torch.rand(2)).shape
torch.Size([2, 4, 8, 8])
>>> TokenVelocity(6, hidden=16, heads=2)(torch.randn(2, 5, 6), torch.tensor(0.5)).shape
torch.Size([2, 5, 6])
>>> TimeEmbedding(8)(torch.rand(4)).shape
torch.Size([4, 8])
>>> ConditionEmbedding(16, cond_dim=5)(0.5, x0, context=torch.randn(4, 5)).shape
torch.Size([4, 16])
>>> FiLM(16, 3)(x0, torch.randn(4, 16)).shape
torch.Size([4, 3])

Solvers (:mod:`.solvers`) -- ``odeint``, ``SOLVERS``, ``register_solver``, ``Solver``,
``FixedStepSolver``, ``Euler``, ``Midpoint``, ``Heun``, ``RK4``, ``Dopri5``:

>>> from flowdistill.flows import odeint, SOLVERS
>>> ts = torch.linspace(0, 1, 3, dtype=torch.float64)
>>> xs = odeint(lambda t, x: -x, torch.ones(2, dtype=torch.float64), ts, method="dopri5")
>>> xs.shape, abs(xs[-1, 0].item() - torch.e ** -1) < 1e-6
(torch.Size([3, 2]), True)
>>> xs = odeint(lambda t, x: -x, torch.ones(2), ts.float(), "rk4", options={"step_size": 0.1})
>>> sorted(SOLVERS)
['dopri5', 'euler', 'heun', 'midpoint', 'rk4']

Invertible flow map (:mod:`.flowmap`) -- ``FlowMap``, ``ESTIMATORS``:

>>> from flowdistill.flows import FlowMap
>>> flow = FlowMap(MLPVelocity(3, hidden=16, depth=1), steps=4, method="rk4")
>>> y = flow(x0)                                  # t: 0 -> 1
>>> torch.allclose(flow.inverse(y), x0)           # a fresh flow is the identity
True
>>> y, logdet = flow.forward_and_logdet(x0, estimator="exact")
>>> logdet.shape
torch.Size([4])
>>> normal = torch.distributions.Normal(0.0, 1.0)
>>> flow.log_prob(y, lambda z: normal.log_prob(z).sum(-1)).shape
torch.Size([4])
>>> flow.trajectory(x0).shape                     # (steps + 1, B, D)
torch.Size([5, 4, 3])

Invertible layers (:mod:`.layers`; ``forward(x) -> (y, logdet)`` maps data -> latent) --
``AffineCoupling``, ``ActNorm``, ``InvConv1x1``, ``Squeeze``, ``squeeze2d``,
``unsqueeze2d``, ``InvertibleSequence``, ``InvertibleLayer``:

>>> from flowdistill.flows import AffineCoupling, ActNorm, InvConv1x1, Squeeze
>>> from flowdistill.flows import InvertibleSequence, squeeze2d, unsqueeze2d
>>> img = torch.randn(2, 4, 8, 8)
>>> nf = InvertibleSequence(ActNorm(4), InvConv1x1(4), AffineCoupling(4, kind="conv"),
...                         Squeeze())
>>> z, logdet = nf(img)
>>> z.shape, logdet.shape
(torch.Size([2, 16, 4, 4]), torch.Size([2]))
>>> torch.allclose(nf.inverse(z), img, atol=1e-5)
True
>>> torch.equal(unsqueeze2d(squeeze2d(img)), img)
True
"""

from .flowmap import ESTIMATORS, FlowMap
from .layers import (
    ActNorm,
    AffineCoupling,
    InvConv1x1,
    InvertibleLayer,
    InvertibleSequence,
    Squeeze,
    squeeze2d,
    unsqueeze2d,
)
from .nets import (
    ConditionEmbedding,
    ConvVelocity,
    FiLM,
    MLPVelocity,
    TimeEmbedding,
    TokenVelocity,
)
from .paths import (
    PATHS,
    PREDICTION_TYPES,
    AffinePath,
    PathSample,
    Scheduler,
    SchedulerOutput,
    StraightPath,
    StraightScheduler,
    VEPath,
    VEScheduler,
    VPPath,
    VPScheduler,
    get_path,
)
from .solvers import (
    RK4,
    SOLVERS,
    Dopri5,
    Euler,
    FixedStepSolver,
    Heun,
    Midpoint,
    Solver,
    odeint,
    register_solver,
)

__all__ = [
    # paths
    "PATHS",
    "PREDICTION_TYPES",
    "AffinePath",
    "PathSample",
    "Scheduler",
    "SchedulerOutput",
    "StraightPath",
    "StraightScheduler",
    "VEPath",
    "VEScheduler",
    "VPPath",
    "VPScheduler",
    "get_path",
    # nets
    "ConditionEmbedding",
    "ConvVelocity",
    "FiLM",
    "MLPVelocity",
    "TimeEmbedding",
    "TokenVelocity",
    # solvers
    "RK4",
    "SOLVERS",
    "Dopri5",
    "Euler",
    "FixedStepSolver",
    "Heun",
    "Midpoint",
    "Solver",
    "odeint",
    "register_solver",
    # flow map
    "ESTIMATORS",
    "FlowMap",
    # layers
    "ActNorm",
    "AffineCoupling",
    "InvConv1x1",
    "InvertibleLayer",
    "InvertibleSequence",
    "Squeeze",
    "squeeze2d",
    "unsqueeze2d",
]
