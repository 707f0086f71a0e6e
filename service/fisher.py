"""The diagonal Fisher information of a model's trainable weights, as EWC needs it (the classifiers'
``strategies.ewc`` and the generative ``service.generative_regularisers.GenerativeEWC``).

The Fisher proper: squared gradients of log p(y|x) with y drawn from the model's own prediction.
(Squared gradients of the loss on the true labels vanish wherever the model already fits its data,
which is exactly where the weights matter.) It is estimated a mini-batch at a time without
per-example passes: with y drawn from the model each example's score has mean zero, so the cross
terms of the squared summed gradient vanish in expectation and ``(sum of gradients)^2 / n`` is an
unbiased estimate of the per-example mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch


def drawn_fisher(
    parameters: Mapping[str, torch.Tensor],
    log_probabilities: Iterable[Callable[[], torch.Tensor]],
    examples: int,
    draws: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The Fisher of ``parameters`` over ``examples`` examples, a mini-batch per item of
    ``log_probabilities`` (each computes its rows' log-probabilities, one row per drawn outcome, with
    gradients); the outcomes are drawn with ``draws``. Leaves no gradients behind."""
    fisher = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for log_probabilities_of in log_probabilities:
        for p in parameters.values():
            p.grad = None
        log_p = log_probabilities_of()
        drawn = torch.multinomial(log_p.detach().exp(), 1, generator=draws)
        log_p.gather(1, drawn).sum().backward()
        for name, p in parameters.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().pow(2) / examples
    for p in parameters.values():
        p.grad = None
    return fisher
