"""A counted black-box view of a model, for query-based attacks.

The oracle answers with probabilities (score-based attacks) or hard labels
(decision-based attacks), never gradients, and counts every query per
example of the attacked batch: a query for example ``i`` is a row of a call
tagged ``i`` in ``rows``.
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUTS = ("probs", "labels")


class QueryOracle:
    """``oracle(x, rows=None) -> probs (n, K) or labels (n,)``; ``oracle.counts`` per example.

    Shape: x (n, C, H, W) in [0, 1]; rows (n,) int64 example ids (default 0..n-1)
    """

    def __init__(self, model: nn.Module, output: str = "probs", batch_size: int = 4096):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model, self.output, self.batch_size = model, output, batch_size
        self.counts = torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        self.accept(x, rows)
        outs = [self.model(chunk) for chunk in x.split(self.batch_size)]
        logits = torch.cat(outs) if outs else x.new_zeros((0, 0))
        return logits.softmax(1) if self.output == "probs" else logits.argmax(1)

    def accept(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Check and count one call's queries; returns their example ids (default 0..n-1) on the CPU."""
        rows = torch.arange(len(x)) if rows is None else rows.detach().cpu().long()
        if len(rows) != len(x):
            raise ValueError(f"rows has {len(rows)} entries for {len(x)} queries")
        self._count(rows)
        return rows

    def _count(self, rows: torch.Tensor) -> None:
        if len(rows) == 0:
            return
        need = int(rows.max()) + 1
        if need > len(self.counts):
            self.counts = torch.cat([self.counts, torch.zeros(need - len(self.counts), dtype=torch.long)])
        self.counts += torch.bincount(rows, minlength=len(self.counts))

    def used(self, n: int) -> torch.Tensor:
        """Queries so far for examples 0..n-1, shape (n,)."""
        out = torch.zeros(n, dtype=torch.long)
        m = min(n, len(self.counts))
        out[:m] = self.counts[:m]
        return out

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def as_oracle(model_or_oracle, output: str) -> QueryOracle:
    """Wrap a model; an oracle passes through when it answers with ``output`` (or probs, for labels)."""
    if isinstance(model_or_oracle, QueryOracle):
        if model_or_oracle.output == output or output == "labels":
            return model_or_oracle
        raise ValueError(f"this attack needs an oracle returning {output!r}, got {model_or_oracle.output!r}")
    return QueryOracle(model_or_oracle, output=output)


def oracle_labels(oracle: QueryOracle, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    out = oracle(x, rows)
    return out if out.ndim == 1 else out.argmax(1)
