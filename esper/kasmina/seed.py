"""Seed slots: points of a host model where a kernel can be grown in, trained, blended and kept.

Forward by state (y is the host output at the slot, s = seed(y)):

- DORMANT, GERMINATED, CULLED: `y` itself (one attribute check; bit-identical to the bare host).
- TRAINING: the seed learns in isolation. It sees `y.detach()`; the output is `_Isolate(y, s)`, a custom
  autograd Function whose value is an exact copy of `y` and whose backward hands the incoming gradient
  `g` unchanged to both `y` and `s`. The host's outputs and gradients are bit-identical to the bare
  host, and the seed gets d loss/d y as its signal: exactly what it would get as the slot's output,
  i.e. at alpha = 1 where the slot computes `s` (with the host held at its current `y`). Chosen over
  `y + (s - s.detach())` because a seed that produces inf/NaN would turn that into NaN in the host;
  here the seed's values never reach the output. Caveat: a copy of `y` per step (a view would forbid
  in-place ops after the slot), and the seed's signal ignores its own effect on the loss.
  Under no_grad (evaluation) the seed is not run at all.
- BLENDING: convex blending, `y + alpha * (s - y)` (= (1 - alpha) y + alpha s), alpha rising linearly
  0 -> 1 over `blend_steps` optimizer steps (at alpha = 1 the output is `s` itself).
- FOSSILIZED: `s`; the seed is now part of the model (state_dict included).

So the seed *replaces* the activation once blended in. A residual Blueprint (`x + f(x)`: most
templates) therefore starts from the identity plus its branch and ends as `y + f(y)`; a non-residual
one (`mlp`, `lora-adapter`, which outputs only its delta) ends as a full replacement of `y`.

A seed that raises in TRAINING or BLENDING is culled on the spot and the slot returns `y`: a bad
kernel costs the seed, never the training run.

Kernel guard: a compiled kernel checks every call (KernelShapeError: shape, dtype, device; see
kernel.py). What a mismatch does depends on the call: in eval mode or under no_grad (evaluation,
sampling, generation at another sequence length) the seed is left out of that call (the slot returns
`y`), counted in `telemetry.skipped_calls` and `esper_seed_skipped_calls`, and warned about once per
installed kernel; in training mode it culls a TRAINING or BLENDING seed with the error as the reason,
and raises for a FOSSILIZED one (a fossil is part of the model: its failure is the model's). Germination
checks the kernel against the slot's recorded activation (a slot that has seen a forward) or its
declared shape (`wrap(..., shapes={...})`); a slot with neither checks at the first forward after
germination, with the same rules (a wrong kernel is culled before it produces any output).

When to swap kernels: `germinate` installs at once by default. That is safe even mid-step, because a
dormant slot put nothing of a seed into the pending autograd graph; the caller then adds
`slot.seed_parameters()` to its optimizer. `defer=True` stages the kernel and installs it at the next
`step()` boundary instead (for callers that germinate from another thread or between forward and
backward and want the swap on the step edge).

Cost of an idle slot (dormant, germinated, culled): the forward is the host call plus one flag check;
`step()` is one counter increment and one comparison (the counters live in a plain object, not in
nn.Module attributes). Activation telemetry is taken at the first forward (shape, dtype, device and
one mean/std sample), then every `idle_sample_every` steps for an idle slot and every `sample_every`
steps for a live seed (with its gradient norm); mean/std come from one `torch.std_mean` over a strided
subsample of at most 1024 elements (see telemetry.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from esper.kasmina.kernel import (
    KernelLoadError,
    KernelModule,
    KernelShapeError,
    KernelShapeWarning,
    from_module,
    kernel_key_of,
    load_kernel,
)
from esper.kasmina.lifecycle import (
    IDENTITY_STATES,
    KERNEL_STATES,
    IllegalTransition,
    Lifecycle,
    SeedState,
    Transition,
)
from esper.kasmina.telemetry import KasminaMetrics, SeedTelemetry, default_metrics

log = logging.getLogger("esper.kasmina")

S = SeedState
KernelSource = nn.Module | Callable[[], nn.Module] | str | os.PathLike[str]
KernelResolver = Callable[[str], nn.Module]
EXTRA_STATE_VERSION = 1
_NEVER = 1 << 62  # a step an idle slot never reaches (no idle sampling)
_generation = 0  # bumped by every SeedSlot created: invalidates step_slots' cached slot lists
_slot_cache: weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[SeedSlot, ...]]] = (
    weakref.WeakKeyDictionary()
)


class KernelRestoreError(RuntimeError):
    """A checkpoint names a seed kernel this slot cannot rebuild (no resolver, or it failed)."""


class _Isolate(torch.autograd.Function):
    """Value: a copy of y. Gradient: g to y and g to s (the seed learns; the host is untouched)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return y.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return g, g


