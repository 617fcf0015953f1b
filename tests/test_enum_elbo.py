"""enum_elbo: Pyro's TraceEnum_ELBO loss and gradients, with metrics that equal the exact sums."""

import contextlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from pyrovae.errors import UnsupportedPairError
from pyrovae.handlers import kl_scale
from pyrovae.objectives import EnumELBO

X = torch.tensor([-0.4, 1.3, 3.1, 2.2, 0.2])
Y = torch.tensor([1, 0, 0, 1, 0])
Y_MASK = torch.tensor([True, False, True, False, False])
X_MASK = torch.tensor([True, True, False, True, True])
PRIOR_MASK = torch.tensor([True, False, True, True, False])
PRIOR_Y = torch.tensor([0.2, 0.5, 0.3])
MEANS = torch.tensor([-1.0, 1.0, 3.0])
BATCH = {"x": X, "y": Y, "y_mask": Y_MASK}


class Pair(torch.nn.Module):
    """An M2-shaped toy: y ~ Cat(PRIOR_Y) observed where Y_MASK, z ~ N(0, 1), x ~ N(z + MEANS[y], 1)
    masked by X_MASK; q(y | x) enumerated where the label is hidden, q(z | x, y) Normal."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Linear(1, 3)
        self.encoder = torch.nn.Linear(2, 2)

    def model(self, x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample("y", dist.Categorical(PRIOR_Y), obs=y, obs_mask=y_mask)
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with poutine.mask(mask=X_MASK):
                pyro.sample("x", dist.Normal(z + MEANS[label], 1.0), obs=x)

    def guide(self, x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            logits = self.classifier(x.unsqueeze(-1))
            guess = pyro.sample(
                "y_unobserved", dist.Categorical(logits=logits).mask(~y_mask), infer={"enumerate": "parallel"}
            )
            label = torch.where(y_mask, y, guess)
            features = torch.stack(torch.broadcast_tensors(x, MEANS[label]), -1)
            loc, raw_scale = self.encoder(features).unbind(-1)
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw_scale) + 0.1))


class Mixture(torch.nn.Module):
    """y ~ Cat(softmax(w)) summed out in the model, z ~ N(0, 1), x ~ N(means[y] + a z, 1);
    q(z | x) Normal. Every part has parameters, so gradients are compared everywhere."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([0.1, -0.3, 0.2]))
        self.means = torch.nn.Parameter(MEANS.clone())
        self.a = torch.nn.Parameter(torch.tensor(0.7))
        self.encoder = torch.nn.Linear(1, 2)

    def model(self, x, **_):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(self.means[y] + self.a * z, 1.0), obs=x)

    def guide(self, x, **_):
        with pyro.plate("data", x.shape[0]):
            loc, raw_scale = self.encoder(x.unsqueeze(-1)).unbind(-1)
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw_scale) + 0.1))


def mixture_model(x, **_):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(PRIOR_Y), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(MEANS[y], 1.0), obs=x)


def no_guide(x, **_):
    pass


def gradients(module):
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def ours_and_pyros(pair, batch, particles, ours_beta, pyros_beta, seed=0):
    """(loss, metrics, gradients) of enum_elbo under ``kl_scale(*ours_beta)`` and (loss, gradients) of
    Pyro's TraceEnum_ELBO under ``kl_scale(*pyros_beta)``, on the same draws."""
    objective = EnumELBO(particles=particles)
    objective.prepare(pair.model, pair.guide, batch)
    pyro.set_rng_seed(seed)
    with kl_scale(*ours_beta):
        loss, metrics = objective(pair.model, pair.guide, batch)
    loss.backward()
    ours = gradients(pair)
    pair.zero_grad()
    pyro.set_rng_seed(seed)
    reference = TraceEnum_ELBO(max_plate_nesting=1, num_particles=particles, vectorize_particles=True)
    with kl_scale(*pyros_beta):
        pyro_loss = reference.differentiable_loss(pair.model, pair.guide, **batch) / len(batch["x"])
    pyro_loss.backward()
    theirs = gradients(pair)
    pair.zero_grad()
    return (loss.detach(), metrics, ours), (pyro_loss.detach(), theirs)


