"""Is a token the argmax of the vocabulary projection? Decided from a bf16 pass over the head.

Checking an edit asks one question per target token: is it the model's top prediction? The
answer needs every logit, and the vocabulary projection is the largest matrix of a small model
(49,152 x 576 for SmolLM2-135M). Read in bf16 it costs a fraction of an fp32 pass on CPUs with
bf16 units, and its error is bounded, so the bf16 logits settle every token that is not close
to the target's; the few that are get exact fp32 dot products. The decision is the fp32
argmax's (up to fp32 rounding of a dot product), at about the cost of the bf16 pass.
"""

from __future__ import annotations

import torch

from mend.derived import Derived

# |bf16 logit - fp32 logit| <= BOUND * ||w_j|| * ||h||: rounding w and h to bf16 (2^-9 each),
# rounding the output (2^-9 of |z| <= ||w|| ||h||) and fp32 accumulation (~d * 2^-24): below
# 2^-8 + 2^-9 + 2^-14 in all, so 2^-7 leaves room.
BOUND = 2.0**-7
MAX_CONTENDERS = 4096  # beyond this many close tokens a row is projected exactly in full


class HeadArgmax:
    """`is_argmax(hidden, labels)` for a model's output head.

    Args:
        head: the output embedding module. A bias-free or biased fp32 `nn.Linear` gets the
            bf16 route; anything else (a bf16 head, a custom module) is simply projected.
    """

    def __init__(self, head: torch.nn.Module):
        self.head = head
        self.fast = isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32
        self._derived = Derived()  # the bf16 copy and row norms of the head's weight

    @torch.no_grad()
    def is_argmax(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(P,) bool: labels[p] is the argmax (first index on ties) of head(hidden[p]).

        Args:
            hidden: (P, d) final normed hidden states.
            labels: (P,) token ids.
        """
        if not self.fast:
            return self.head(hidden).float().argmax(-1) == labels
        self.w16, self.norms = self._derived.get(
            "head", (self.head.weight,), lambda w: (w.bfloat16(), w.norm(dim=1))
        )
        w, bias = self.head.weight, self.head.bias
        hidden = hidden.float()
        z = (hidden.bfloat16() @ self.w16.T).float()  # (P, V)
        if bias is not None:
            z += bias.float()
        err = BOUND * hidden.norm(dim=-1, keepdim=True) * self.norms  # (P, V)
        rows = torch.arange(len(labels), device=labels.device)
        floor = z[rows, labels] - err[rows, labels]  # the target's exact logit is above this
        ceil = z[rows, labels] + err[rows, labels]  # ... and below this
        contenders = z + err >= floor[:, None]  # tokens that might beat the target
        contenders[rows, labels] = False
        lost = (z - err > ceil[:, None]).any(-1)  # a token surely beats the target
        out = ~lost
        for p in (contenders.any(-1) & ~lost).nonzero()[:, 0].tolist():
            idx = contenders[p].nonzero()[:, 0]
            if len(idx) > MAX_CONTENDERS:
                out[p] = self.head(hidden[p : p + 1]).float().argmax(-1)[0] == labels[p]
                continue
            cand = torch.cat([labels[p : p + 1], idx])
            exact = w[cand].float() @ hidden[p]
            if bias is not None:
                exact += bias[cand].float()
            target, others = exact[0], exact[1:]
            beaten = (others > target) | ((others == target) & (idx < labels[p]))
            out[p] = not bool(beaten.any())
        return out


CHUNK_ROWS = 1024  # vocabulary rows per batch entry of the CPU head products (2.4 MB at d = 576)


def _chunked(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The head's rows as (n, CHUNK_ROWS, d) full chunks and the tail rows, or None where the
    plain product is used: off the CPU, for small or non-contiguous heads, and outside fp32
    (a bf16 head runs slower chunked)."""
    n = weight.shape[0] // CHUNK_ROWS
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or n < 2 or not weight.is_contiguous():  # fmt: skip
        return None
    return weight[: n * CHUNK_ROWS].view(n, CHUNK_ROWS, -1), weight[n * CHUNK_ROWS :]


def head_logits(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """hidden @ weight^T: (P, d), (V, d) -> (P, V).

    On the CPU, as one batched product over chunks of the vocabulary: for the few positions
    an edit or a step scores, MKL ran the plain (V, d) x (d, P) product far below the
    machine's memory bandwidth (as a matrix-vector product for P = 1), and a batch of chunks
    spreads over the cores; the fewer the positions, the larger the gain. Each logit is the
    same dot product either way.
    """
    split = _chunked(weight)
    if split is None:
        return (weight @ hidden.T).T
    chunks, tail = split
    z = torch.bmm(chunks, hidden.T.expand(len(chunks), -1, -1)).reshape(-1, hidden.shape[0])
    if len(tail):
        z = torch.cat([z, tail @ hidden.T])
    return z.T


def head_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight: (P, V), (V, d) -> (P, d), the gradient into the head's input.

    On the CPU, chunk by chunk of the vocabulary in one batched product, then summed (the
    same sum in another order), which spreads over the cores as in `head_logits`.
    """
    split = _chunked(weight)
    if split is None:
        return grad @ weight
    chunks, tail = split
    n, rows, _ = chunks.shape
    out = torch.bmm(grad[:, : n * rows].reshape(-1, n, rows).transpose(0, 1), chunks).sum(0)
    return out + grad[:, n * rows :] @ tail if len(tail) else out


class _Project(torch.autograd.Function):
    """Logits hidden @ W^T through `head_logits`, their gradient into hidden via `head_grad`
    (W is taken as a constant here: see `_WeightGrad`)."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(weight)
        return head_logits(weight, hidden)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return head_grad(grad, weight), None


class _WeightGrad(torch.autograd.Function):
    """Zeros (P, V) whose backward carries the head weight's gradient, grad^T @ hidden.

    A node of its own, so autograd runs it only when that gradient is asked for: capturing an
    edit's gradient (`torch.autograd.grad` to the edited layers) skips it even when the head
    still has requires_grad set, where a single function would form a (V, d) gradient (a
    product as large as the head itself) that is thrown away.
    """

    @staticmethod
    def forward(ctx, weight, hidden):
        ctx.save_for_backward(hidden)
        return hidden.new_zeros(hidden.shape[0], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (hidden,) = ctx.saved_tensors
        return grad.T @ hidden, None


def project(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """head(hidden) as fp32 logits (P, V), for final normed hidden states (P, d).

    An fp32 `nn.Linear` head goes through `head_logits` / `head_grad` (chunked on the CPU,
    and in the (W @ h^T)^T orientation elsewhere, which MKL ran faster than `linear`'s
    h @ W^T: see docs/ARCHITECTURE.md). Same product; its gradients are the layer's.
    """
    w = getattr(head, "weight", None)
    if type(head) is torch.nn.Linear and w.dtype == hidden.dtype == torch.float32 and hidden.dim() == 2:  # fmt: skip
        z = _Project.apply(hidden, w.detach())
        if w.requires_grad and torch.is_grad_enabled():
            z = z + _WeightGrad.apply(w, hidden.detach())
        return z if head.bias is None else z + head.bias
    return head(hidden).float()


class _ProjectEdited(torch.autograd.Function):
    """(W @ [edited; base]^T)^T with a gradient into `edited` alone (W frozen)."""

    @staticmethod
    def forward(ctx, edited, base, weight):
        ctx.save_for_backward(weight)
        ctx.n = edited.shape[0]
        return head_logits(weight, torch.cat([edited, base]))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return head_grad(grad[: ctx.n], weight), None, None


def project_with_base(head: torch.nn.Module, hidden: torch.Tensor, base: torch.Tensor | None):
    """`project` of hidden and base (P_b, d; None: none) stacked in one pass over the head;
    the gradient flows into `hidden` only.

    Training projects edited and unedited states together (one read of the head), but the
    unedited ones need no gradient: a plain concatenation would backpropagate through all
    rows, and the unedited ones are a large share of a step's scored positions.
    """
    if base is None:
        return project(head, hidden)
    w = getattr(head, "weight", None)
    plain_fp32 = type(head) is torch.nn.Linear and w.dtype == hidden.dtype == torch.float32
    if not plain_fp32 or w.requires_grad or hidden.dim() != 2:
        return project(head, torch.cat([hidden, base]))
    z = _ProjectEdited.apply(hidden, base.detach(), w)
    return z if head.bias is None else z + head.bias