def blend(y: torch.Tensor, s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Convex blend of the host activation `y` and the seed output `s`: `y + alpha * (s - y)`;
    `s` itself at alpha >= 1 (the fossil's output, bit for bit)."""
    return s if alpha >= 1.0 else y + alpha * (s - y)


class _Counters:
    """The slot's per-step numbers, in a plain object: `step()` updates them without going through
    nn.Module.__setattr__ (several µs per assignment). `wake`: the next global step at which `step()`
    has work to do (0: every step)."""

    __slots__ = ("alpha", "blend_step", "global_step", "state_start", "wake")

    def __init__(self) -> None:
        self.alpha = 0.0
        self.blend_step = 0
        self.global_step = 0
        self.state_start = 0  # global_step when the current state was entered
        self.wake = 0


class SeedSlot(nn.Module):
    """A host submodule (or an identity, if `module` is None) followed by a seed point."""

    def __init__(
        self,
        name: str,
        module: nn.Module | None = None,
        *,
        blend_steps: int = 100,
        sample_every: int = 10,
        idle_sample_every: int = 200,
        metrics: KasminaMetrics | None = None,
        kernel_resolver: KernelResolver | None = None,
        shape: Sequence[int] | None = None,
        per_token: bool = False,
        causal: bool = False,
    ) -> None:
        """`shape`: the per-sample activation shape (batch excluded) the slot will see, if known: lets
        germination refuse a kernel that cannot fit before the slot's first forward.

        `per_token`: the seed sees every position on its own: an activation `[B, T, ..., F]` is
        flattened to `[B*T*..., F]` for the kernel and its output reshaped back, so a position-wise
        kernel compiled for `[batch, F]` serves any sequence length (generation with a KV cache
        included); its `maxBatch` then bounds `B*T`. Such a seed cannot mix positions.
        `causal`: the host is causal (a language model): germination refuses a kernel that does not
        declare itself causal (see `esper.kasmina.causality`); a per-token slot accepts any kernel.
        """
        super().__init__()
        if blend_steps < 1:
            raise ValueError("blend_steps must be >= 1")
        if shape is not None and not all(isinstance(d, int) and d >= 1 for d in shape):
            raise ValueError(f"shape must be positive ints (the per-sample shape, no batch), got {shape!r}")
        self.declared_shape = None if shape is None else tuple(shape)
        self.per_token = bool(per_token)
        self.causal = bool(causal)
        if module is not None:
            _check_host_names(name, module)
        global _generation
        _generation += 1
        self._c = _Counters()
        self.name = name
        self.add_module("host", module)  # registered even when None: forward reads _modules["host"]
        self.seed: nn.Module | None
        self.add_module("seed", None)
        self.blend_steps = blend_steps
        self.sample_every = sample_every  # live seed: grad norm + activation stats every N steps
        self.idle_sample_every = idle_sample_every  # idle slot: activation stats every N steps
        self.kernel_resolver = kernel_resolver
        self.metrics = metrics if metrics is not None else default_metrics()
        self.telemetry = SeedTelemetry(name)
        self.lifecycle = Lifecycle(name, on_transition=self._on_transition)
        self._alpha_override: float | None = None
        self._pending: tuple[nn.Module, str] | None = None
        self._observe_due = True  # the first forward records the activation shape
        self._verify_due = False  # a kernel installed on an unseen slot: check it at the first forward
        self._warned_skip = False  # one warning per installed kernel for calls it is left out of
        self._passthrough = False
        self.metrics.set_state(name, S.DORMANT)
        self._register_state_dict_hook(self._host_keys_out)
        self._register_load_state_dict_pre_hook(self._host_keys_in, with_module=True)

    # ---- counters (plain attributes of self._c; properties for readers and restore) -------------

    @property
    def alpha(self) -> float:
        return self._c.alpha

    @alpha.setter
    def alpha(self, v: float) -> None:
        self._c.alpha = float(v)

    @property
    def blend_step(self) -> int:
        return self._c.blend_step

    @blend_step.setter
    def blend_step(self, v: int) -> None:
        self._c.blend_step = int(v)

    @property
    def global_step(self) -> int:
        return self._c.global_step

    @global_step.setter
    def global_step(self, v: int) -> None:
        c = self._c
        c.state_start += int(v) - c.global_step  # keep steps_in_state
        c.global_step = int(v)
        self._refresh()

    @property
    def steps_in_state(self) -> int:
        return self._c.global_step - self._c.state_start

    @steps_in_state.setter
    def steps_in_state(self, v: int) -> None:
        self._c.state_start = self._c.global_step - int(v)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # `_modules["host"]`, not `self.host`: nn.Module.__getattr__ costs ~0.9 µs per lookup.
        host = self._modules["host"]
        y = args[0] if host is None else host(*args, **kwargs)
        if self._passthrough:
            return y
        return self._seed_forward(y)

    def _seed_forward(self, y: Any) -> Any:
        if not isinstance(y, torch.Tensor):
            return y
        if self._observe_due:
            self.telemetry.observe(y.detach())
            object.__setattr__(self, "_observe_due", False)
            self._refresh()
        state, seed = self.lifecycle.state, self.seed
        if seed is None or state not in KERNEL_STATES:
            return y
        if self._verify_due and not self._verify(seed, y, state):
            return y
        if self._alpha_override is not None:
            a = self._alpha_override
            if a == 0.0:
                return y
            s = self._call(seed, y, y, state)
            return y if s is None else blend(y, s, a)
        if state in IDENTITY_STATES:
            return y
        if state is S.TRAINING:
            if not torch.is_grad_enabled():
                return y
            s = self._call(seed, y.detach(), y, state)
            return y if s is None else _Isolate.apply(y, s)
        s = self._call(seed, y, y, state)
        if s is None:
            return y
        return blend(y, s, self._c.alpha) if state is S.BLENDING else s  # FOSSILIZED: s replaces y

    def _call(
        self, seed: nn.Module, x: torch.Tensor, y: torch.Tensor, state: SeedState
    ) -> torch.Tensor | None:
        """Run the seed on `x`; None means "leave it out, return y": a mismatch handled by
        `_mismatch`, or any other failure of a live seed (culled). A fossil's failures propagate."""
        try:
            if self.per_token and x.dim() > 2:
                s = seed(x.reshape(-1, x.shape[-1]))
                if isinstance(s, torch.Tensor) and s.dim() == 2 and s.shape[0] == y.shape[:-1].numel():
                    s = s.reshape(*y.shape[:-1], s.shape[-1])
            else:
                s = seed(x)
        except KernelShapeError as e:
            self._mismatch(e, state)
            return None
        except Exception as e:
            if state is S.FOSSILIZED:
                raise
            self.cull(f"SeedError: {type(e).__name__}: {e}"[:500])
            return None
        if not isinstance(s, torch.Tensor) or s.shape != y.shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            msg = f"seed returned {got}, the activation is {tuple(y.shape)}"
            self._mismatch(KernelShapeError(msg, key=kernel_key_of(seed) or ""), state)
            return None
        return s

    def _mismatch(self, e: KernelShapeError, state: SeedState) -> None:
        """Evaluation (eval mode or no_grad): leave the seed out of this call and record it. Training:
        cull a live seed, raise for a fossil."""
        e.slot = self.name
        if self.training and torch.is_grad_enabled():
            if state is S.FOSSILIZED:
                raise e
            self.cull(str(e)[:500])
            return None
        t = self.telemetry
        t.skipped_calls += 1
        t.last_skip = str(e)[:500]
        self.metrics.seed_skipped_calls.labels(seed=self.name, reason=e.reason).inc()
        if not self._warned_skip:
            object.__setattr__(self, "_warned_skip", True)
            warnings.warn(
                f"{e}. The seed is left out of this {state.value} call (eval mode or no_grad) and the slot "
                "returns the host's output; further such calls are only counted (telemetry skipped_calls)",
                KernelShapeWarning,
                stacklevel=4,
            )
        return None

    def _verify(self, seed: nn.Module, y: torch.Tensor, state: SeedState) -> bool:
        """The first forward after a kernel was installed on a slot that had never seen one: check the
        kernel against this activation (as germination would have) before it produces anything."""
        try:
            self._check_fits(seed, tuple(y.shape[1:]), str(y.dtype).removeprefix("torch."), str(y.device))
        except KernelShapeError as e:
            self._mismatch(e, state)
            return False
        except KernelLoadError as e:  # the probe crashed: a broken kernel, in any mode
            if state is S.FOSSILIZED:
                raise
            self.cull(f"{e.reason}: slot {self.name}: {e.message}"[:500])
            return False
        object.__setattr__(self, "_verify_due", False)
        self._refresh()
        return True

    def _refresh(self) -> None:
        """Recompute the fast paths: `_passthrough` (identity state, nothing to observe, no alpha
        override) for forward, and `wake` (the next step with work to do) for `step()`."""
        idle = self.lifecycle.state in IDENTITY_STATES and self._alpha_override is None
        object.__setattr__(self, "_passthrough", idle and not self._observe_due and not self._verify_due)
        c = self._c
        if idle and self._pending is None:
            every = self.idle_sample_every
            c.wake = (c.global_step // every + 1) * every if every > 0 else _NEVER
        else:
            c.wake = 0

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def state(self) -> SeedState:
        return self.lifecycle.state

    @property
    def kernel_key(self) -> str | None:
        return kernel_key_of(self.seed)

    def _on_transition(self, t: Transition) -> None:
        self._c.state_start = self._c.global_step
        self.telemetry.state = t.to_state
        self.metrics.transition(self.name, t.to_state)
        log.info("seed %s: %s -> %s at step %d (%s)", self.name, t.from_state.value, t.to_state.value,
                 t.step, t.reason)  # fmt: skip

    def _move(self, to: SeedState, step: int | None, reason: str) -> None:
        self.lifecycle.transition(to, self.global_step if step is None else step, reason)
        self._refresh()

    def germinate(
        self,
        kernel: KernelSource,
        *,
        step: int | None = None,
        key: str | None = None,
        expected_sha256: str | None = None,
        defer: bool = False,
    ) -> bool:
        """Load and check a kernel, then install it (now, or at the next `step()` if `defer`).

        `kernel`: a module, a zero-argument loader, or a bundle directory. Returns False if the kernel
        was refused (KernelLoadError; recorded in telemetry and metrics): the slot stays dormant.
        """
        if self.state is not S.DORMANT or self._pending is not None:
            raise IllegalTransition(self.state, S.GERMINATED, self.name)
        try:
            module = self._materialize(kernel, key, expected_sha256)
            self._check_causal(module)
            shape, dtype = self._expected_activation()
            self._check_fits(module, shape, dtype, self.telemetry.activation_device)
        except KernelLoadError as e:
            self.telemetry.last_error = str(e)
            log.warning("seed %s: kernel refused, slot stays dormant: %s", self.name, e)
            return False
        self.telemetry.last_error = None
        if isinstance(module, KernelModule):
            self.telemetry.load_seconds = module.load_seconds
        reason = f"kernel {kernel_key_of(module)}"
        if defer:
            self._pending = (module, reason)
            self._refresh()  # step() must look at the pending kernel
        else:
            self._install(module, step, reason)
        return True

    def _check_causal(self, module: nn.Module) -> None:
        """A causal slot (not per-token) takes only a kernel that declares it is causal."""
        if not self.causal or self.per_token:
            return
        from esper.kasmina.causality import kernel_causality

        c = kernel_causality(module)
        if c.causal is not True:
            what = "lets positions see later ones" if c.causal is False else "does not say if it is causal"
            raise KernelLoadError(
                "NotCausal",
                f"slot {self.name} is causal; kernel {kernel_key_of(module)} {what} (compile it with a "
                "causal Blueprint, or use a per-token slot for a position-wise kernel)",
            )

    def _materialize(self, kernel: KernelSource, key: str | None, sha: str | None) -> nn.Module:
        try:
            if isinstance(kernel, str | os.PathLike):
                shape, dtype = self._expected_activation()
                if self.per_token and shape is not None:
                    shape = shape[-1:]
                return load_kernel(
                    kernel, sha, self._device(), sample_shape=shape, sample_dtype=dtype, metrics=self.metrics
                )
            module = kernel if isinstance(kernel, nn.Module) else kernel()
            if not isinstance(module, nn.Module):
                raise KernelLoadError("NotAModule", f"loader returned {type(module).__name__}")
            return from_module(module, key)
        except KernelLoadError:
            raise
        except Exception as e:
            self.metrics.kernel_load_failures.labels(reason="LoadFailed").inc()
            raise KernelLoadError("LoadFailed", f"{type(e).__name__}: {e}") from e

    def _device(self) -> torch.device:
        if self.telemetry.activation_device is not None:
            return torch.device(self.telemetry.activation_device)
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def _expected_activation(self) -> tuple[tuple[int, ...] | None, str | None]:
        """(per-sample shape, dtype) the slot's seed will be fed: recorded at a forward, else declared."""
        t = self.telemetry
        if t.activation_shape is not None:
            return t.activation_shape, t.activation_dtype
        return self.declared_shape, None

    def _check_fits(
        self, module: nn.Module, shape: tuple[int, ...] | None, dtype: str | None, device: str | None
    ) -> None:
        """Refuse a kernel that cannot take this activation: a compiled kernel's manifest shapes, dtype
        and device; then (dtype known) a probe with one zero sample, which must come back unchanged in
        shape. Nothing known: the check waits for the first forward (`_verify`). A per-token slot
        checks the kernel against one position (`shape[-1:]`)."""
        if shape is None:
            return
        if self.per_token:
            shape = shape[-1:]
        if isinstance(module, KernelModule) and (why := module.fits(shape, dtype, device)) is not None:
            raise KernelShapeError(why, key=module.kernel_key, slot=self.name)
        if dtype is None:
            return  # a declared shape only: the dtype is checked at the first forward
        dev, dt = torch.device(device) if device is not None else self._device(), getattr(torch, dtype)
        if not isinstance(module, KernelModule):
            module.to(device=dev, dtype=dt)
        was_training = module.training
        try:
            module.eval()
            with torch.no_grad():
                out = module(torch.zeros((1, *shape), device=dev, dtype=dt))
        except KernelShapeError:
            raise
        except Exception as e:
            raise KernelLoadError("ProbeFailed", f"{type(e).__name__}: {e}") from e
        finally:
            module.train(was_training)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, *shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise KernelShapeError(f"kernel maps (1, {shape}) to {got}", key=kernel_key_of(module) or "")

    def _install(self, module: nn.Module, step: int | None, reason: str) -> None:
        module.train(self.training)
        self._adopt(module)
        self.seed = module
        self._c.alpha, self._c.blend_step = 0.0, 0
        self.telemetry.kernel_key = kernel_key_of(module)
        self._move(S.GERMINATED, step, reason)

    def start_training(self, step: int | None = None) -> None:
        self._move(S.TRAINING, step, "train in isolation")

    def start_blending(self, step: int | None = None, blend_steps: int | None = None) -> None:
        if blend_steps is not None:
            if blend_steps < 1:
                raise ValueError("blend_steps must be >= 1")
            self.blend_steps = blend_steps
        self._move(S.BLENDING, step, f"blend over {self.blend_steps} steps")
        self._c.alpha, self._c.blend_step = 0.0, 0

    def fossilize(self, step: int | None = None, reason: str = "kept") -> None:
        self._move(S.FOSSILIZED, step, reason)
        self._c.alpha = 1.0

    def cull(self, reason: str, step: int | None = None) -> None:
        """Discard the seed (its parameters leave the model); the slot then waits for `reset()`."""
        object.__setattr__(self, "_verify_due", False)
        self._move(S.CULLED, step, reason)
        self.seed = None
        self._c.alpha = 0.0
        self.telemetry.last_error = reason

    def reset(self, step: int | None = None) -> None:
        """Culled -> dormant: the slot can be germinated again."""
        self._move(S.DORMANT, step, "slot reused")
        self.telemetry.kernel_key = None

    def step(self) -> None:
        """Advance one optimizer step: call after optimizer.step() and before zero_grad().

        An idle slot (dormant, germinated, culled; nothing pending) does one increment and one
        comparison here, and only every `idle_sample_every` steps more.
        """
        c = self._c
        c.global_step += 1
        if c.global_step < c.wake:
            return
        self._advance()

    def _advance(self) -> None:
        c = self._c
        if self._pending is not None:
            module, reason = self._pending
            self._pending = None
            self._install(module, None, reason)
        state = self.lifecycle.state
        if state is S.BLENDING:
            c.blend_step += 1
            c.alpha = min(1.0, c.blend_step / self.blend_steps)
        every = self.idle_sample_every if state in IDENTITY_STATES else self.sample_every
        if every > 0 and c.global_step % every == 0:
            object.__setattr__(self, "_observe_due", True)
            self._sample_grads()
        self._refresh()

    def _sample_grads(self) -> None:
        self.telemetry.alpha = self.alpha
        if self.seed is None:
            return
        self.metrics.seed_alpha.labels(seed=self.name).set(self.alpha)
        norms = [p.grad.detach().norm() for p in self.seed.parameters() if p.grad is not None]
        if norms:
            gn = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
            self.telemetry.grad_norm = gn
            self.metrics.seed_grad_norm.labels(seed=self.name).set(float(gn))

    @contextlib.contextmanager
    def alpha_override(self, alpha: float) -> Iterator[None]:
        """Evaluate with `y + alpha * (seed(y) - y)` whatever the state (0.0: the host alone, 1.0:
        the seed's output). For evaluation (measuring a seed's contribution), not training: it
        bypasses isolation."""
        prev = self._alpha_override
        self._alpha_override = float(alpha)
        self._refresh()
        try:
            yield
        finally:
            self._alpha_override = prev
            self._refresh()

    def seed_parameters(self) -> list[nn.Parameter]:
        """The seed's parameters, for a dedicated optimizer param group."""
        return [] if self.seed is None else list(self.seed.parameters())

    def param_group(self, **options: Any) -> dict[str, Any]:
        """An optimizer param group of this seed: `optimizer.add_param_group(slot.param_group(lr=...))`."""
        return {"params": self.seed_parameters(), "seed": self.name, **options}

    # ---- status and checkpoints -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        self.telemetry.alpha = self.alpha
        d = self.telemetry.to_json()
        d.update(stepsInState=self.steps_in_state, globalStep=self.global_step,
                 seedParams=sum(p.numel() for p in self.seed_parameters()))  # fmt: skip
        return d

    def get_extra_state(self) -> torch.Tensor:
        """The slot state (`slot_state()`) as UTF-8 JSON in a uint8 tensor: every state_dict value is
        then a tensor, which safetensors and Hugging Face's `save_pretrained` require; the seed's
        tensors are saved as ordinary state_dict entries."""
        data = json.dumps(self.slot_state(), sort_keys=True).encode()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def slot_state(self) -> dict[str, Any]:
        """Plain JSON-able slot state: lifecycle, counters and the kernel key."""
        return {
            "version": EXTRA_STATE_VERSION,
            "name": self.name,
            "state": self.state.value,
            "alpha": self.alpha,
            "blendStep": self.blend_step,
            "blendSteps": self.blend_steps,
            "globalStep": self.global_step,
            "stepsInState": self.steps_in_state,
            "kernelKey": self.kernel_key,
            "history": [t.to_json() for t in self.lifecycle.history],
            "perToken": self.per_token,
            "causal": self.causal,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore the slot; rebuild its kernel with `kernel_resolver` first if the checkpoint has one.

        Runs before the slot's children are loaded, so the rebuilt seed's parameters are then filled
        from the same state_dict. Takes the tensor `get_extra_state` writes or the dict older
        checkpoints hold.
        """
        if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
            try:
                state = json.loads(bytes(state.cpu().tolist()).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise KernelRestoreError(f"slot {self.name}: unreadable slot state: {e}") from e
        if not isinstance(state, dict) or state.get("version") != EXTRA_STATE_VERSION:
            raise KernelRestoreError(f"slot {self.name}: unknown slot state {state!r:.200}")
        to = S(state["state"])
        key = state.get("kernelKey")
        self.per_token = bool(state.get("perToken", self.per_token))  # before the seed is rebuilt
        self.causal = bool(state.get("causal", self.causal))
        if to in KERNEL_STATES:
            if self.seed is None or self.kernel_key != key:
                self.seed = self._resolve(str(key))
        else:
            self.seed = None
        self._pending = None
        self.lifecycle.restore(to, [Transition.from_json(t) for t in state.get("history", [])])
        c = self._c
        c.alpha = float(state["alpha"])
        c.blend_step = int(state["blendStep"])
        self.blend_steps = int(state["blendSteps"])
        c.global_step = int(state["globalStep"])
        c.state_start = c.global_step - int(state["stepsInState"])
        self.telemetry.state, self.telemetry.kernel_key = to, self.kernel_key
        self.metrics.set_state(self.name, to)
        self._refresh()

    def _resolve(self, key: str) -> nn.Module:
        if self.kernel_resolver is None:
            raise KernelRestoreError(
                f"slot {self.name}: the checkpoint holds seed kernel {key}; set a kernel_resolver "
                "(set_kernel_resolver(model, fn)) before load_state_dict"
            )
        try:
            module = from_module(self.kernel_resolver(key), key)
        except Exception as e:
            raise KernelRestoreError(f"slot {self.name}: cannot rebuild kernel {key}: {e}") from e
        if kernel_key_of(module) != key:
            got = kernel_key_of(module)
            raise KernelRestoreError(f"slot {self.name}: resolver returned kernel {got}, not {key}")
        module.train(self.training)
        self._adopt(module)
        return module

    def _adopt(self, module: nn.Module) -> None:
        """A kernel joins this slot: its errors name the slot; one skip warning per kernel; checked
        against the first activation if the slot has never seen one."""
        if isinstance(module, KernelModule):
            module.slot_name = self.name
        object.__setattr__(self, "_warned_skip", False)
        object.__setattr__(self, "_verify_due", self.telemetry.activation_shape is None)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, state={self.state.value}, alpha={self.alpha:.3f}"

    def __getattr__(self, name: str) -> Any:
        """Attributes the slot does not have come from the host (`slot.c_fc`, `slot.config`), so code
        that reaches into the wrapped submodule keeps working. Only called when normal lookup fails."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            host = self._modules.get("host")
            if host is None:
                raise
            try:
                return getattr(host, name)
            except AttributeError:
                raise AttributeError(
                    f"'SeedSlot' object (slot {self.__dict__.get('name')!r}) and its host "
                    f"'{type(host).__name__}' have no attribute {name!r}"
                ) from None

    # ---- state_dict keys: the host's keys stay where they were before wrapping -----------------

    def _host_keys_out(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        """state_dict hook: `<slot>.host.<rest>` -> `<slot>.<rest>` (the bare model's keys)."""
        lead = prefix + "host."
        mine = [k for k in state_dict if k.startswith(prefix)]  # the slot's keys, last in the dict
        for k in mine:
            v = state_dict.pop(k)
            state_dict[prefix + k[len(lead) :] if k.startswith(lead) else k] = v

    def _host_keys_in(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        """load_state_dict pre-hook: a key under this slot that is neither the slot's own (`seed.`,
        `_extra_state`) nor already `host.` belongs to the host."""
        if self._modules.get("host") is None:
            return
        own = (prefix + "seed.", prefix + "host.", prefix + "_extra_state")
        for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
            state_dict[prefix + "host." + k[len(prefix) :]] = state_dict.pop(k)


_SLOT_NAMES = frozenset({"seed", "host", "_extra_state"})


def _check_host_names(slot: str, module: nn.Module) -> None:
    """The host's state_dict keys appear under the slot without a `host.` level: none may be one of
    the slot's own names."""
    clash = sorted({k.split(".", 1)[0] for k in module.state_dict(keep_vars=True)} & _SLOT_NAMES)
    if clash:
        raise ValueError(f"cannot wrap {slot}: top-level state_dict names {clash} are the slot's own")


def wrap(
    model: nn.Module,
    at: Iterable[str],
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    **slot_options: Any,
) -> dict[str, SeedSlot]:
    """Replace each named submodule by a SeedSlot around it; returns the slots by name.

    `shapes`: per-sample activation shapes (batch excluded) by slot name, for slots whose shape is
    known before their first forward (germination then refuses a kernel that cannot fit at once).

    `slot_options` go to every SeedSlot: `per_token=True` for position-wise kernels on `[B, T, F]`
    activations, `causal=True` in a language model (see SeedSlot).

    State_dict keys stay those of the bare model (`blocks.0.weight`, not `blocks.0.host.weight`;
    parameter names do keep the `host` level); a slot adds `blocks.0._extra_state` and, with a seed,
    `blocks.0.seed.*`. So a host-only checkpoint loads into a wrapped model with `strict=False` (or
    `esper.kasmina.hf.load_host`), and checkpoints written with `host.` keys still load.
    """
    names = list(at)
    shapes = dict(shapes or {})
    if unknown := sorted(set(shapes) - set(names)):
        raise ValueError(f"shapes names {unknown}, which are not in `at`")
    out: dict[str, SeedSlot] = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        sub = parent.get_submodule(attr)
        if isinstance(sub, SeedSlot):
            raise ValueError(f"{name} is already a seed slot")
        slot = SeedSlot(name, sub, shape=shapes.get(name), **slot_options)
        setattr(parent, attr, slot)
        out[name] = slot
    return out


def slots(model: nn.Module) -> dict[str, SeedSlot]:
    """Every seed slot in `model`, by slot name, in module order."""
    return {m.name: m for m in model.modules() if isinstance(m, SeedSlot)}


def status_json(model: nn.Module) -> dict[str, Any]:
    """Every seed slot of `model` as JSON-able data (for the sidecar, the CLI and the demo table)."""
    return {"seeds": [m.status() for m in model.modules() if isinstance(m, SeedSlot)]}


def step_slots(model: nn.Module) -> None:
    """`slot.step()` for every slot (once per optimizer step).

    The slot list is cached per model (walking `model.modules()` every step costs ~75 µs on a
    50-module host) and rebuilt whenever a SeedSlot has been created since; a slot *removed* from the
    model without a new one being created stays in the cache (it is stepped, harmlessly, alone).
    """
    hit = _slot_cache.get(model)
    if hit is None or hit[0] != _generation:
        hit = (_generation, tuple(slots(model).values()))
        _slot_cache[model] = hit
    for s in hit[1]:
        s.step()


def set_kernel_resolver(model: nn.Module, resolver: KernelResolver) -> None:
    """Give every slot the function that rebuilds a kernel from its key (for `load_state_dict`)."""
    for s in slots(model).values():
        s.kernel_resolver = resolver
