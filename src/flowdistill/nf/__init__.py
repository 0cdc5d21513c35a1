"""Normalizing-flow density models and their distillation into smaller flows.

A deep multi-scale flow (the teacher) is distilled into a shallow one (the student) of the
same levels: the student's own negative log-likelihood plus intermediate-latent,
final-latent and synthesized-sample terms (:mod:`.losses`).

>>> import torch
>>> from flowdistill.nf import MultiScaleFlow, dequantize
>>> flow = MultiScaleFlow((1, 8, 8), levels=2, steps=2, hidden=8)
>>> y = dequantize(torch.randint(0, 17, (4, 1, 8, 8)), n_bins=17)
>>> out = flow.encode(y)
>>> [tuple(e.shape) for e in out.noise], out.log_prob.shape
([(4, 2, 4, 4), (4, 8, 2, 2)], torch.Size([4]))
>>> torch.allclose(flow.decode(out.noise), y, atol=1e-4)
True
"""

from __future__ import annotations

from .data import ImageData, digits_images, mnist_test_images
from .losses import check_pair, final_latent_kd, intermediate_latent_kd, synthesized_kd
from .model import (
    FlowOutput,
    FlowStep,
    LogitTransform,
    MultiScaleFlow,
    SplitPrior,
    bits_per_dim,
    dequantize,
)
from .train import (
    FlowDistiller,
    FlowFitResult,
    FlowKDConfig,
    FlowTrainConfig,
    evaluate_bpd,
    fit_flow,
    sampling_throughput,
)

__all__ = [
    "FlowDistiller",
    "FlowFitResult",
    "FlowKDConfig",
    "FlowOutput",
    "FlowStep",
    "FlowTrainConfig",
    "ImageData",
    "LogitTransform",
    "MultiScaleFlow",
    "SplitPrior",
    "bits_per_dim",
    "check_pair",
    "dequantize",
    "digits_images",
    "evaluate_bpd",
    "final_latent_kd",
    "fit_flow",
    "intermediate_latent_kd",
    "mnist_test_images",
    "sampling_throughput",
    "synthesized_kd",
]
