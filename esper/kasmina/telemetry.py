"""Per-seed telemetry and the Prometheus metrics of the seed runtime.

Cheap by construction: activation statistics are running averages kept as 0-dim tensors (no device
sync in the training loop) and updated only on sampled steps (a slot's first forward, then every
`sample_every` steps for a live seed and every `idle_sample_every` steps for an idle slot); each
sample is one `torch.std_mean` over a strided subsample of at most `SAMPLE_ELEMENTS` elements of the
activation, so its cost does not grow with the activation. They become floats only when read.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from esper.kasmina.lifecycle import SeedState

if TYPE_CHECKING:
    import torch

_EMA = 0.1  # weight of a new sample in the running activation statistics
SAMPLE_ELEMENTS = 1024  # at most this many activation elements per statistics sample (~10 µs)


class KasminaMetrics:
    """The Prometheus metrics of seeds and kernel loads, registered in one registry."""

    def __deepcopy__(self, memo: dict[int, Any]) -> KasminaMetrics:
        """Shared, not copied: a deep copy of a wrapped model (an EMA copy, `copy.deepcopy` before
        export) reports into the same registry (a registry holds locks and cannot be copied)."""
        return self

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        self.seed_state = Gauge(
            "esper_seed_state", "1 for the seed's current state, 0 for the others.", ["seed", "state"],
            registry=reg,
        )  # fmt: skip
        self.seed_alpha = Gauge("esper_seed_alpha", "Blend factor of the seed.", ["seed"], registry=reg)
        self.seed_grad_norm = Gauge(
            "esper_seed_grad_norm", "L2 norm of the seed's parameter gradients (sampled).", ["seed"],
            registry=reg,
        )  # fmt: skip
        self.transitions = Counter(
            "esper_seed_transitions", "Seed state transitions, by the state entered.", ["seed", "state"],
            registry=reg,
        )  # fmt: skip
        self.kernel_load_seconds = Histogram(
            "esper_kernel_load_seconds", "Wall time of loading a kernel bundle (verify + load).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=reg,
        )  # fmt: skip
        self.seed_skipped_calls = Counter(
            "esper_seed_skipped_calls",
            "Evaluation calls (eval mode or no_grad) a seed was left out of because the input did not fit "
            "its kernel, by reason.", ["seed", "reason"], registry=reg,
        )  # fmt: skip
        self.kernel_load_failures = Counter(
            "esper_kernel_load_failures", "Refused or failed kernel loads, by reason.", ["reason"],
            registry=reg,
        )  # fmt: skip

    def set_state(self, seed: str, state: SeedState) -> None:
        for s in SeedState:
            self.seed_state.labels(seed=seed, state=s.value).set(1.0 if s is state else 0.0)

    def transition(self, seed: str, state: SeedState) -> None:
        self.transitions.labels(seed=seed, state=state.value).inc()
        self.set_state(seed, state)


_default: KasminaMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> KasminaMetrics:
    """The process-wide metrics on prometheus_client's default registry (created once)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = KasminaMetrics()
        return _default


@dataclass
class SeedTelemetry:
    """What a slot knows about itself; `to_json` is its entry in `status_json`."""

    name: str
    state: SeedState = SeedState.DORMANT
    alpha: float = 0.0
    kernel_key: str | None = None
    activation_shape: tuple[int, ...] | None = None
    activation_dtype: str | None = None
    activation_device: str | None = None
    act_mean: torch.Tensor | None = None
    act_std: torch.Tensor | None = None
    samples: int = 0
    grad_norm: torch.Tensor | None = None
    contribution: float | None = None
    last_error: str | None = None
    skipped_calls: int = 0  # evaluation calls the seed was left out of (input did not fit its kernel)
    last_skip: str | None = None
    load_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def observe(self, y: torch.Tensor) -> None:
        """Record the (detached) activation's per-sample shape, dtype and device, and fold a mean/std
        sample into the running statistics: `torch.std_mean` over every k-th element of the flattened
        activation (k odd, so that a power-of-two row length does not pin the sample to a few
        columns), at most SAMPLE_ELEMENTS elements."""
        import torch

        self.activation_shape = tuple(int(d) for d in y.shape[1:])
        self.activation_dtype = str(y.dtype).removeprefix("torch.")
        self.activation_device = str(y.device)
        n = y.numel()
        if n < 2 or not y.is_floating_point():
            return
        with torch.no_grad():
            flat = y.reshape(-1)
            if n > SAMPLE_ELEMENTS:
                flat = flat[:: (n // SAMPLE_ELEMENTS) | 1]
            std, mean = torch.std_mean(flat.float())
            if self.act_mean is None or self.act_std is None:
                self.act_mean, self.act_std = mean, std
            else:
                self.act_mean = self.act_mean.lerp(mean, _EMA)
                self.act_std = self.act_std.lerp(std, _EMA)
        self.samples += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "alpha": self.alpha,
            "kernelKey": self.kernel_key,
            "activationShape": list(self.activation_shape) if self.activation_shape is not None else None,
            "activationMean": _f(self.act_mean),
            "activationStd": _f(self.act_std),
            "samples": self.samples,
            "gradNorm": _f(self.grad_norm),
            "contribution": self.contribution,
            "lastError": self.last_error,
            "skippedCalls": self.skipped_calls,
            "lastSkip": self.last_skip,
            "loadSeconds": self.load_seconds,
            **self.extra,
        }


def _f(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t)
