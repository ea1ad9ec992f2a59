"""Fixed-step Euler solvers for the detokenizer's flow-matching ODE, as pure functions.

The release integrates dx/dt = v(t, x) from noise (t = 0) to mel (t = 1) with one of two schedules that
share the evaluation grid `linspace(0, 1, ode_steps)`:

- "neural_ode_euler" (default; torchdyn's fixed-step Euler): ode_steps - 1 steps. Time is accumulated
  in fp32 as t <- t + dt and the next step is dt = t_span[k + 1] - t, so the evaluated times and step
  sizes carry torchdyn's rounding; we reproduce that arithmetic exactly.
- "naive_euler": ode_steps steps of constant size (1 - sigma_min) / ode_steps (sigma_min = 1e-4),
  evaluated at every grid point including t = 1.

Noise is drawn in fp32 on the CPU from an explicit `torch.Generator` (as the release draws it from the
CPU generator) and only then moved to the compute device/dtype, so results do not depend on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kimia.errors import ConfigError

SOLVERS = ("neural_ode_euler", "naive_euler")
SIGMA_MIN = 1e-4

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_t_span(ode_steps: int = 30) -> torch.Tensor:
    """The shared fp32 evaluation grid linspace(0, 1, ode_steps)."""
    if ode_steps < 2:
        raise ConfigError(f"ode_steps must be >= 2, got {ode_steps}")
    return torch.linspace(0, 1, ode_steps)


def euler_solve(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    t_span: torch.Tensor,
    solver: str = "neural_ode_euler",
    sigma_min: float = SIGMA_MIN,
) -> torch.Tensor:
    """Integrate from x0 over t_span; velocity_fn(t (0-d fp32 tensor), x) -> dx/dt. Returns x at the end."""
    if solver == "neural_ode_euler":
        return _torchdyn_euler(velocity_fn, x0, t_span)
    if solver == "naive_euler":
        return _naive_euler(velocity_fn, x0, t_span, sigma_min)
    raise ConfigError(f"unknown ODE solver {solver!r}; expected one of {SOLVERS}")


def _torchdyn_euler(velocity_fn: VelocityFn, x: torch.Tensor, t_span: torch.Tensor) -> torch.Tensor:
    n = t_span.numel()
    t, dt = t_span[0], t_span[1] - t_span[0]
    for k in range(1, n):
        # dt stays an fp32 0-d tensor: PyTorch multiplies reduced-precision x by it at fp32 precision, as
        # torchdyn does in the release (casting dt to bf16 first would shift the schedule by ~0.4%)
        x = x + dt * velocity_fn(t, x)
        t = t + dt
        if k < n - 1:
            dt = t_span[k + 1] - t
    return x


def _naive_euler(velocity_fn: VelocityFn, x: torch.Tensor, t_span: torch.Tensor, sigma_min: float) -> torch.Tensor:
    # the release forms the step as a tensor of x's dtype
    h = torch.tensor((1.0 - sigma_min) / t_span.numel(), dtype=x.dtype, device=x.device)
    for t in t_span:
        x = x + h * velocity_fn(t, x)
    return x


def solver_steps(solver: str, ode_steps: int) -> int:
    """Number of velocity evaluations one solve costs."""
    if solver not in SOLVERS:
        raise ConfigError(f"unknown ODE solver {solver!r}; expected one of {SOLVERS}")
    return ode_steps - 1 if solver == "neural_ode_euler" else ode_steps


def draw_noise(
    shape: tuple[int, ...], generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Standard normal noise drawn in fp32 on the CPU (explicit generator), then moved to device/dtype."""
    if generator is not None and generator.device.type != "cpu":
        raise ConfigError("the noise generator must be a CPU torch.Generator (noise is drawn on the CPU)")
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
