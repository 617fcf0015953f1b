"""Issue 20: posterior analysis a Bayesian can trust. ArviZ's loo/waic/compare refuse posterior.nc
and pyrovae's ELPDData gives the closed form; the PSIS-weighted posterior recovers p(z | x) where
the guide is off; Kish's ESS; masked sites; predictive groups; report tables that render; one-line
warnings and refusals; the collapse verdicts on real short runs. Runs under ArviZ 0.x and 1.x."""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

import tests.test_analysis as base
from pyrovae.analysis import arviz_compat, psis_diagnostics, to_inference_data, write_analysis
from pyrovae.analysis import posterior_plots
from pyrovae.analysis.arviz_compat import ARVIZ_1, az, from_netcdf, group, group_names, to_netcdf
from pyrovae.analysis.collapse import diagnose_collapse, remedies_for, uses_free_bits
from pyrovae.analysis.compare import elpd_data, paired_difference
from pyrovae.analysis.diagnostics import MI_CEILING_SHARE, weak_estimate_warnings
from pyrovae.cli import main
from pyrovae.config import dump_toml
from pyrovae.distributions import DiagonalNormal
from tests import families
from tests.conftest import SHARED_DATA, tiny_experiment, tiny_pair

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ppca():
    return base.PPCA()


class ShiftedGuide(torch.nn.Module):
    """The exact PPCA posterior moved by ``shift`` of its sd and ``width`` times as wide: a guide
    whose mean is off, for which the weighted posterior must find the exact mean again."""

    def __init__(self, ppca, shift=0.6, width=1.4):
        super().__init__()
        self.ppca, self.shift, self.width = ppca, shift, width

    def forward(self, x, **_):
        sd = self.ppca.c.sqrt()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", DiagonalNormal(self.ppca.posterior_mean(x) + self.shift * sd, (sd * self.width).expand(x.shape[0], 3)))


def idata_of(ppca, guide, samples=400, points=100, seed=0, **inputs):
    return to_inference_data(ppca.model, guide, {"x": ppca.x[:points]}, samples, inputs=inputs or None, seed=seed, predictive=False)


# --- az.loo / az.waic / az.compare: refused; pyrovae's ELPDData: right ----------------------------


def test_arviz_loo_waic_and_compare_refuse_the_file_and_elpd_data_gives_the_closed_form(ppca, tmp_path):
    exact = ppca.marginal.log_prob(ppca.x[:100]).double().numpy()
    path = to_netcdf(idata_of(ppca, ppca.guide, scale_factor=1.2), tmp_path / "exact.nc")
    good = from_netcdf(path)
    assert "log_likelihood" not in group_names(good)
    calls = [lambda: az.loo(good), lambda: az.compare({"a": good, "b": good})]
    if hasattr(az, "waic"):  # ArviZ 1.x has no WAIC
        calls.append(lambda: az.waic(good))
    for call in calls:
        with pytest.raises(TypeError) as refused:
            call()
        chain, error = [], refused.value
        while error is not None:  # compare wraps loo's error, twice
            chain.append(str(error))
            error = error.__cause__
        assert any("log likelihood not found" in message for message in chain), chain
    assert "pyrovae compare" in good.attrs["comparison"] and "pyrovae compare" in group(good, "sample_stats").attrs["comparison"]
    poor = idata_of(ppca, ShiftedGuide(ppca, shift=2.0, width=0.6))
    good_elpd, poor_elpd = elpd_data(good), elpd_data(poor)
    table = arviz_compat.compare({"good": good_elpd, "poor": poor_elpd})
    ours = group(good, "sample_stats")["log_marginal_likelihood"].values.astype(np.float64)
    theirs = group(poor, "sample_stats")["log_marginal_likelihood"].values.astype(np.float64)
    # the good guide's elpd is the closed-form sum of log p(x_n) (a 1.2x wide guide: tiny error)
    elpd = good_elpd.elpd if ARVIZ_1 else good_elpd["elpd_loo"]
    assert elpd == pytest.approx(exact.sum(), abs=0.05 * 100 / 10)
    assert list(table.index) == ["good", "poor"]
    difference, standard_error = paired_difference(theirs, ours)
    assert abs(float(table.loc["poor", "elpd_diff"])) == pytest.approx(-difference, rel=1e-6, abs=1e-3)  # the sign differs by line
    assert float(table.loc["poor", "dse"]) == pytest.approx(standard_error, rel=1e-6, abs=1e-3)
    # paired: far smaller than the two runs' standard errors together
    assert standard_error < 0.5 * math.hypot(*(math.sqrt(100) * values.std() for values in (ours, theirs)))
    figure = arviz_compat.plot_compare(table, "two guides")
    assert figure.axes and figure._suptitle.get_text() == "two guides"


