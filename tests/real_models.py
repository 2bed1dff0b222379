"""Real data sets with correlated features, for the tests and benchmarks against NUTS."""

from __future__ import annotations

import json
import pathlib

import pyro
import pyro.distributions as dist
import torch

DATA = pathlib.Path(__file__).resolve().parent / "data"


def breast_cancer() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's breast-cancer set: 569 rows, 30 standardised features (14 of them
    correlated above 0.9 with another), a binary label."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.tensor(data.target, dtype=torch.float32)


def breast_cancer_model(x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> None:
    """Bayesian logistic regression: bias ~ N(0, 5^2), w ~ N(0, I)."""
    bias = pyro.sample("bias", dist.Normal(0.0, 5.0))
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", len(y), subsample_size=batch_size) as idx:
        pyro.sample("y", dist.Bernoulli(logits=bias + x[idx] @ w), obs=y[idx])


def flat_draws(samples: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[num_samples, 31]``: bias, then w."""
    return torch.cat([samples["bias"].reshape(-1, 1), samples["w"]], 1).double()


def reference(name: str) -> dict:
    """A long NUTS run's posterior moments (``tests/data/<name>_nuts.json``, made by
    ``benchmarks/real_models.py --reference``)."""
    return json.loads((DATA / f"{name}_nuts.json").read_text())
