"""A plot of an LLC estimate (matplotlib, imported only when called)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["plot_llc"]


def plot_llc(result: Any, ax: Any = None) -> Any:
    """Each chain's :math:`n\\beta(L - L_n(w^*))` along its steps (the adaptation and burn-in
    steps shaded: they are not in the estimate), the estimate, and a band of two standard errors.

    :param result: an :class:`~pyro_sgmcmc.slt.LLCResult`.
    :param ax: a matplotlib ``Axes`` (default: a new figure's).
    :returns: the ``Axes``.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_llc needs matplotlib: pip install matplotlib") from error
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    values = (result.nbeta * (result.loss_trace - result.init_loss)).cpu()
    steps = torch.arange(values.shape[1])
    if result.num_excluded:
        ax.axvspan(0, result.num_excluded, color="0.92", label="adaptation and burn-in")
    for c, row in enumerate(values):
        ax.plot(steps, row, lw=0.6, alpha=0.75, label=f"chain {c}" if values.shape[0] <= 8 else None)
    low, high = result.llc - 2 * result.std_error, result.llc + 2 * result.std_error
    ax.axhspan(low, high, color="k", alpha=0.15, lw=0)
    ax.axhline(result.llc, color="k", lw=1.2, label=f"LLC {result.llc:.4g} ± {result.std_error:.2g}")
    ax.set_xlabel("step")
    ax.set_ylabel(r"$n\beta\,(L - L_n(w^*))$")
    ax.legend(loc="best", fontsize="small")
    return ax
