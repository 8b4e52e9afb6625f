"""Editor networks g: (u, delta) per token -> transformed (u~, delta~), and their container."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mend.config import EditorConfig
from mend.derived import Derived
from mend.editor.norm import RunningNorm


class LowRankBlock(nn.Module):
    """Residual low-rank block, the identity at initialisation.

    out = z + s_l * U relu(V z + b) + o_l, with U zero-initialised and FiLM scale/shift
    (s_l, o_l) per edited matrix l, initialised to 1 and 0. The paper's literal form,
    z + relu(s_l (U V z + b) + o_l), starts with every pre-activation at exactly 0, where
    relu's gradient is 0, so nothing would ever train; this form has the same identity
    start and a live gradient into U from the first step.
    """

    def __init__(self, dim: int, rank: int, n_layers: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)  # V, b
        self.up = nn.Linear(rank, dim, bias=False)  # U
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, dim))
        self.low = Derived()  # V, b, U in a lower precision, made on demand

    def forward(
        self, z: torch.Tensor, layer_ids: torch.Tensor, low: torch.dtype | None = None
    ) -> torch.Tensor:
        """z (N, dim), layer_ids (N,) -> (N, dim).

        Args:
            low: run the branch's two products in this dtype (e.g. bfloat16), from a cached
                copy of V, b, U; the residual and FiLM stay in z's precision. No gradient.
        """
        if low is None:
            h = self.up(torch.relu(self.down(z)))
        else:
            if torch.is_grad_enabled():
                raise RuntimeError("low-precision editor products carry no gradient: use no_grad")
            ws = (self.down.weight, self.down.bias, self.up.weight)
            down_w, down_b, up_w = self.low.get(low, ws, lambda *t: tuple(x.to(low) for x in t))
            h = F.linear(torch.relu(F.linear(z.to(low), down_w, down_b)), up_w).to(z.dtype)
        return z + self.scale[layer_ids] * h + self.shift[layer_ids]

    def train(self, mode: bool = True):
        if mode != self.training:  # (fused Adam's steps in training mode bump no version)
            self.low.clear()
        return super().train(mode)


class MatrixNet(nn.Module):
    """One editor for all edited matrices of one (in, out) shape."""

    def __init__(self, d_in: int, d_out: int, n_layers: int, cfg: EditorConfig):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        rank = min(cfg.rank, dim)
        self.norm_u = RunningNorm(n_layers, d_in, cfg.input_clip)
        self.norm_d = RunningNorm(n_layers, d_out, cfg.input_clip)
        self.blocks = nn.ModuleList(LowRankBlock(dim, rank, n_layers) for _ in range(cfg.n_blocks))

    def forward(
        self,
        u: torch.Tensor,
        delta: torch.Tensor,
        layer_ids: torch.Tensor,
        low: torch.dtype | None = None,
    ):
        """u (N, in), delta (N, out), layer_ids (N,) -> (u~ (N, in), delta~ (N, out)).

        The outputs stay in normalised space: alpha absorbs the overall scale. `low`: see
        `LowRankBlock.forward`.
        """
        z = torch.cat([self.norm_u(u, layer_ids), self.norm_d(delta, layer_ids)], dim=-1)
        for block in self.blocks:
            z = block(z, layer_ids, low)
        return z[:, : self.d_in], z[:, self.d_in :]


class EditorNet(nn.Module):
    """All editor networks for one model, plus the learned step size of every edited matrix.

    Args:
        shapes: ordered {weight name: (in_features, out_features)} of the edited matrices.
        cfg: the editor configuration.

    The step size is stored as log(alpha): Adam then moves it by a relative amount, so it
    can neither collapse to zero nor change sign (a failure seen in other implementations).

    Key preconditioning (cfg.precondition, not in the MEND paper): every u~ is multiplied by
    P = (C / m + lambda I)^-1, C the second moment of the matrix's inputs over some text and m
    its mean eigenvalue. This is ROME's insight applied to MEND: an update along C^-1 k
    changes the output at key k while disturbing typical other keys least. P is a buffer,
    the identity until `set_key_moments`, and is saved with the editor.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], cfg: EditorConfig):
        super().__init__()
        self.cfg = cfg
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.names = list(self.shapes)
        # Which net each matrix uses, and its index among that net's matrices (for FiLM).
        self.net_key: dict[str, str] = {}
        self.layer_index: dict[str, int] = {}
        members: dict[str, list[str]] = {}
        for i, (name, (d_in, d_out)) in enumerate(self.shapes.items()):
            key = f"{d_in}x{d_out}" if cfg.share else f"m{i}"
            self.net_key[name] = key
            self.layer_index[name] = len(members.setdefault(key, []))
            members[key].append(name)
        self.nets = nn.ModuleDict(
            {
                key: MatrixNet(*self.shapes[names[0]], len(names), cfg)
                for key, names in members.items()
            }
        )
        self.members = members
        self.log_alpha = nn.Parameter(torch.full((len(self.names),), math.log(cfg.init_alpha)))
        if cfg.aggregate == "ls":
            self.learn_ridge()
        if cfg.precondition is not None:
            for i, (d_in, _) in enumerate(self.shapes.values()):
                self.register_buffer(f"precond_{i}", torch.eye(d_in))
        if cfg.shared_rank:
            r = cfg.shared_rank
            for i, (d_in, d_out) in enumerate(self.shapes.values()):
                self.register_buffer(f"shared_out_{i}", torch.zeros(d_out, r))
                self.register_buffer(f"shared_in_{i}", torch.zeros(d_in, r))

    def alpha(self, name: str) -> torch.Tensor:
        return self.log_alpha[self.names.index(name)].exp()

    def learn_ridge(self) -> None:
        """Give every matrix a learned least-squares ridge (relative to its keys' mean squared
        norm), starting at cfg.init_ridge; editors trained to sum their changes have none."""
        if not hasattr(self, "log_ridge"):
            full = torch.full((len(self.names),), math.log(self.cfg.init_ridge))
            self.log_ridge = nn.Parameter(full.to(self.log_alpha.device))

    def ridge(self, name: str) -> torch.Tensor:
        """The least-squares ridge of matrix `name` (its learned one, or cfg.init_ridge)."""
        if not hasattr(self, "log_ridge"):
            return torch.tensor(self.cfg.init_ridge)
        return self.log_ridge[self.names.index(name)].exp()

    def preconditioner(self, name: str) -> torch.Tensor | None:
        if self.cfg.precondition is None:
            return None
        return getattr(self, f"precond_{self.names.index(name)}")

    def shared(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A (out, r), B (in, r)): orthonormal bases of the change all edits share, or None."""
        if not self.cfg.shared_rank:
            return None
        i = self.names.index(name)
        return getattr(self, f"shared_out_{i}"), getattr(self, f"shared_in_{i}")

    @torch.no_grad()
    def set_shared(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store, per matrix, A (out, r) and B (in, r) spanning the change every edit shares.

        Every trained editor's change has a large part that is the same for all edits (see
        `edit.fit_shared`); a batched edit of k requests would add it k times.
        """
        ranks = {a.shape[1] for a, b in bases.values()} | {b.shape[1] for a, b in bases.values()}
        if set(bases) != set(self.names) or len(ranks) != 1:
            raise ValueError("set_shared needs bases of one rank for every edited matrix")
        self.cfg.shared_rank = ranks.pop()
        device = self.log_alpha.device
        for i, name in enumerate(self.names):
            a, b = bases[name]
            self.register_buffer(f"shared_out_{i}", a.detach().float().to(device).contiguous())
            self.register_buffer(f"shared_in_{i}", b.detach().float().to(device).contiguous())

    @torch.no_grad()
    def set_key_moments(self, moments: dict[str, torch.Tensor]) -> None:
        """Set each matrix's preconditioner from C (in, in), the mean of x x^T over its inputs."""
        lam = self.cfg.precondition
        if lam is None:
            raise ValueError("this editor was configured without preconditioning")
        for name, c in moments.items():
            c = c.double()
            c = c / c.diagonal().mean()
            p = torch.linalg.inv(c + lam * torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
            self.preconditioner(name).copy_((p + p.T) / 2)

    def _grouped(self, captured: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """Per network: (its key, the matrices of captured it serves, their u and delta
        stacked, each token's matrix index among that network's matrices)."""
        for key, names in self.members.items():
            present = [n for n in names if n in captured]
            if not present:
                continue
            us = torch.cat([captured[n][0] for n in present])
            ds = torch.cat([captured[n][1] for n in present])
            ids = torch.cat([torch.full((len(captured[n][0]),), self.layer_index[n], dtype=torch.long)
                             for n in present]).to(us.device)  # fmt: skip
            yield key, present, us, ds, ids

    @torch.no_grad()
    def observe(self, captured: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Merge tokens {name: (u (N, in), delta (N, out))} into the running statistics that
        normalise the networks' inputs (what a forward pass in training mode does first)."""
        for key, _, us, ds, ids in self._grouped(captured):
            self.nets[key].norm_u.update(us, ids)
            self.nets[key].norm_d.update(ds, ids)

    def forward(
        self,
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]],
        low: torch.dtype | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Transform token pairs of every edited matrix in one batched call per net.

        Args:
            captured: {name: (u (N_name, in), delta (N_name, out))} in fp32.
            low: e.g. torch.bfloat16: the low-rank branches' products in that dtype, from
                cached copies of their weights (`mend.derived`); the normalisation, residuals,
                FiLM and preconditioner stay fp32, so an identity editor stays exact. For
                edits (no gradient): an edit reads every editor weight for a handful of
                tokens, so its cost is the bytes read, and bf16 halves them (u~ and delta~
                stay within bf16 rounding of the fp32 ones).

        Returns:
            {name: (u~ (N_name, in), delta~ (N_name, out))}.
        """
        out = {}
        for key, present, us, ds, ids in self._grouped(captured):
            u_t, d_t = self.nets[key](us, ds, ids, low)
            sizes = [captured[n][0].shape[0] for n in present]
            for n, u_n, d_n in zip(present, u_t.split(sizes), d_t.split(sizes), strict=True):
                p = self.preconditioner(n)
                out[n] = (u_n if p is None else u_n @ p, d_n)
        return out