def test_pyrovae_compare_writes_markdown_csv_and_plot_and_refuses_other_test_points(tmp_path, capsys):
    model, guide = tiny_pair(features=12, latent_dim=2)
    x = torch.bernoulli(torch.full((40, 12), 0.3), generator=torch.Generator().manual_seed(0))
    runs = []
    for name, data in (("a", x), ("b", x), ("other", x[:30])):
        folder = tmp_path / name / "analysis"
        folder.mkdir(parents=True)
        to_netcdf(to_inference_data(model, guide, {"x": data}, 40, seed=len(runs), predictive=False), folder / "posterior.nc")
        runs.append(tmp_path / name)
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cmp")]) == 0
    rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("run,path,points,samples,sum_log_p,se_sum") and len(rows) == 3
    assert_tables_render((tmp_path / "cmp" / "compare.md").read_text())
    base.assert_pngs_decode(tmp_path / "cmp", ["compare.png"])
    capsys.readouterr()
    assert main(["compare", str(runs[0]), str(runs[2]), "--out", str(tmp_path / "cmp2")]) == 2
    assert capsys.readouterr().err.strip() == "pyrovae compare: error: other and a were analysed on different test points; analyse both with the same data and --test-examples"
    assert main(["compare", str(runs[0]), str(tmp_path / "none")]) == 2
    assert "run `pyrovae analyze" in capsys.readouterr().err
    # The same run twice is refused in one line, before anything is written.
    assert main(["compare", str(runs[0]), str(tmp_path / "a" / ".." / "a"), "--out", str(tmp_path / "cmp3")]) == 2
    assert "is given twice" in capsys.readouterr().err and not (tmp_path / "cmp3").exists()
    # Runs analysed with other sample counts are compared with a warning: log p(x) grows with S.
    folder = tmp_path / "fewer" / "analysis"
    folder.mkdir(parents=True)
    to_netcdf(to_inference_data(model, guide, {"x": x}, 30, seed=7, predictive=False), folder / "posterior.nc")
    assert main(["compare", str(runs[0]), str(tmp_path / "fewer"), "--out", str(tmp_path / "cmp4")]) == 0
    assert "analysed with 30 samples per point and a with 40" in (tmp_path / "cmp4" / "compare.md").read_text() or (
        "analysed with 40 samples per point and fewer with 30" in (tmp_path / "cmp4" / "compare.md").read_text()
    )


# --- effective sample size and the weighted posterior ---------------------------------------------


def test_kish_ess_per_point_is_stored_and_matches_its_formula(ppca):
    narrow = idata_of(ppca, ppca.guide, samples=300, scale_factor=0.3)
    log_weight = group(narrow, "guide_draws")["log_weight"].values[0].astype(np.float64)  # (S, N)
    weight = np.exp(log_weight - log_weight.max(0))
    expected = weight.sum(0) ** 2 / (weight**2).sum(0)
    stored = group(narrow, "sample_stats")["importance_ess"].values
    assert np.allclose(stored, expected, rtol=1e-4)
    assert np.median(stored) < 0.2 * 300  # a guide 0.3 times too narrow: few draws carry the weight
    exact = idata_of(ppca, ppca.guide, samples=300, scale_factor=1.0)
    assert np.allclose(group(exact, "sample_stats")["importance_ess"].values, 300, rtol=1e-3)  # equal weights: every draw counts
    assert psis_diagnostics(narrow).attrs["importance_ess_median"] == pytest.approx(float(np.median(expected)), rel=1e-4)


