"""Capture (u, delta) at every edited weight: the layer inputs and the loss gradient at its outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from mend.models.forward import forward_blocks, scored_logits
from mend.models.params import EditableParam


@contextmanager
def _recording(
    params: list[EditableParam],
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Forward hooks storing (input, output) per edited module; always removed on exit."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            if not output.requires_grad:
                # The base model is frozen: start the autograd graph here, so the backward
                # pass stops at the lowest edited layer instead of running through the model.
                output = output.detach().requires_grad_(True)
            store[name] = (inputs[0].detach(), output)
            return output

        return hook

    handles = [p.module.register_forward_hook(make_hook(p.name)) for p in params]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def capture(
    model,
    params: list[EditableParam],
    batch,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    run: Callable[[], torch.Tensor] | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Run the model on batch, take loss_fn(scored logits) and its gradient at each edited output.

    Args:
        run: computes the scored logits instead of a full forward pass of batch
            (e.g. `UpperStack.logits`, which reruns only the top blocks).

    Returns:
        ({name: (u (R, S, in), delta (R, S, out))} in fp32 and detached, the loss).
        The weight gradient of a Linear is then sum over tokens of delta_i u_i^T.
    """
    with torch.enable_grad(), _recording(params) as store:
        loss = loss_fn(run() if run is not None else scored_logits(model, batch))
        outs = [store[p.name][1] for p in params]
        deltas = torch.autograd.grad(loss, outs, allow_unused=True)
    result = {}
    for p, out, delta in zip(params, outs, deltas, strict=True):
        if delta is None:  # the module does not influence the loss
            delta = torch.zeros_like(out)
        result[p.name] = (store[p.name][0].float(), delta.float())
    return result, loss.detach()


def first_scored_inputs(u: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    """(R, in): each row's input at its first scored position (the prompt's last token)."""
    first = pos_mask.int().argmax(1)
    return u[torch.arange(len(u), device=u.device), first]


@torch.no_grad()
def scored_inputs(
    model, params: list[EditableParam], batches, first: bool = False
) -> dict[str, torch.Tensor]:
    """{name: (rows, in) fp32}: each param's input at every scored position of every batch, in
    order (first: only each row's first scored position, the prompt's last token; a seq2seq
    encoder's weights read each row's last input token, `TokenBatch.key_mask`); one forward
    pass of the base model (no head, no backward) per batch."""
    found: dict[str, list[torch.Tensor]] = {p.name: [] for p in params}
    state = {"batch": None}

    def make_hook(p: EditableParam):
        def hook(module, inputs, output):
            x, mask = inputs[0], state["batch"].key_mask(p.decoder)
            found[p.name].append((first_scored_inputs(x, mask) if first else x[mask]).float())

        return hook

    handles = [p.module.register_forward_hook(make_hook(p)) for p in params]
    try:
        for batch in batches:
            state["batch"] = batch
            forward_blocks(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {
        p.name: torch.cat(found[p.name]) if found[p.name] else torch.zeros(0, p.in_out[0])
        for p in params
    }


def prompt_keys(model, param: EditableParam, batches) -> torch.Tensor:
    """(rows, in) fp32: param's input at every row's first scored position, rows in order."""
    return scored_inputs(model, [param], batches, first=True)[param.name]


class _Seen(Exception):
    """Raised once every hooked matrix has seen the batch: the blocks above need not run."""


@torch.no_grad()
def key_moments(model, params: list[EditableParam], batches) -> dict[str, torch.Tensor]:
    """Second moment E[x x^T] (in, in), float64, of every edited matrix's input.

    Each forward pass stops once every matrix has seen its batch, so the moments of early
    blocks cost only the blocks up to them.

    Args:
        batches: TokenBatches; every real (non-padding) token position of the stack a
            matrix belongs to (`TokenBatch.token_mask`) is one sample.
    """
    sums = {p.name: torch.zeros(p.in_out[0], p.in_out[0], dtype=torch.float64) for p in params}
    counts = dict.fromkeys(sums, 0)
    state = {"batch": None, "seen": set()}

    def make_hook(p: EditableParam):
        def hook(module, inputs, output):
            mask = state["batch"].token_mask(p.decoder)
            x = inputs[0][mask].double().cpu()  # (tokens, in)
            sums[p.name] += x.T @ x
            counts[p.name] += int(mask.sum())
            state["seen"].add(p.name)
            if len(state["seen"]) == len(sums):
                raise _Seen

        return hook

    handles = [p.module.register_forward_hook(make_hook(p)) for p in params]
    try:
        for batch in batches:
            state["batch"], state["seen"] = batch, set()
            with contextlib.suppress(_Seen):
                forward_blocks(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not all(counts.values()):
        raise ValueError("no tokens to estimate key moments from")
    return {name: s / counts[name] for name, s in sums.items()}
