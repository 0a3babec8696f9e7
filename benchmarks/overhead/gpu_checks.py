"""GPU-only checks (AMP with GradScaler, fused AdamW, inductor without recompiles).

Self-contained: a tiny tagged vector model, a few steps per check, a PASS/FAIL table,
exit status 1 if any check fails (2 if no GPU). Runs in well under two minutes on one
GPU (the inductor compile dominates; ``--skip-compile`` drops it)::

    python -m benchmarks.overhead.gpu_checks               # on the GPU machine
    python -m benchmarks.overhead.gpu_checks --device cpu  # dry run of the same code paths on CPU

Checks:
  * ``inf-skip[<inner>]``: fp16 autocast + GradScaler, a loss forced to inf. ``scaler.step``
    must skip the whole wrapper step: weights, h, t and gamma_t unchanged and finite, the
    scale lowered; after ``zero_grad`` the skipped batch's captures are gone, so the next
    step's newest sample holds exactly one batch. For AdamW (foreach) and fused AdamW.
  * ``unscale-once[<inner>]``: ``scaler.unscale_(opt)``, gradient clipping, ``scaler.step(opt)``.
    The gradients after ``unscale_`` are the scaled ones divided by the scale, and the step
    uses them as they are (for SGD: ``p_new = p - lr * g``), i.e. nothing is unscaled twice.
    The inner fused AdamW supports grad scaling itself; the wrapper must not let it.
  * ``compile-no-recompile``: ``torch.compile`` (inductor) of the model; after two warm-up
    steps, six more steps compile nothing (``error_on_recompile``, unchanged graph count).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable

import torch
from torch import Tensor, nn

import recm_opt as recm


@recm.relaxed(inputs=recm.Vector("b c xyz"), terms={"weight": "un"})
class TinyVectorLinear(nn.Module):
    def __init__(self, c_in: int, c_out: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, generator=g) / math.sqrt(c_in))
        self.un = nn.Parameter(torch.randn(3 * c_out, 3 * c_in, generator=g) * 1e-2)

    def equivariant(self, z: Tensor) -> Tensor:
        return torch.einsum("oc,bcx->box", self.weight, z)

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        return (z.flatten(1) @ self.un.T).reshape(z.shape[0], -1, 3)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = TinyVectorLinear(4, 16, seed=1)
        self.dec = TinyVectorLinear(16, 1, seed=2)

    def forward(self, z: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(z)))[:, 0]


BATCH = 32


def batch(step: int, device: str) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 4, 3, generator=g)
    return x.to(device), (x[:, 0] * 2 + torch.tensor([0.5, 0.0, 0.0])).to(device)


def build(device: str, inner: str) -> tuple[TinyNet, recm.RECMOptimizer]:
    model = TinyNet().to(device)
    params = model.parameters()
    opt: torch.optim.Optimizer
    if inner == "AdamW":
        opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    elif inner == "AdamW-fused":
        opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    else:
        opt = torch.optim.SGD(params, lr=0.1)
    return model, recm.RECMOptimizer(opt, model, target=recm.Vector("b xyz"), a=0.1,
                                     example=torch.zeros(1, 4, 3, device=device))


def state(model: TinyNet) -> list[Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for layer in (model.enc, model.dec):
        mod = layer.recm_modulation
        out += [mod.h.clone(), mod.t.clone(), mod.gamma_t.clone()]
    return out


def amp_step(model: TinyNet, opt: recm.RECMOptimizer, scaler: torch.amp.GradScaler, step: int, device: str,
             force_inf: bool = False) -> None:
    x, y = batch(step, device)
    with torch.autocast(device, dtype=torch.float16):
        loss = (model(x).float() - y).pow(2).mean()
    if force_inf:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    opt.observe(y)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def check_inf_skip(device: str, inner: str) -> str:
    model, opt = build(device, inner)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    for step in range(3):
        amp_step(model, opt, scaler, step, device)
    before, scale = state(model), scaler.get_scale()
    amp_step(model, opt, scaler, 3, device, force_inf=True)
    after = state(model)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not torch.equal(a, b)]
    assert not changed, f"skipped step changed state tensors {changed}"
    assert all(torch.isfinite(t.float()).all() for t in after), "non-finite state after the skipped step"
    assert scaler.get_scale() < scale, f"scale not lowered: {scaler.get_scale()} vs {scale}"
    assert opt.skipped_steps == 0, "the wrapper was called: GradScaler should have skipped it"
    amp_step(model, opt, scaler, 4, device)
    t = int(model.enc.recm_modulation.t)
    assert t == 4, f"t = {t} after 4 real steps"
    units = model.enc.recm_modulation.newest.shape[1]
    assert units == BATCH, f"the step after the skip used {units} units (skipped batch leaked)"
    return f"h,t,weights unchanged; scale {scale:g}->{scaler.get_scale():g}; next step {units} units"


def check_unscale_once(device: str, inner: str) -> str:
    model, opt = build(device, inner)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    amp_step(model, opt, scaler, 0, device)  # materialise r_theta, fill the inner state
    x, y = batch(1, device)
    with torch.autocast(device, dtype=torch.float16):
        loss = (model(x).float() - y).pow(2).mean()
    scaler.scale(loss).backward()
    opt.observe(y)
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    scaled = [p.grad.clone() for p in params]
    scaler.unscale_(opt)
    for g_scaled, p in zip(scaled, params):
        torch.testing.assert_close(p.grad, g_scaled / 2.0**10, rtol=0, atol=0)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)  # clipping sees true gradients
    clipped = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    for g, p in zip(clipped, params):
        assert torch.equal(p.grad, g), "scaler.step changed the gradients again (second unscale)"
    if inner == "SGD":
        moved = [b - p.detach() for b, p in zip(before, params)]
        # Only the model's own weights: _project may rescale the unconstrained ones.
        for d, g in list(zip(moved, clipped))[:1]:
            torch.testing.assert_close(d, 0.1 * g, rtol=1e-5, atol=1e-7)
    assert int(model.enc.recm_modulation.t) == 2
    return f"grads divided by 2^10 exactly once; {len(params)} grads unchanged by scaler.step"


def check_compile(device: str) -> str:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = TinyNet().to(device)
    compiled = torch.compile(model)
    opt = recm.RECMOptimizer(torch.optim.AdamW(compiled.parameters(), lr=1e-2), compiled,
                             target=recm.Vector("b xyz"), a=0.1, example=torch.zeros(1, 4, 3, device=device))
    assert list(opt.layers) == ["enc", "dec"], f"layer names {list(opt.layers)}"
    start = time.perf_counter()

    def step(i: int) -> None:
        x, y = batch(i, device)
        (compiled(x) - y).pow(2).mean().backward()
        opt.step(target=y)
        opt.zero_grad()

    for i in range(2):
        step(i)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(2, 8):
            step(i)
    assert counters["stats"]["unique_graphs"] == graphs, "new graphs after warm-up"
    assert int(model.enc.recm_modulation.t) == 8
    return f"{graphs} graphs after warm-up, 0 new in 6 steps ({time.perf_counter() - start:.1f} s incl. compile)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--skip-compile", action="store_true", help="skip the inductor check")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU (use --device cpu for a dry run)")
        return 2
    checks: list[tuple[str, Callable[[], str]]] = []
    for inner in ("AdamW", "AdamW-fused"):
        checks.append((f"inf-skip[{inner}]", lambda inner=inner: check_inf_skip(args.device, inner)))
    for inner in ("SGD", "AdamW-fused"):
        checks.append((f"unscale-once[{inner}]", lambda inner=inner: check_unscale_once(args.device, inner)))
    if not args.skip_compile:
        checks.append(("compile-no-recompile", lambda: check_compile(args.device)))

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"recm_opt {recm.__version__}, torch {torch.__version__}, device {name}")
    rows, failed = [], 0
    for label, fn in checks:
        start = time.perf_counter()
        try:
            detail, status = fn(), "PASS"
        except Exception as err:  # report every check, then fail the run
            detail, status = f"{type(err).__name__}: {err}".splitlines()[0][:110], "FAIL"
            traceback.print_exc(file=sys.stderr)
            failed += 1
        rows.append((label, status, f"{time.perf_counter() - start:5.1f}s", detail))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  result  time    detail")
    for label, status, secs, detail in rows:
        print(f"{label:<{width}}  {status:<6}  {secs}  {detail}")
    print(f"\n{len(rows) - failed}/{len(rows)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