def test_the_weighted_posterior_finds_the_exact_posterior_where_the_guide_is_off(ppca):
    """The guide's mean is 0.6 posterior sd off; the PSIS-weighted posterior's mean and sd are the
    closed-form p(z | x)'s within Monte Carlo error, the guide's draws are not."""
    samples, points = 2000, 40
    idata = idata_of(ppca, ShiftedGuide(ppca), samples=samples, points=points)
    exact_mean = ppca.posterior_mean(ppca.x[:points]).numpy()
    sd = ppca.c.sqrt().numpy()
    weighted = group(idata, "posterior")["z"].values[0].astype(np.float64)  # (S, N, 3)
    guide = group(idata, "guide_draws")["z"].values[0].astype(np.float64)
    ess = group(idata, "sample_stats")["importance_ess"].values
    error = (weighted.mean(0) - exact_mean) / (sd / np.sqrt(ess)[:, None])
    assert np.abs(error).max() < 5.0 and abs(error.mean()) < 0.5
    assert np.allclose(weighted.std(0).mean(0) / sd, 1.0, atol=0.06)
    assert np.allclose((guide.mean(0) - exact_mean).mean(0) / sd, 0.6, atol=0.05)


# --- posterior.png, masked sites, predictive groups ------------------------------------------------


def m2_idata(labelled, count=12, samples=40):
    model = families.M2(families.ConditionalConfig(), base.FAMILY_DATA)
    guide = families.M2Guide(families.GuideConfig(), base.FAMILY_DATA, model)
    batch = base.family_batch(count)
    batch["y_mask"] = torch.as_tensor(labelled)
    return model, guide, batch, to_inference_data(model, guide, batch, samples, seed=0)


def test_posterior_png_is_titled_and_draws_categorical_sites_as_class_probabilities(monkeypatch, tmp_path):
    model, guide, batch, idata = m2_idata([False] * 12, samples=60)
    psis = psis_diagnostics(idata)
    figures = []
    monkeypatch.setattr(posterior_plots, "_save", lambda figure, path, tight=True: figures.append(figure) or Path(path))
    posterior_plots.posterior_plot(idata, [0, 3], tmp_path / "posterior.png", psis=psis)
    (figure,) = figures
    assert "PSIS-weighted posterior" in figure._suptitle.get_text()
    panels = [axis for axis in figure.axes if "P(y_unobserved | x)" in axis.get_title()]
    assert len(panels) == 2
    for point, axis in zip([0, 3], panels):
        heights = np.array([patch.get_height() for patch in axis.patches])
        assert heights.size == 10 and heights.sum() == pytest.approx(1.0)
        draws = group(idata, "guide_draws")["y_unobserved"].sel(obs=point).values.reshape(-1)
        weights = np.exp(psis["psis_log_weight"].sel(obs=point).values.reshape(-1))
        expected = np.array([weights[draws == value].sum() for value in range(10)])
        assert np.allclose(heights, expected / expected.sum(), atol=1e-6)
    continuous = [axis for axis in figure.axes if axis.get_title().startswith("point 0: z[")]
    assert continuous and all("k-hat" in axis.get_title() for axis in continuous)


def test_an_observed_site_no_test_row_observes_is_left_out_and_named():
    *_, unlabelled = m2_idata([False] * 12)
    likelihood = group(unlabelled, "guide_log_likelihood")
    assert "y_observed" not in likelihood and "x" in likelihood
    assert likelihood.attrs["sites_without_observations"] == "y_observed"
    *_, some = m2_idata([True, False] * 6)
    assert "y_observed" in group(some, "guide_log_likelihood")
    assert group(some, "guide_log_likelihood").attrs["sites_without_observations"] == ""


def test_predictive_groups_hold_reconstructions_and_prior_draws_that_plot_ppc_draws():
    model, guide = tiny_pair(features=12, latent_dim=2)
    x = torch.bernoulli(torch.full((30, 12), 0.3), generator=torch.Generator().manual_seed(0))
    idata = to_inference_data(model, guide, {"x": x}, 40, seed=0)
    for name in ("posterior_predictive", "prior_predictive"):
        values = group(idata, name)["x"]
        assert values.dims == ("chain", "draw", "obs", "x_dim") and values.shape == (1, 20, 30, 12)
        assert set(np.unique(values.values)) <= {0, 1}
    import matplotlib.pyplot as plt

    if ARVIZ_1:
        az.plot_ppc_dist(idata, group="posterior_predictive", backend="matplotlib")
        az.plot_ppc_dist(idata, group="prior_predictive", backend="matplotlib")
    else:
        az.plot_ppc(idata, group="posterior", num_pp_samples=10)
        az.plot_ppc(idata, group="prior", num_pp_samples=10)
    plt.close("all")


# --- report tables ---------------------------------------------------------------------------------