@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("particles", [1, 3])
def test_loss_and_gradients_equal_pyros_with_the_label_enumerated_in_the_guide(beta, particles):
    (loss, metrics, ours), (pyro_loss, theirs) = ours_and_pyros(Pair(), BATCH, particles, (beta,), (beta,))
    assert float(loss.detach()) == pytest.approx(float(pyro_loss.detach()), abs=1e-5)
    assert torch.allclose(ours, theirs, atol=1e-5)
    if beta == 1.0:
        assert float(metrics["elbo"]) == pytest.approx(-float(pyro_loss.detach()), abs=1e-5)


@pytest.mark.parametrize("particles", [1, 3])
def test_loss_and_gradients_equal_pyros_with_the_label_summed_out_in_the_model(particles):
    pair = Mixture()
    (loss, metrics, ours), (pyro_loss, theirs) = ours_and_pyros(pair, {"x": X}, particles, (1.0,), (1.0,))
    assert float(loss.detach()) == pytest.approx(float(pyro_loss.detach()), abs=1e-5)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(-float(pyro_loss.detach()), abs=1e-5)
    assert set(metrics) == {"elbo", "reconstruction", "kl/z"}  # y has no KL: it is in the reconstruction
    # Under kl_scale the site summed out in the model keeps beta = 1 (it has no KL term): that is
    # Pyro's loss with beta 0.3 everywhere else.
    (loss, annealed, ours), (pyro_loss, theirs) = ours_and_pyros(pair, {"x": X}, particles, (0.3,), ({"y": 1.0}, 0.3))
    assert float(loss.detach()) == pytest.approx(float(pyro_loss.detach()), abs=1e-5)
    assert torch.allclose(ours, theirs, atol=1e-5)
    for key in metrics:
        assert float(annealed[key]) == pytest.approx(float(metrics[key]), abs=1e-5), key


def test_metrics_under_annealing_are_the_unannealed_ones_on_the_same_draws():
    pair = Pair()
    objective = EnumELBO()
    objective.prepare(pair.model, pair.guide, BATCH)
    pyro.set_rng_seed(4)
    plain_loss, plain = objective(pair.model, pair.guide, BATCH)
    plain_loss = plain_loss.detach()
    pyro.set_rng_seed(4)
    with kl_scale(0.3):
        annealed_loss, annealed = objective(pair.model, pair.guide, BATCH)
    annealed_loss = annealed_loss.detach()
    assert float(plain_loss) != pytest.approx(float(annealed_loss.detach()), abs=1e-3)
    assert set(annealed) == {"elbo", "reconstruction", "kl/y_unobserved", "kl/z"}
    for key in plain:
        assert float(annealed[key]) == pytest.approx(float(plain[key]), abs=1e-5), key
    assert float(plain["elbo"]) == pytest.approx(-float(plain_loss), abs=1e-5)
    assert float(plain["elbo"]) == pytest.approx(float(plain["reconstruction"] - plain["kl/y_unobserved"] - plain["kl/z"]), abs=1e-5)


