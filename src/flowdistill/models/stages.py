"""The feature stages a model declares, whoever wrote it: this project's zoo or timm."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..errors import ConfigError
from .cifar import FeatureInfo

__all__ = ["feature_stages"]


def feature_stages(model: nn.Module) -> list[FeatureInfo]:
    """The feature stages of ``model``, shallow to deep, known before any forward pass:
    module path (a :class:`~flowdistill.taps.FeatureTaps` name), channels and stride.

    Zoo models declare them with a ``feature_info()`` method; timm models carry a
    ``feature_info`` list of ``{"module", "num_chs", "reduction"}`` entries, which map
    onto the same three fields. Any other module has no declared stages: name its taps
    by module path and read their shapes with :meth:`FeatureTaps.probe`."""
    info = getattr(model, "feature_info", None)
    if callable(info):
        return list(info())
    if isinstance(info, (list, tuple)) and all(isinstance(e, Mapping) for e in info):
        stages = []
        for entry in info:
            missing = {"module", "num_chs", "reduction"} - set(entry)
            if missing:
                raise ConfigError(
                    f"{type(model).__name__}.feature_info has an entry without "
                    f"{sorted(missing)}: {dict(entry)}"
                )
            stages.append(
                FeatureInfo(
                    name=str(entry["module"]),
                    channels=int(entry["num_chs"]),
                    stride=int(entry["reduction"]),
                )
            )
        return stages
    raise ConfigError(
        f"{type(model).__name__} declares no feature stages (no feature_info); name its taps "
        "by module path and read their shapes with FeatureTaps.probe"
    )