def assert_tables_render(text: str) -> int:
    """Every Markdown table of ``text`` parses (python-markdown's tables extension) into an HTML
    table whose every row has the header's number of cells. Returns how many tables there were."""
    import re

    markdown = pytest.importorskip("markdown")
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    for block in blocks:
        html = markdown.markdown("\n".join(block), extensions=["tables"])
        assert html.count("<table>") == 1, block[0]
        header = re.findall(r"<th(?:\s[^>]*)?>", html)
        rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)
        assert len(rows) == len(block) - 1, block[0]
        for row in rows[1:]:
            assert len(re.findall(r"<td(?:\s[^>]*)?>", row)) == len(header), (block[0], row)
    return len(blocks)


def test_every_table_of_the_m2_report_renders_and_the_pipe_in_a_header_is_escaped(tmp_path):
    model = families.M2(families.ConditionalConfig(), base.FAMILY_DATA)
    guide = families.M2Guide(families.GuideConfig(), base.FAMILY_DATA, model)
    batch = base.family_batch(30)
    batch["y_mask"] = torch.arange(30) % 3 == 0
    write_analysis(model, guide, batch, tmp_path, samples=30, points=[0, 1, 2], image_shape=(8, 8), seed=0)
    report = (tmp_path / "report.md").read_text()
    assert "| point | label | P(y_unobserved \\| x) |" in report
    assert assert_tables_render(report) >= 4


# --- warnings and refusals ---------------------------------------------------------------------------


def test_weak_numbers_get_one_line_warnings():
    assert weak_estimate_warnings(0.4, 1.0, 359) == []
    (k_hat,) = weak_estimate_warnings(0.946, None, 359)
    assert "94.6% of the test points have Pareto k-hat > 0.7" in k_hat and "\n" not in k_hat
    (ceiling,) = weak_estimate_warnings(0.0, MI_CEILING_SHARE * math.log(359) + 0.01, 359)
    assert "sits at its ceiling log N = 5.88" in ceiling and "\n" not in ceiling


@pytest.fixture(scope="module")
def short_quickstart(tmp_path_factory):
    run = tmp_path_factory.mktemp("quickstart") / "run"
    arguments = ["--set", "train.epochs=1", "--set", "evaluate.particles=200", "--set", "evaluate.test_examples=100", "--no-progress"]
    assert main(["train", str(REPO / "experiments/quickstart.toml"), "--out", str(run), *arguments]) == 0
    return run