def test_metrics_equal_the_exact_sums_over_an_enumerated_guide_site():
    """Everything discrete: the ELBO, the KL of q(y | x) and the reconstruction are exact sums."""
    q_logits = torch.tensor([[0.3, -0.2, 0.5]]).expand(len(X), 3)

    def guide(x, **_):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=q_logits), infer={"enumerate": "parallel"})

    def model(x, **_):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(PRIOR_Y))
            with poutine.mask(mask=X_MASK):
                pyro.sample("x", dist.Normal(MEANS[y], 1.0), obs=x)

    loss, metrics = EnumELBO()(model, guide, {"x": X})
    q = torch.softmax(q_logits, -1)
    log_likelihood = dist.Normal(MEANS, 1.0).log_prob(X.unsqueeze(-1)) * X_MASK.unsqueeze(-1)  # (B, 3)
    reconstruction = (q * log_likelihood).sum(-1).mean()
    kl = (q * (q.log() - PRIOR_Y.log())).sum(-1).mean()
    assert float(metrics["reconstruction"]) == pytest.approx(float(reconstruction), abs=1e-5)
    assert float(metrics["kl/y"]) == pytest.approx(float(kl), abs=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(float((reconstruction - kl).detach()), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(-float((reconstruction - kl).detach()), abs=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("how", ["poutine.mask", "Distribution.mask"])
def test_masks_in_the_model_change_the_metrics_as_the_masked_terms_say(how, beta):
    """A mask on the prior of y (one kind or the other) and on x: each metric equals the
    hand-computed sum over y of the masked terms, annealed or not."""
    q_logits = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.1, -0.4], [1.0, 0.0, 0.2], [-0.5, 0.3, 0.3], [0.0, 0.2, 0.4]])

    def guide(x, **_):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=q_logits), infer={"enumerate": "parallel"})

    def model(x, **_):
        with pyro.plate("data", x.shape[0]):
            if how == "poutine.mask":
                with poutine.mask(mask=PRIOR_MASK):
                    y = pyro.sample("y", dist.Categorical(PRIOR_Y))
            else:
                y = pyro.sample("y", dist.Categorical(PRIOR_Y).mask(PRIOR_MASK))
            with poutine.mask(mask=X_MASK):
                pyro.sample("x", dist.Normal(MEANS[y], 1.0), obs=x)

    with kl_scale(beta):
        loss, metrics = EnumELBO()(model, guide, {"x": X})
    q = torch.softmax(q_logits, -1)
    reconstruction = (q * dist.Normal(MEANS, 1.0).log_prob(X.unsqueeze(-1))).sum(-1) * X_MASK
    kl = (q * (q.log() - PRIOR_Y.log() * PRIOR_MASK.unsqueeze(-1))).sum(-1)
    assert float(metrics["reconstruction"]) == pytest.approx(float(reconstruction.mean()), abs=1e-5)
    assert float(metrics["kl/y"]) == pytest.approx(float(kl.mean()), abs=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(float((reconstruction - kl).mean()), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(-float((reconstruction - beta * kl).mean().detach()), abs=1e-5)


def test_a_site_summed_out_in_the_model_gives_the_exact_marginal():
    loss, metrics = EnumELBO()(mixture_model, no_guide, {"x": X})
    exact = torch.logsumexp(PRIOR_Y.log() + dist.Normal(MEANS, 1.0).log_prob(X.unsqueeze(-1)), -1).mean()
    assert float(metrics["elbo"]) == pytest.approx(float(exact), abs=1e-5)
    assert float(metrics["reconstruction"]) == pytest.approx(float(exact), abs=1e-5)
    assert "kl/y" not in metrics
    # Annealing cannot touch a site that has no KL term.
    with kl_scale(0.3):
        annealed_loss, _ = EnumELBO()(mixture_model, no_guide, {"x": X})
    assert float(annealed_loss.detach()) == pytest.approx(float(loss.detach()), abs=1e-6)


def test_a_masked_site_summed_out_in_the_model_is_averaged_over_its_values():
    """Labels summed out in the model where hidden: the Distribution.mask makes every value of a
    labelled row weigh 1, so Pyro's value is log 3 too high per labelled row (a constant: same
    gradient). ``elbo`` is the exact log-likelihood; the loss stays Pyro's."""
    logits = torch.nn.Parameter(torch.tensor([0.2, -0.1, 0.4]))

    def model(x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            with poutine.mask(mask=y_mask):
                pyro.sample("y_observed", dist.Categorical(logits=logits), obs=y)
            hidden = pyro.sample(
                "y_unobserved", dist.Categorical(logits=logits).mask(~y_mask), infer={"enumerate": "parallel"}
            )
            pyro.sample("x", dist.Normal(MEANS[torch.where(y_mask, y, hidden)], 1.0), obs=x)

    loss, metrics = EnumELBO()(model, no_guide, BATCH)
    joint = torch.log_softmax(logits, -1) + dist.Normal(MEANS, 1.0).log_prob(X.unsqueeze(-1))
    exact = torch.where(Y_MASK, joint.gather(-1, Y.unsqueeze(-1)).squeeze(-1), joint.logsumexp(-1)).mean()
    assert float(metrics["elbo"]) == pytest.approx(exact.item(), abs=1e-5)
    pyro_loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, no_guide, **BATCH).item() / len(X)
    assert loss.item() == pytest.approx(pyro_loss, abs=1e-5)
    assert -pyro_loss == pytest.approx(exact.item() + int(Y_MASK.sum()) * math.log(3) / len(X), abs=1e-5)
    (ours,) = torch.autograd.grad(loss, [logits])
    (exact_gradient,) = torch.autograd.grad(-exact, [logits])
    assert torch.allclose(ours, exact_gradient, atol=1e-5)


def test_a_guide_site_whose_prior_depends_on_a_summed_out_site_gets_the_kl_to_its_marginal_prior():
    """y ~ Cat summed out in the model, z ~ N(MEANS[y], 1), x ~ N(z, 0.5): kl/z is
    log q(z) - log sum_y p(y) N(z; MEANS[y], 1) on the guide's draw, and reconstruction log N(x; z, 0.5)."""
    drawn = {}
    loc = torch.nn.Parameter(torch.tensor(0.1))

    def model(x):
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Categorical(PRIOR_Y), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(MEANS[y], 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            drawn["z"] = pyro.sample("z", dist.Normal(loc + 0.5 * x, 0.7))

    pyro.set_rng_seed(0)
    loss, metrics = EnumELBO()(model, guide, {"x": X})
    z = drawn["z"].detach()
    log_q = dist.Normal(loc.detach() + 0.5 * X, 0.7).log_prob(z)
    log_prior = torch.logsumexp(PRIOR_Y.log() + dist.Normal(MEANS, 1.0).log_prob(z.unsqueeze(-1)), -1)
    reconstruction = dist.Normal(z, 0.5).log_prob(X)
    assert set(metrics) == {"elbo", "reconstruction", "kl/z"}
    assert float(metrics["kl/z"]) == pytest.approx(float((log_q - log_prior).mean()), abs=1e-5)
    assert float(metrics["reconstruction"]) == pytest.approx(float(reconstruction.mean()), abs=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(-float(loss.detach()), abs=1e-5)
    pyro.set_rng_seed(0)
    pyro_loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, X) / len(X)
    assert float(loss.detach()) == pytest.approx(float(pyro_loss.detach()), abs=1e-5)
    # z's prior is inside the sum over y: it cannot be annealed on its own.
    with pytest.raises(UnsupportedPairError, match=r"cannot anneal site 'z' of model: its density depends on 'y'"):
        with kl_scale(0.3):
            EnumELBO()(model, guide, {"x": X})


def test_labelled_rows_count_once():
    """A hidden-label row averages over q(y | x); a labelled row uses its label: the ELBO equals
    the hand sum when z is dropped from the toy."""
    q_logits = torch.tensor([0.1, 0.4, -0.3])

    def model(x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample("y", dist.Categorical(PRIOR_Y), obs=y, obs_mask=y_mask)
            pyro.sample("x", dist.Normal(MEANS[label], 1.0), obs=x)

    def guide(x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "y_unobserved",
                dist.Categorical(logits=q_logits.expand(len(x), 3)).mask(~y_mask),
                infer={"enumerate": "parallel"},
            )

    _, metrics = EnumELBO()(model, guide, BATCH)
    q = torch.softmax(q_logits, -1)
    joint = PRIOR_Y.log() + dist.Normal(MEANS, 1.0).log_prob(X.unsqueeze(-1))  # (B, 3)
    unlabelled = (q * (joint - q.log())).sum(-1)
    labelled = joint.gather(-1, Y.unsqueeze(-1)).squeeze(-1)
    expected = torch.where(Y_MASK, labelled, unlabelled).mean()
    assert float(metrics["elbo"]) == pytest.approx(float(expected), abs=1e-5)
    kl = torch.where(Y_MASK, 0.0, (q * (q.log() - PRIOR_Y.log())).sum(-1)).mean()
    assert float(metrics["kl/y_unobserved"]) == pytest.approx(float(kl), abs=1e-5)


def test_a_latent_site_neither_enumerated_nor_in_the_guide_is_refused_by_name():
    """pyro.sample(..., obs_mask=...) drops ``infer``: the hidden half would be drawn from the prior."""

    def model(x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample("y", dist.Categorical(PRIOR_Y), obs=y, obs_mask=y_mask, infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(MEANS[label], 1.0), obs=x)

    with pytest.raises(UnsupportedPairError, match=r"latent site 'y_unobserved' of model is not in the guide"), pytest.warns(
        UserWarning, match="Found vars in model but not guide"  # Pyro's own check says so too
    ):
        EnumELBO()(model, no_guide, BATCH)


def test_a_site_without_finite_support_marked_for_enumeration_is_refused_by_name():
    def model(x, **_):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(UnsupportedPairError, match=r"cannot enumerate site 'z' of model: Normal has no finite support"):
        EnumELBO()(model, no_guide, {"x": X})


def test_a_global_site_enumerated_sequentially_gives_the_exact_sums():
    """A site outside the "data" plate, enumerated one value per run: the metrics add the runs up exactly."""
    q_logits = torch.tensor([0.3, -0.2, 0.5])

    def guide(x):
        pyro.sample("y", dist.Categorical(logits=q_logits), infer={"enumerate": "sequential"})

    def model(x):
        y = pyro.sample("y", dist.Categorical(PRIOR_Y))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(MEANS[y], 1.0), obs=x)

    loss, metrics = EnumELBO()(model, guide, {"x": X})
    q = torch.softmax(q_logits, -1)
    reconstruction = (q * dist.Normal(MEANS, 1.0).log_prob(X.unsqueeze(-1)).sum(0)).sum() / len(X)
    kl = (q * (q.log() - PRIOR_Y.log())).sum() / len(X)
    assert float(metrics["reconstruction"]) == pytest.approx(float(reconstruction), abs=1e-5)
    assert float(metrics["kl/y"]) == pytest.approx(float(kl), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(-float((reconstruction - kl).detach()), abs=1e-5)


@contextlib.contextmanager
def no_host_reads():
    """Fail on the Python-level ways a step can wait for the device (bool(), item(), float(), ...)."""

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host-device synchronisation: Tensor.{name}")

        return method

    names = ["__bool__", "item", "__float__", "__int__", "__index__", "tolist", "nonzero", "masked_select"]
    saved = {name: getattr(torch.Tensor, name) for name in names}
    saved_functions = {name: getattr(torch, name) for name in ("nonzero", "masked_select")}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        for name in saved_functions:
            setattr(torch, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        for name, function in saved_functions.items():
            setattr(torch, name, function)


@pytest.mark.parametrize("which", ["guide", "model"])
def test_a_training_step_reads_nothing_back_from_the_device(which):
    pair = Pair() if which == "guide" else Mixture()
    batch = BATCH if which == "guide" else {"x": X}
    objective = EnumELBO(particles=2)
    objective(pair.model, pair.guide, batch)  # first step: inspection and Pyro's validation
    validation = pyro.infer.util.is_validation_enabled()
    pyro.enable_validation(False)  # as the fit loop does after the first step
    try:
        with no_host_reads(), kl_scale({"y": 1.0}, default=0.5):
            loss, metrics = objective(pair.model, pair.guide, batch)
            loss.backward()
    finally:
        pyro.enable_validation(validation)
    assert torch.isfinite(loss) and all(torch.isfinite(value) for value in metrics.values())
