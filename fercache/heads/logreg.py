"""Logistic-regression probe, the CLIP paper's linear-probe protocol (Radford et al. 2021, appendix A.3).

Same model as `linear` (standardised or L2-normalised features -> Linear), fitted differently: full-batch
L-BFGS to convergence of mean cross-entropy + l2 * ||W||^2 (bias not penalised), for each l2 of a grid from
strong to weak (each warm-started from the last), keeping the weights whose validation metric is best. No
learning rate, epochs or batch size to tune, and the regularisation is chosen on validation, never on test,
so its numbers compare with published linear-probe tables. Cached augmented views (flip) join the training
rows as extra samples; validation, like every head, scores the average over views.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._registry import BASE_RECIPE, HeadContext, register_head
from .linear import LinearProbe

L2_GRID = [10.0 ** k for k in range(1, -7, -1)]  # 10 .. 1e-6, strong to weak


class LogRegProbe(LinearProbe):
    def __init__(self, in_dim: int, out_dim: int, normalize: bool, l2: list[float]):
        super().__init__(in_dim, out_dim, normalize)
        self.l2 = sorted(l2, reverse=True)

    def _features(self, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The training rows (with every cached view as a row of its own), after the probe's own scaling."""
        x, y = data["x"], data["y"]
        if "xv" in data:
            x = torch.cat([x] + [data["xv"][:, v] for v in range(data["xv"].shape[1])])
            y = y.repeat(data["xv"].shape[1] + 1)
        x = x.float()
        return (nn.functional.normalize(x, dim=-1) if self.normalize else (x - self.mu) / self.sigma), y

    def solve(self, train: dict, val_score, recipe: dict) -> dict:
        """Fit every l2 of the grid; keep the best on `val_score(self)`; returns the path (l2, loss, val score)."""
        x, y = self._features(train)
        # A convex problem: from zeros, every seed reaches the same weights (the seed only matters for subsets)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        best, path = None, []
        for l2 in self.l2:
            def objective(l2=l2):
                return nn.functional.cross_entropy(self.fc(x), y) + l2 * self.fc.weight.pow(2).sum()

            opt = torch.optim.LBFGS(self.fc.parameters(), lr=1, max_iter=recipe["max_iter"], history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

            def closure():
                opt.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            self.train()
            opt.step(closure)
            with torch.no_grad():
                path.append({"l2": l2, "loss": float(objective()), "val": val_score(self)})
            if best is None or path[-1]["val"] > best[0]["val"]:
                best = (path[-1], copy.deepcopy(self.state_dict()))
        self.load_state_dict(best[1])
        return {"method": "L-BFGS, l2 chosen on validation", "path": path, "l2": best[0]["l2"]}


# not trained by the epoch loop: `solve` fits it
@register_head("logreg", recipe={**BASE_RECIPE, "epochs": 0, "max_iter": 200}, trainable=False)
def logreg(ctx: HeadContext, *, normalize: bool = False, l2: list[float] | None = None) -> LogRegProbe:
    """Logistic-regression probe (CLIP paper protocol): L-BFGS to convergence, L2 strength chosen on validation."""
    return LogRegProbe(ctx.in_dim, ctx.out_dim, normalize, list(l2) if l2 is not None else L2_GRID)