def test_evaluate_and_analyze_warn_when_most_k_hats_exceed_0_7(short_quickstart, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(short_quickstart), "--no-progress"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("pyrovae evaluate: warning: ") and "Pareto k-hat > 0.7" in line for line in lines), lines
    assert main(["analyze", str(short_quickstart), "--samples", "200", "--test-examples", "100", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("pyrovae analyze: warning: ") and "Pareto k-hat > 0.7" in line for line in err), err
    numbers = json.loads((short_quickstart / "analysis" / "analysis.json").read_text())
    assert numbers["share_pareto_k_above_0.7"] > 0.5 and numbers["warnings"]
    # the file's size is stated, and the estimate made before drawing bounds it
    assert 0 < numbers["posterior_file_bytes"] <= numbers["estimated_file_bytes"]
    assert f"{numbers['posterior_file_bytes'] / 1e6:.1f} MB" in (short_quickstart / "analysis" / "report.md").read_text()
    assert_tables_render((short_quickstart / "analysis" / "report.md").read_text())


def test_analyze_refuses_ten_million_samples_in_one_line_before_drawing(short_quickstart, capsys):
    capsys.readouterr()
    assert main(["analyze", str(short_quickstart), "--samples", "10000000", "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("pyrovae analyze: error: --samples 10000000: 100 test points would need about ") and "of memory" in line
    assert "use at most --samples" in line


# --- is the latent used? -------------------------------------------------------------------------------


def history(kl, elbo, beta=1.0):
    return [{"epoch": i + 1, "beta": beta, "valid/elbo": e, "valid/kl/z": k} for i, (k, e) in enumerate(zip(kl, elbo))]


def test_each_verdict_from_its_numbers():
    flat = [0.9, 0.9, 0.9, 0.9]
    collapsed = diagnose_collapse({"z": [0.001, 0.002]}, {"z": [0.0, 0.0]}, 0.01, 0.003, 200)
    assert collapsed.verdict == "collapsed"
    paid_for_nothing = diagnose_collapse({"z": [1.5, 1.5]}, {"z": [0.001, 0.0]}, 0.01, 0.02, 200)  # KL, no information
    assert paid_for_nothing.verdict == "collapsed" and "no unit is active" in paid_for_nothing.reason
    assert "free bits" not in paid_for_nothing.reason  # the run's objective holds no KL up
    held_up = diagnose_collapse({"z": [1.5, 1.5]}, {"z": [0.001, 0.0]}, 0.01, 0.02, 200, free_bits=True)
    assert "(free bits allow this)" in held_up.reason
    assert uses_free_bits("free_bits") and uses_free_bits(None, [{"train/free_bits/groups": 2.0}]) and not uses_free_bits("elbo", history(flat, flat))
    partly = diagnose_collapse({"z": [2.0, 1.0, 0.01, 0.02]}, {"z": [0.5, 0.3, 0.0, 0.001]}, 0.01, 1.5, 200, history(flat, [-50, -49, -48, -47]))
    assert partly.verdict == "partly collapsed" and partly.reason.startswith("2 of 4 dimensions carry information")
    lagging = diagnose_collapse({"z": [0.3, 0.3]}, {"z": [0.1, 0.1]}, 0.01, 0.2, 200, history([3.0, 2.0, 1.0, 0.6], [-60, -55, -52, -50]))
    assert lagging.verdict == "lagging guide" and "fell from 3 to 0.6" in lagging.reason
    healthy = diagnose_collapse({"z": [2.0, 1.0]}, {"z": [0.5, 0.3]}, 0.01, 1.5, 200, history([3.0, 3.1, 3.0, 3.05], [-60, -55, -52, -50]))
    assert healthy.verdict == "healthy"
    # KL annealing: the KL falls while beta rises; only the epochs after beta settled count
    annealed = history([9.0, 6.0, 3.0, 3.0, 3.1, 3.0], [-70, -60, -55, -52, -51, -50])
    for record, beta in zip(annealed, [0.2, 0.5, 1.0, 1.0, 1.0, 1.0]):
        record["beta"] = beta
    assert diagnose_collapse({"z": [2.0, 1.0]}, {"z": [0.5, 0.3]}, 0.01, 1.5, 200, annealed).verdict == "healthy"


def train_and_analyze(tmp_path: Path, experiment: dict, samples: int = 30) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "experiment.toml"
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0
    assert main(["analyze", str(run), "--samples", str(samples), "--no-progress"]) == 0
    report = (run / "analysis" / "report.md").read_text()
    numbers = json.loads((run / "analysis" / "analysis.json").read_text())
    assert "## Is the latent used?" in report and f"**Verdict: {numbers['collapse']['verdict']}.**" in report
    assert_tables_render(report)
    return numbers | {"report": report}


def synthetic(objective=None, train=1000, epochs=4):
    experiment = tomllib.loads((REPO / "experiments/synthetic_collapse_basic.toml").read_text())
    experiment["data"].update(train=train, valid=200, test=200)
    experiment["train"]["epochs"] = epochs
    experiment["evaluate"].update(particles=30, test_examples=200, latent_metrics=False)
    if objective:
        experiment["objective"] = objective
    return experiment


FREE_BITS = {"name": "free_bits", "objective": "meanfield_elbo", "threshold": 1.0, "per": "dimension"}


def test_he_et_al_synthetic_data_basic_training_collapses_and_free_bits_keeps_the_latent(tmp_path):
    """He et al. 2019's synthetic sentences, short runs: basic training ends with I(x; z) and KL
    near 0 (collapsed, with the remedies' TOML); free bits (1 nat) keep the scalar latent in use."""
    basic = train_and_analyze(tmp_path / "basic", synthetic())
    assert basic["collapse"]["verdict"] == "collapsed"
    remedies = basic["collapse"]["remedies"]
    for remedy in remedies:
        assert remedy["toml"] in basic["report"]
    tables = [tomllib.loads(remedy["toml"]) for remedy in remedies]
    # a sentence VAE with an LSTM decoder: word dropout and the dilated CNN fit it, wrapping its own objective
    assert {"schedules", "model", "objective", "anneal", "train"} <= {key for table in tables for key in table}
    assert {"decoder": "dilated_cnn", "dilations": [1, 2]} in [table.get("model") for table in tables]  # 7 words < 11 tokens
    assert any(table.get("objective", {}).get("objective") == "meanfield_elbo" for table in tables)
    used = train_and_analyze(tmp_path / "free_bits", synthetic(FREE_BITS, train=2000, epochs=6))
    assert used["collapse"]["verdict"] == "healthy" and used["mutual_information"] > 0.3


def rendered_code(report: str) -> tuple[list[str], str]:
    """``report`` rendered by python-markdown (fenced code, tables): the text of its code blocks,
    unescaped, and the HTML with every <code> element cut out."""
    import html as entities
    import re

    markdown = pytest.importorskip("markdown")
    html = markdown.markdown(report, extensions=["fenced_code", "tables"])
    blocks = [entities.unescape(block) for block in re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", html, flags=re.S)]
    return blocks, re.sub(r"<code[^>]*>.*?</code>", "", html, flags=re.S)


def test_an_image_run_of_a_users_own_model_gets_only_the_remedies_that_fit_it(tmp_path):
    """A user's ``mymodels:MyVAE`` on digits with a KL weight of 30 collapses in 3 epochs. The
    advice: no text-only remedy (word dropout, the dilated-CNN decoder), the run's own step count
    and KL weight in the cyclical schedule, free bits around the run's objective, TOML that parses
    and renders as code (python-markdown), and no "free bits allow this" for a run without them."""
    name = f"mymodels_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("from pyrovae.models import GaussianVAE\n\n\nclass MyVAE(GaussianVAE):\n    pass\n")
    experiment = tiny_experiment(
        model={"name": f"{name}:MyVAE", "latent_dim": 4, "hidden": [32]},
        anneal={"name": "constant", "value": 30.0},
        evaluate={"particles": 20, "test_examples": 60},
    )
    try:
        analysed = train_and_analyze(tmp_path, experiment)
    finally:
        sys.modules.pop(name, None)
    report, collapse = analysed["report"], analysed["collapse"]
    assert collapse["verdict"] != "healthy"
    section = report[report.index("## Is the latent used?") :]
    section = section[: section.index("\n## ", 3)]
    for text_only in ("word_keep", "word dropout", "dilated", "decoder", "sentence"):
        assert text_only not in section, text_only
    assert "free bits allow" not in report
    blocks, outside = rendered_code(section)
    for line in ("[anneal]", "[objective]", "[train]", "total_steps", 'name = "'):
        assert line not in outside, line  # every TOML line is inside a <code> element
    tables = [tomllib.loads(block) for block in blocks]
    assert tables and tables == [tomllib.loads(remedy["toml"]) for remedy in collapse["remedies"] if remedy["toml"]]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (cyclical,) = [table["anneal"] for table in tables if table.get("anneal", {}).get("name") == "cyclical"]
    assert cyclical["total_steps"] == records[-1]["step"] == 3 * records[0]["step"] and cyclical["end"] == 30.0
    assert {"name": "free_bits", "objective": "elbo", "threshold": 0.1, "per": "dimension"} in [table.get("objective") for table in tables]
    assert {"name": "constant", "value": 1.0} in [table.get("anneal") for table in tables]  # beta 30 -> the ELBO's 1


REVIEWS = {"limit": 1000, "max_size": 300}


def reviews(name: str, **objective) -> dict:
    experiment = tomllib.loads((REPO / f"experiments/{name}.toml").read_text())
    experiment["data"].update(REVIEWS, dir=str(SHARED_DATA / "reviews"))
    experiment["model"].update(hidden=32, embedding_dim=32, latent_dim=2)
    experiment["guide"].update(hidden=32, embedding_dim=32)
    experiment["objective"].update(objective)
    experiment["train"].update(epochs=8, batch_size=32, lr=5e-3)
    experiment["evaluate"].update(particles=30, test_examples=60, latent_metrics=False)
    return experiment


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "reviews" / "train.tsv").exists(), reason="needs ../shared/data/reviews")
def test_reviews_sentence_vae_collapses_and_the_free_bits_one_does_not(tmp_path):
    """The committed reviews experiments, shrunk to short runs (1,000 reviews, 8 epochs, z of 2):
    the plain sentence VAE collapses; with free bits (1 nat per dimension) both dimensions carry
    information."""
    plain = train_and_analyze(tmp_path / "plain", reviews("reviews_vae"))
    assert plain["collapse"]["verdict"] == "collapsed"
    free_bits = train_and_analyze(tmp_path / "free_bits", reviews("reviews_free_bits", threshold=1.0))
    assert free_bits["collapse"]["verdict"] in ("healthy", "partly collapsed") and free_bits["mutual_information"] > 0.3
