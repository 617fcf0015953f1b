"""Conditional generation read off a trained pair: completions of partly given images, samples of
requested labels, and whether a classifier trained on real images recognises those samples.

Everything here runs the *model* alone, with z drawn from its prior (for a conditional model, the prior
given the batch's conditioning keys), and reads the mean of the observation p(x | z, ...) at the
model's observed site (:func:`pyrovae.analysis.plots.observation_means`):

- :func:`prior_predictive_means`: S such means per row of a batch (S completions of a context, or S
  samples of a label);
- :func:`completion_grid`: for data with a context ``c`` and a ``target`` mask
  (:mod:`pyrovae.data.quadrants`), one row per example: the input, the truth, S sampled completions;
- :func:`label_samples` and :func:`class_grid`: samples of requested labels, one row per class;
- :func:`generated_label_accuracy`: a logistic-regression classifier (scikit-learn) trained on real
  training images labels the samples; its accuracy on them is the fraction labelled with the class
  they were generated for, beside its accuracy on real test images.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pyrovae.analysis.plots import evaluation_mode, observation_means  # noqa: E402
from pyrovae.files import save_figure


def prior_predictive_means(model, batch: Mapping, samples: int = 1) -> torch.Tensor:
    """(S, B, *x_shape): the mean of p(x | z, conditioning) for S draws of z from the model's prior,
    each run on the whole ``batch`` (its conditioning keys: labels ``y``, a context ``c`` ...)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    with evaluation_mode(model):
        return torch.stack([observation_means(model, None, dict(batch), from_prior=True) for _ in range(samples)])


def _show(axis, image, image_shape, cmap="gray"):
    axis.imshow(np.asarray(image.reshape(*image_shape).float().cpu()), cmap=cmap, vmin=0, vmax=1)
    axis.set_xticks([])
    axis.set_yticks([])


def completion_grid(
    model,
    batch: Mapping,
    path: str | Path,
    image_shape: Sequence[int],
    samples: int = 6,
    count: int = 10,
    inputs: Mapping[str, float] | None = None,
) -> Path:
    """One PNG, one row per example of ``batch`` (its first ``count`` rows): the input (given pixels,
    target pixels grey), the true image, and ``samples`` completions, each the mean of p(y | x, z) with
    z drawn from the prior network p(z | x), pasted into the given pixels."""
    rows = {key: value[:count] if torch.is_tensor(value) else value for key, value in batch.items()}
    rows.update(inputs or {})
    x, c, target = rows["x"], rows["c"], rows["target"]
    count = int(x.shape[0])
    completions = torch.where(target, prior_predictive_means(model, rows, samples), x)
    shown_input = torch.where(target, torch.full_like(c, 0.5), c)
    columns = [("input", shown_input), ("true", x)] + [(f"sample {s + 1}", completions[s]) for s in range(samples)]
    figure, axes = plt.subplots(count, len(columns), figsize=(len(columns) * 0.9, count * 0.9), squeeze=False)
    for column, (title, images) in enumerate(columns):
        axes[0, column].set_title(title, fontsize=7)
        for row in range(count):
            _show(axes[row, column], images[row], image_shape)
    figure.tight_layout()
    path = Path(path)
    save_figure(figure, path, dpi=100)
    plt.close(figure)
    return path


def label_samples(model, labels: torch.Tensor, features: int, inputs: Mapping[str, float] | None = None) -> torch.Tensor:
    """(N, features): the mean of p(x | z, y_n) with z_n from the prior, for each requested label y_n
    (integer classes (N,), or multi-hot rows (N, C)). ``x`` is a placeholder: the prior path never reads it.
    A model that takes ``y_mask`` (semi-supervised ones, such as M2) gets every label marked observed.
    A model with ``generate(y)`` (one whose forward does not decode with the y it is given, such as
    ``joint_multilabel``) is asked through it."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    labels = labels.to(device)
    if callable(getattr(model, "generate", None)):
        with evaluation_mode(model), torch.no_grad():
            return model.generate(labels)
    batch = {"x": torch.zeros(labels.shape[0], features, device=device), "y": labels, **dict(inputs or {})}
    if "y_mask" in inspect.signature(model.forward).parameters:
        batch["y_mask"] = torch.ones(labels.shape[0], dtype=torch.bool, device=device)
    return prior_predictive_means(model, batch, 1)[0]


def class_grid(
    model,
    path: str | Path,
    num_classes: int,
    image_shape: Sequence[int],
    per_class: int = 10,
    class_names: Sequence[str] | None = None,
    inputs: Mapping[str, float] | None = None,
    classes: Sequence[int] | None = None,
    label_format: str = "integer",
) -> Path:
    """One PNG with one row per class c (``classes``, default 0..C-1): ``per_class`` samples generated
    for label c (for ``label_format = "multi_hot"``, for the label vector with only c on)."""
    features = int(np.prod(image_shape))
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    labels = torch.tensor(classes).repeat_interleave(per_class)
    if label_format == "multi_hot":
        labels = torch.nn.functional.one_hot(labels, num_classes)
    images = label_samples(model, labels, features, inputs).reshape(len(classes), per_class, features)
    figure, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.8 + 1.2, len(classes) * 0.8 + 0.2), squeeze=False)
    for row, label in enumerate(classes):
        for column in range(per_class):
            _show(axes[row, column], images[row, column], image_shape)
        name = f"{label}: {class_names[label]}" if class_names else str(label)
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    save_figure(figure, path, dpi=100)
    plt.close(figure)
    return path


def label_classifier(x: torch.Tensor, y: torch.Tensor, max_iter: int = 300, seed: int = 0):
    """A multinomial logistic regression (scikit-learn, L2, lbfgs) fitted to images ``x`` (N, D) with
    integer labels ``y`` (N,)."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=max_iter, random_state=seed)
    classifier.fit(np.asarray(x.reshape(x.shape[0], -1).float().cpu()), np.asarray(y.cpu()))
    return classifier


def classifier_accuracy(classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    predicted = classifier.predict(np.asarray(x.reshape(x.shape[0], -1).float().cpu()))
    return float((predicted == np.asarray(y.cpu())).mean())


def generated_label_accuracy(
    model,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    per_class: int = 100,
    seed: int = 0,
    classifier=None,
    inputs: Mapping[str, float] | None = None,
) -> dict:
    """Train a logistic regression on the real ``train_x`` / ``train_y`` (or take ``classifier``), then
    report its accuracy on the real test images and on ``per_class`` samples generated for each class:

        generated_accuracy = (1 / (C n)) sum_c sum_{i <= n} [classifier(x_ci) = c],  x_ci = E p(x | z_ci, y = c),

    with z_ci from the prior. ``generated_per_class`` holds the same fraction for each class."""
    if classifier is None:
        classifier = label_classifier(train_x, train_y, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        samples = label_samples(model, labels, int(np.prod(train_x.shape[1:])), inputs)
    predicted = torch.as_tensor(classifier.predict(np.asarray(samples.float().cpu())))
    hits = (predicted == labels).float()
    return {
        "real_test_accuracy": classifier_accuracy(classifier, test_x, test_y),
        "generated_accuracy": float(hits.mean()),
        "generated_per_class": [float(v) for v in hits.reshape(num_classes, per_class).mean(1)],
        "samples_per_class": per_class,
        "classifier": "sklearn LogisticRegression (L2, lbfgs) on real training images",
        "train_examples": int(train_x.shape[0]),
        "test_examples": int(test_x.shape[0]),
    }
