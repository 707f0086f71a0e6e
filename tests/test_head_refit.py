"""Refitting the shared head after a round: fitted to convergence where the rehearsed examples hold
every label (joint), left alone where they do not (a head refit on new labels alone would forget)."""

from __future__ import annotations

import torch

from service.datasets import TaskData, synthetic
from service.head_refit import refit_head
from service.learner import SHARED_ADAPTER
from service.model import build_model
from service.settings import Settings
from tests.helpers import train_in_process


def head(trainer_settings: Settings, tasks: list[TaskData], refit: bool) -> tuple[torch.Tensor, float]:
    """The shared head after one round on ``tasks``, and its accuracy on their training texts."""
    settings = trainer_settings.model_copy(
        update={"head_refit": refit, "registry_dir": trainer_settings.registry_dir / str(refit)}
    )
    trainer = train_in_process(settings, tasks)
    training = trainer.training
    rows = [(text, training.column(task.name, label)) for task in tasks for text, label in task.train]
    scores = training.predict_columns(SHARED_ADAPTER, [t for t, _ in rows], range(len(training.columns)))
    right = (scores.argmax(-1) == torch.tensor([c for _, c in rows])).float().mean()
    return training.model.heads[SHARED_ADAPTER].weight.detach().clone(), float(right)


def test_joint_refits_its_head_and_fits_its_examples_at_least_as_well(settings: Settings) -> None:
    settings = settings.model_copy(update={"strategy": "joint", "epochs": 1})
    tasks = synthetic(num_tasks=2)
    trained, trained_fit = head(settings, tasks, refit=False)
    refit, refit_fit = head(settings, tasks, refit=True)
    assert not torch.equal(trained, refit)
    assert refit_fit >= trained_fit


def test_a_head_is_left_alone_when_the_rehearsed_examples_miss_a_label(settings: Settings) -> None:
    model = build_model(settings)
    model.add("shared", num_labels=3)
    texts = ["alpha one", "beta two", "gamma three", "alpha four", "beta five", "gamma six"]
    before = model.heads["shared"].weight.detach().clone()
    # Column 2 in use but absent (as a naive round's new examples miss the old labels): untouched.
    missing = [(t, i % 2) for i, t in enumerate(texts)]
    assert not refit_head(model, "shared", missing, in_use=3, batch_size=4)
    assert torch.equal(model.heads["shared"].weight, before)
    # Every column present: refit, and the examples are then fitted.
    every = [(t, i % 3) for i, t in enumerate(texts)]
    assert refit_head(model, "shared", every, in_use=3, batch_size=4)
    assert not torch.equal(model.heads["shared"].weight, before)
    answers = model.predict("shared", texts)[:, :3].argmax(-1).tolist()
    assert answers == [c for _, c in every]
