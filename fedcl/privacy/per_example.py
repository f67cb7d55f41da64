"""Per-example gradients for DP-SGD, for a model called several times per step.

fedcl encodes the two views of a batch in two forward calls through the trained model (see
``fedcl.privacy.dp``), and example i's gradient is the sum of both calls' contributions. This
module computes that sum directly, once per layer and step, into memory reused across steps:

* one layer, calls c = 1..k, unfolded inputs A_c (B, P, L) and output gradients G_c (B, O, L):
  per-example weight gradients (B, O, P) = sum_c G_c A_c^T, one batched matmul per call
  accumulated in place (``baddbmm_``); the per-example rows, the unfolded inputs and the padded
  inputs live in buffers kept from step to step;
* the forward runs with the parameters frozen, so autograd computes only activation gradients:
  the summed weight gradient it would also compute is never used under DP-SGD (the optimizer
  builds the update from the clipped per-example rows).

Opacus' GradSampleModule (hooks mode) does the same maths, but per call: for every call it
allocates a fresh (B, ...) tensor per parameter, copies it into a zero-filled accumulator and
adds the next call to it, while autograd computes the unused summed weight gradient too. On the
bench CNN those fresh 75-150 MB allocations (page faults) and copies cost more than the matmuls
(docs/benchmarks.md, "DP-SGD step time"). Opacus' ghost-clipping mode cannot be used instead: it
keeps one per-sample norm per call and so drops the cross term between the two views.

Supported trainable layers: Conv2d (groups=1, zero padding), Linear, GroupNorm, which is what
``fedcl.models`` builds. Any other module holding trainable parameters is refused. The loss
must be the mean over the batch of per-example losses; rows are gradients of per-example losses.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear, nn.GroupNorm)


class PerExampleGradientError(RuntimeError):
    """Per-sample gradients do not have one row per example of the batch."""


def _check_layer(name: str, m: nn.Module) -> None:
    if not isinstance(m, SUPPORTED_LAYERS):
        raise ValueError(
            f"layer {name or '(root)'} ({type(m).__name__}) holds trainable parameters, but per-example "
            f"gradients are computed only for {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}; use "
            "fedcl.models encoders or make_private(..., engine='opacus')"
        )
    if isinstance(m, nn.Conv2d) and (
        m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
    ):
        raise ValueError(
            f"layer {name} is a Conv2d with groups={m.groups}, padding={m.padding!r}, padding_mode="
            f"{m.padding_mode!r}; only groups=1 with numeric zero padding is supported (or engine='opacus')"
        )


class PerExampleModule(nn.Module):
    """Wraps ``module``; after ``loss.backward()`` every trainable parameter ``p`` holds
    ``p.grad_sample`` (B, *p.shape): the gradient of each example's loss, summed over all forward
    calls of the step. Rows are views of buffers reused by the next step.

    ``p.grad`` is not computed (the forward runs with parameters frozen). Parameters stay
    ``module``'s own; ``state_dict`` keys carry the prefix ``_module.`` as with Opacus.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._module = module
        self._layers: list[nn.Module] = []
        for name, m in module.named_modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                _check_layer(name, m)
                self._layers.append(m)
        self._inputs: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in self._layers}
        self._grads: dict[nn.Module, dict[int, torch.Tensor]] = {m: {} for m in self._layers}
        self._store: dict[object, torch.Tensor] = {}  # reused (capacity, ...) buffers
        self._handles = [m.register_forward_hook(self._capture_input) for m in self._layers]

    # -- forward / backward hooks ---------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not (torch.is_grad_enabled() and self.training):
            return self._module(x, *args, **kwargs)
        frozen = [p for p in self._module.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            if not x.requires_grad:  # the graph then holds activation gradients only
                x = x.detach().requires_grad_(True)
            return self._module(x, *args, **kwargs)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _capture_input(self, m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and m.training and output.requires_grad):
            return
        call = len(self._inputs[m])
        self._inputs[m].append(inputs[0].detach())
        output.register_hook(partial(self._capture_grad, m, call))

    def _capture_grad(self, m: nn.Module, call: int, grad: torch.Tensor) -> None:
        self._grads[m][call] = grad.detach()
        if len(self._grads[m]) == len(self._inputs[m]):  # every call of this layer reached the loss
            self._compute(m)

    # -- per-example gradients ------------------------------------------------------------------

    def buffer(self, key: object, shape: tuple[int, ...], like: torch.Tensor, *,
               zero: bool = False) -> torch.Tensor:
        """A ``shape`` view of a buffer kept for ``key`` (dtype and device of ``like``), reallocated
        only when a batch outgrows it: fresh 100 MB tensors every step cost page faults. ``zero``:
        a new buffer starts zeroed (what callers never write stays 0)."""
        buf = self._store.get(key)
        if (buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != tuple(shape[1:])
                or buf.dtype != like.dtype or buf.device != like.device):
            rows = shape[0] + shape[0] // 8  # headroom: Poisson batch sizes vary from step to step
            buf = (torch.zeros if zero else torch.empty)((rows, *shape[1:]), dtype=like.dtype,
                                                         device=like.device)
            self._store[key] = buf
        return buf[: shape[0]]

    def _unfold(self, m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``F.unfold(x, ...)`` for layer ``m``: (B, C * kh * kw, L), written into reused buffers."""
        b, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        padded = x
        if ph or pw:  # zero border written once, when the buffer is made
            padded = self.buffer(("padded", id(m)), (b, c, h + 2 * ph, w + 2 * pw), x, zero=True)
            padded[:, :, ph:ph + h, pw:pw + w].copy_(x)
        st = padded.stride()
        windows = padded.as_strided((b, c, kh, kw, ho, wo), (st[0], st[1], st[2] * dh, st[3] * dw, st[2] * sh,
                                                             st[3] * sw), padded.storage_offset())
        out = self.buffer("unfold", (b * c * kh * kw * ho * wo,), x)  # one scratch for every layer
        out.view(b, c, kh, kw, ho, wo).copy_(windows)
        return out.view(b, c * kh * kw, ho * wo)

    def _compute(self, m: nn.Module) -> None:
        xs = self._inputs[m]
        gs = [self._grads[m][c] for c in range(len(xs))]
        self._inputs[m], self._grads[m] = [], {}
        b = xs[0].shape[0]
        if any(x.shape[0] != b for x in xs):
            raise PerExampleGradientError(
                f"{type(m).__name__} was called with batch sizes {[x.shape[0] for x in xs]} in one step; "
                "every forward call of a step must hold the same examples in the same order"
            )
        scale = float(b)  # the loss is a mean over b examples: rows are per-example loss gradients
        out: dict[nn.Parameter, torch.Tensor] = {}
        if b == 0:  # an empty Poisson batch: no rows
            out = {p: p.new_zeros((0, *p.shape)) for p in m.parameters(recurse=False)}
        elif isinstance(m, nn.Conv2d):
            w = self.buffer(id(m.weight), (b, m.out_channels, m.weight[0].numel()), xs[0])  # (B, O, P)
            for c, (x, g) in enumerate(zip(xs, gs, strict=False)):
                a = self._unfold(m, x)  # (B, P, L)
                w.baddbmm_(g.reshape(b, m.out_channels, -1), a.transpose(1, 2), beta=float(c > 0),
                           alpha=scale)
            out[m.weight] = w.view(b, *m.weight.shape)
            if m.bias is not None:
                out[m.bias] = sum(g.sum((2, 3)) for g in gs) * scale  # (B, O)
        elif isinstance(m, nn.Linear):
            w = self.buffer(id(m.weight), (b, m.out_features, m.in_features), xs[0])  # (B, O, I)
            for c, (x, g) in enumerate(zip(xs, gs, strict=False)):
                # (B, O, T) @ (B, T, I); T = 1 for (B, I) inputs
                w.baddbmm_(g.reshape(b, -1, m.out_features).transpose(1, 2), x.reshape(b, -1, m.in_features),
                           beta=float(c > 0), alpha=scale)
            out[m.weight] = w
            if m.bias is not None:
                out[m.bias] = sum(g.reshape(b, -1, m.out_features).sum(1) for g in gs) * scale  # (B, O)
        else:  # GroupNorm: weight and bias act per channel on the normalised input
            xn = [F.group_norm(x, m.num_groups, eps=m.eps).reshape(b, m.num_channels, -1) for x in xs]
            gr = [g.reshape(b, m.num_channels, -1) for g in gs]
            if m.weight is not None:  # sum over positions without a (B, C, L) product
                # (B, C)
                out[m.weight] = (
                    sum(torch.einsum("bcl,bcl->bc", x, g) for x, g in zip(xn, gr, strict=False)) * scale)
            if m.bias is not None:
                out[m.bias] = sum(g.sum(2) for g in gr) * scale  # (B, C)
        for p, gs_p in out.items():
            if not p.requires_grad:
                continue
            if getattr(p, "grad_sample", None) is not None:
                raise PerExampleGradientError(
                    "a second backward pass before the optimizer step: per-example gradients would "
                    "accumulate over two batches; call optimizer.step() and zero_grad() after every backward"
                )
            p.grad_sample = gs_p

    # -- state --------------------------------------------------------------------------------

    def pending_calls(self) -> dict[str, tuple[int, int]]:
        """Layers with forward calls whose gradient has not arrived: name -> (calls, gradients)."""
        names = {m: n for n, m in self._module.named_modules()}
        return {names[m]: (len(xs), len(self._grads[m])) for m, xs in self._inputs.items() if xs}

    def clear_pending(self) -> None:
        """Forget captured activations (after an empty batch, or a failed step)."""
        for m in self._layers:
            self._inputs[m], self._grads[m] = [], {}

    def to_standard_module(self) -> nn.Module:
        """Remove hooks, per-example gradients and buffers; returns the wrapped module."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear_pending()
        self._store.clear()
        for p in self._module.parameters():
            if hasattr(p, "grad_sample"):
                del p.grad_sample
        return self._module
