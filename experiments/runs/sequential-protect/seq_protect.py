"""Sequential edits, each kept off the inputs of the earlier (still applied) edits."""
import sys, time, torch
from mend.models import load_model
from mend.checkpoint import load_editor
from mend.edit import MendEditor
from mend.data import load_checked
from mend.models import context_length
from mend.evaluate import score, summarize
torch.set_num_threads(2)
n, every = int(sys.argv[1]), int(sys.argv[2])
betas = [float(b) for b in sys.argv[3:]]
model, tok = load_model("smollm2-135m")
edits = load_checked("counterfact-val", tok, context_length(model), limit=n)
base = {k: score(model, tok, edits[:k]) for k in range(every, n + 1, every)}
ed = load_editor("runs/bench5s", model)

def ridge(keys, beta, lam=1e-2):
    parts = {}
    for name, k in keys.items():
        g = k @ k.T
        g = g + lam * g.diagonal().mean() * torch.eye(len(k))
        parts[name] = (k, torch.linalg.solve(g, k))
    def project(f):
        return {nm: (u - beta * (u @ parts[nm][0].T) @ parts[nm][1], d) for nm, (u, d) in f.items()}
    return project

class Protect(MendEditor):
    beta = 1.0
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw); self._kept = []
    def _shield_of(self, captured, batch):
        inner = super()._shield_of(captured, batch)
        self._pending = {nm: u[batch.pos_mask].float() for nm, (u, _) in captured.items()}
        live = [k for r, k in self._kept if not r.reverted]
        if not live or self.beta == 0:
            return inner
        proj = ridge({nm: torch.cat([k[nm] for k in live]) for nm in self._pending}, self.beta)
        return lambda f: proj(inner(f))
    def edit(self, requests):
        r = super().edit(requests); self._kept.append((r, self._pending)); return r

for beta in betas:
    me = Protect(model, tok, ed); me.beta = beta
    res = []; t = time.time()
    for i, r in enumerate(edits):
        res.append(me.edit([r]))
        if i + 1 in base:
            s = summarize(score(model, tok, edits[: i + 1], base[i + 1])["metrics"])
            print(f"beta={beta}", i + 1, {k: round(v, 3) for k, v in s.items() if v is not None}, f"{time.time()-t:.0f}s", flush=True)
    print("edit ms median", sorted(x.seconds for x in res)[len(res)//2]*1000, flush=True)
    for r in reversed(res): r.revert()
