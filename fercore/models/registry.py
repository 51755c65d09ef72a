"""The registry behind ``create_model``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fercore.labels import NUM_CLASSES

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


@dataclass(frozen=True)
class ModelConfig:
    """What is needed to rebuild a model: its registry name and keyword arguments.

    Stored in checkpoints, so serving rebuilds exactly the network training saved.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, num_classes: int = NUM_CLASSES) -> nn.Module:
        return create_model(self.name, num_classes=num_classes, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(name=str(data["name"]), kwargs=dict(data.get("kwargs", {})))


def register_model(fn: ModelFactory) -> ModelFactory:
    """Decorator: register ``fn`` under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = NUM_CLASSES, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``name`` for 1-channel 48x48-style input."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    try:
        return factory(num_classes=num_classes, **kwargs)
    except TypeError as exc:  # unknown keyword: say which model and what it got
        raise ValueError(f"bad arguments for model {name!r}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
