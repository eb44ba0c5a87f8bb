"""DP-SGD (lm.train.privacy): the private step, its clipping and noise, the accountant, its data and its errors.

The private step is the engine's step (lm.train.step) with per-example
gradients: with no noise and no clipping it is the ordinary step of a batch
whose rows weigh the same (full LM windows, an unweighted classifier), within
float32 rounding; clipped, no example moves the sum by more than the clip; its
noise has the configured scale. The accountant's epsilon is checked against
formulas computed here independently (the sampled Gaussian's Renyi DP for
Abadi et al. 2016's MNIST setting; the Gaussian mechanism's exact curve for
the shuffled batches lm draws). The 8-device private run (trains, resumes
exactly, equals one device) is in tests/train/test_heads.py.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from scipy import special, stats

from lm.config import ConfigError, load_config, validate
from lm.data import pipeline
from lm.experiment import build_experiment, open_train_split, token_windows
from lm.train import privacy
from lm.train import step as step_lib
from lm.train.state import TrainState
from tests.helpers import ROOT, SHARED, cli_args, run_cli, snapshot, tiny_overrides

SENTENCES = {
    "data.source": str(SHARED / "data" / "sst2"), "data.text_field": "sentence", "data.format": "sentences",
    "data.train_split": "dev", "data.eval_split": "dev", "data.tokenizer": "char", "seq_len": 32,
}
CASES = {
    "lm_windows": {"data.train_stride": 32},
    "classifier": {**SENTENCES, "head": "classifier", "data.label_field": "label", "classifier.token_dropout": 0.2},
}


def _recording_sgd() -> optax.GradientTransformation:
  """SGD whose state is the gradient it was last given: the step's gradient itself, to compare."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda grads, state, params=None: (jax.tree.map(lambda g: -1e-3 * g, grads),
                                                                         grads))


def _experiment(root, case: str):
  config = load_config(str(ROOT / "experiments" / "shakespeare_char.py"),
                       tiny_overrides(**{"model.dropout": 0.0, **CASES[case]}))
  experiment, _ = build_experiment(config, str(root / case), "train")
  examples = token_windows(experiment, open_train_split(config), config.data.train_stride, train=True)
  dataset = pipeline.private_train_dataset(examples, seed=0, global_batch_size=config.batch_size)
  batch = pipeline.to_global_batch(dataset[0], experiment.steps.batch_shardings, config.batch_size)
  return experiment, batch


@pytest.fixture(scope="module")
def lm_windows(tmp_path_factory):
  """(experiment, batch) of the tiny LM on windows that do not overlap."""
  return _experiment(tmp_path_factory.mktemp("privacy"), "lm_windows")


def _step_results(experiment, batch, dp: privacy.DpSgd | None, k: int = 1):
  task = experiment.task
  initial = experiment.init_state()
  sgd = _recording_sgd()
  state = TrainState(step=initial.step, params=initial.params, opt_state=sgd.init(initial.params), rng=initial.rng)
  step = jax.jit(step_lib.make_train_step(task.updates(), sgd, grad_accum_steps=k, loss_totals=task.loss_totals,
                                          prepare=task.prepare, privacy=dp))
  with experiment.steps.context():
    new_state, metrics = step(state, batch)
  return jax.device_get(new_state.opt_state), {name: float(value) for name, value in metrics.items()}


@pytest.mark.parametrize("case,ks", [("lm_windows", (1, 2)), ("classifier", (1,))])
def test_no_noise_and_no_clip_is_the_ordinary_step(tmp_path, request, case, ks):
  experiment, batch = request.getfixturevalue("lm_windows") if case == "lm_windows" else _experiment(tmp_path, case)
  expected, metrics = _step_results(experiment, batch, None)
  overall = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(expected))
  for k in ks:  # under gradient accumulation too: the clipped sum is taken across micro-batches
    got, private_metrics = _step_results(experiment, batch, privacy.DpSgd(clip_norm=math.inf, noise_multiplier=0.0), k)
    for (path, want), have in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
      error = float(np.max(np.abs(have - want)))
      # float32 rounding of sums taken in another order: 1e-6 of the gradient's largest entry, and of each
      # parameter's own largest to 1e-5 (so its small entries cannot hide a wrong one).
      assert error <= 1e-6 * overall and error <= 1e-5 * float(np.max(np.abs(want))), (k, jax.tree_util.keystr(path))
    assert private_metrics["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-6)
    assert private_metrics["train/clip_fraction"] == 0.0 and private_metrics["train/example_grad_norm"] > 0


def test_clipped_examples_move_the_step_by_at_most_the_clip(lm_windows):
  experiment, batch = lm_windows
  clip = 1e-4  # below every example's gradient norm (about 1 at initialization)
  grads, metrics = _step_results(experiment, batch, privacy.DpSgd(clip_norm=clip, noise_multiplier=0.0))
  assert metrics["train/clip_fraction"] == 1.0 and metrics["train/example_grad_norm"] > 100 * clip
  norm = float(optax.global_norm(grads))
  assert norm <= clip * (1 + 1e-5) and metrics["train/grad_norm"] == pytest.approx(norm, rel=1e-5)


def _linear_loss(params, example, row):
  """A per-example loss whose gradient is the example's features times its target: any vector we like."""
  del row
  return jnp.sum(example["x"] @ params["w"] * example["y"]) + jnp.sum(params["b"] * example["y"]), {}


_CLIPPED = jax.jit(lambda p, b, rows, clip: privacy.clipped_gradient_sum(_linear_loss, clip)(p, b, rows))


@settings(max_examples=25, deadline=None)
@given(clip=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16),
       scales=st.lists(st.floats(0.0, 100.0), min_size=5, max_size=5))
def test_each_examples_contribution_is_clipped_to_the_norm(clip, seed, scales):
  """Random batches of 5 examples, some with zero gradient (scale 0), some far over the clip: alone, each
  moves the sum by at most the clip (by its own gradient when that is smaller), and the sum is theirs."""
  keys = jax.random.split(jax.random.key(seed), 2)
  batch = {"x": jax.random.normal(keys[0], (5, 3)), "y": jax.random.normal(keys[1], (5, 4)) * jnp.asarray(scales)[:, None]}
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
  fn = lambda p, b, rows: _CLIPPED(p, b, rows, jnp.float32(clip))  # one compile per batch size, any clip
  total, (_, norms, _) = fn(params, batch, jnp.arange(5))
  alone = []
  for row in range(5):
    contribution, _ = fn(params, jax.tree.map(lambda x, row=row: x[row:row + 1], batch), jnp.arange(1))
    norm = float(optax.global_norm(contribution))
    assert norm <= clip * (1 + 1e-5)
    assert norm == pytest.approx(min(float(norms[row]), clip), rel=1e-4, abs=1e-6)  # unclipped when small
    alone.append(contribution)
  summed = jax.tree.map(lambda *parts: sum(parts), *alone)
  for got, want in zip(jax.tree.leaves(total), jax.tree.leaves(summed)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_noise_has_the_configured_scale():
  """A loss with zero gradient: the update is the noise over the batch size, a fresh draw each step."""
  params, batch_size, dp = {"w": jnp.zeros(2048)}, 16, privacy.DpSgd(clip_norm=0.5, noise_multiplier=1.3)
  sgd = _recording_sgd()
  step = jax.jit(step_lib.make_train_step(lambda p, b, ctx: (jnp.sum(p["w"]) * 0.0, {}), sgd, privacy=dp))
  state = TrainState(step=jnp.int32(0), params=params, opt_state=sgd.init(params), rng=jax.random.PRNGKey(0))
  draws = []
  for _ in range(40):
    state, _ = step(state, {"x": jnp.zeros((batch_size, 1))})
    draws.append(np.asarray(state.opt_state["w"]))
  draws = np.stack(draws)  # 81,920 coordinates
  expected = dp.noise_multiplier * dp.clip_norm / batch_size
  assert draws.std() == pytest.approx(expected, rel=0.02)
  assert abs(draws.mean()) < 5 * expected / math.sqrt(draws.size)
  assert abs(np.corrcoef(draws[:-1].ravel(), draws[1:].ravel())[0, 1]) < 0.02  # independent across steps


# -- the accountant ----------------------------------------------------------------------------------------
def _independent_poisson_epsilon(noise: float, q: float, steps: int, delta: float) -> float:
  """Renyi DP of the Poisson-sampled Gaussian at integer orders (Mironov, Talwar, Zhang 2019, Sec. 3.3:
  A_a = sum_k C(a, k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))), composed over the steps, then the
  conversion to (epsilon, delta) of Canonne, Kamath, Steinke 2020 (Prop. 12), minimized over the orders."""
  best = math.inf
  for order in range(2, 257):
    k = np.arange(order + 1)
    log_terms = (special.gammaln(order + 1) - special.gammaln(k + 1) - special.gammaln(order - k + 1)
                 + (order - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * noise ** 2))
    rdp = steps * special.logsumexp(log_terms) / (order - 1)
    epsilon = rdp - (math.log(delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order)
    best = min(best, epsilon)
  return best


def test_epsilon_matches_an_independent_computation_in_abadi_et_al_s_mnist_setting():
  # Abadi et al. 2016, Sec. 3.1: q = 0.01 (lots of 600 of 60,000), sigma = 4, delta = 1e-5, T = 10,000 steps;
  # their moments accountant gave epsilon ~ 1.26 (its conversion is looser than today's).
  ours = privacy.epsilon_poisson(4.0, 0.01, 10_000, 1e-5, "rdp")
  assert ours == pytest.approx(_independent_poisson_epsilon(4.0, 0.01, 10_000, 1e-5), rel=0.01)
  assert 0.9 < ours <= 1.26
  assert privacy.epsilon_poisson(4.0, 0.01, 10_000, 1e-5, "pld") <= ours * 1.01  # PLD is the tighter one


def _gaussian_epsilon(mu: float, delta: float) -> float:
  """The exact (epsilon, delta) curve of a Gaussian mechanism of sensitivity/noise mu (Balle & Wang 2018)."""
  def delta_of(epsilon):
    return stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)
  low, high = 0.0, 100.0
  for _ in range(200):
    middle = (low + high) / 2
    low, high = (middle, high) if delta_of(middle) > delta else (low, middle)
  return high


@pytest.mark.parametrize("noise,epochs", [(2.0, 1), (4.0, 3), (10.0, 20)])
def test_shuffled_epochs_compose_as_one_gaussian_mechanism(noise, epochs):
  # Replacing one example moves its batch's clipped sum by <= 2 clip; E epochs of noise sigma*clip compose to a
  # Gaussian mechanism with mu = 2 sqrt(E) / sigma.
  exact = _gaussian_epsilon(2 * math.sqrt(epochs) / noise, 1e-5)
  assert privacy.epsilon_shuffled(noise, epochs, 1e-5, "pld") == pytest.approx(exact, rel=0.01)
  assert exact <= privacy.epsilon_shuffled(noise, epochs, 1e-5, "rdp") <= 1.5 * exact


def test_accounting_counts_epochs_begun_and_calibrates_the_noise():
  assert [privacy.epochs_started(steps, 100, 8) for steps in (0, 1, 12, 13, 24, 25)] == [0, 1, 1, 2, 2, 3]
  noise = privacy.calibrate_noise(3.0, 4, 1e-5, "rdp")
  assert privacy.epsilon_shuffled(noise, 4, 1e-5, "rdp") <= 3.0
  assert privacy.epsilon_shuffled(noise * 0.99, 4, 1e-5, "rdp") > 3.0
  assert privacy.epsilon_shuffled(0.0, 1, 1e-5) == math.inf and privacy.epsilon_shuffled(1.0, 0, 1e-5) == 0.0


def test_private_batches_hold_each_example_once_per_epoch_depend_on_the_step_alone_and_resume():
  examples = np.arange(103)[:, None] * np.ones((1, 5), np.int64)  # example i is a window of i's
  batches = pipeline._EpochBatches(examples, seed=3, batch_size=10)  # pylint: disable=protected-access
  for epoch in range(3):
    seen = np.concatenate([batches.rows(epoch * 10 + b) for b in range(10)])
    assert len(seen) == 100 and len(set(seen.tolist())) == 100  # 3 of the 103 sit this epoch out
  assert not np.array_equal(batches.rows(0), batches.rows(10))  # a new permutation each epoch
  fresh = pipeline._EpochBatches(examples, seed=3, batch_size=10)  # pylint: disable=protected-access
  np.testing.assert_array_equal(fresh.rows(25), batches.rows(25))
  dataset = pipeline.private_train_dataset(examples, seed=3, global_batch_size=10)
  np.testing.assert_array_equal(dataset[25][:, 0], batches.rows(25))
  # The loader's checkpointed state resumes the private batches where they were (the next epoch's too).
  import grain  # pylint: disable=g-import-not-at-top
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  first = iter(dataset.to_iter_dataset(options))
  for _ in range(8):
    next(first)
  state = first.get_state()
  expected = [next(first)[:, 0] for _ in range(4)]  # batches 8..11: across the epoch boundary at 10
  again = iter(dataset.to_iter_dataset(options))
  again.set_state(state)
  for want, step in zip(expected, range(8, 12)):
    got = next(again)[:, 0]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, batches.rows(step))


# -- Poisson sampling ----------------------------------------------------------------------------------------
def test_poisson_batches_sample_each_example_independently_pad_and_resume():
  examples = np.arange(60)[:, None] * np.ones((1, 5), np.int64)  # example i is a window of i's
  batches = pipeline._PoissonBatches(examples, seed=3, batch_size=24, sampling_rate=0.25)  # pylint: disable=protected-access
  counts, joined = [], np.zeros(60)
  for step in range(2000):
    rows = batches.rows(step)
    assert len(set(rows.tolist())) == len(rows) <= 24
    np.testing.assert_array_equal(rows, batches.rows(step))  # a function of (seed, step) alone
    counts.append(len(rows))
    joined[rows] += 1
  counts = np.asarray(counts)
  # Binomial(60, 0.25): mean 15, variance 11.25; over 2,000 steps the mean within 5 standard errors, each
  # example's rate too (truncation at 24 is > 2.6 sigma out: about 0.6 % of steps lose a few rows).
  assert abs(counts.mean() - 15) < 5 * math.sqrt(11.25 / 2000)
  assert counts.var() == pytest.approx(11.25, rel=0.15)
  assert np.all(np.abs(joined / 2000 - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 2000))
  # two examples join a step together at q^2: the draws are independent across examples
  together = np.mean([(7 in set(batches.rows(s))) and (8 in set(batches.rows(s))) for s in range(2000)])
  assert together == pytest.approx(0.0625, abs=5 * math.sqrt(0.0625 * 0.9375 / 2000))

  dataset = pipeline.poisson_train_dataset(examples, seed=3, global_batch_size=24, expected_batch_size=15.0)
  first = dataset[5]
  count = len(batches.rows(5))
  np.testing.assert_array_equal(first["dp_real"], (np.arange(24) < count).astype(np.int32))
  assert first["dp_real"].dtype == np.int32
  np.testing.assert_array_equal(first["inputs"][:count, 0], batches.rows(5))
  assert set(first["inputs"][count:, 0].tolist()) <= set(batches.rows(5).tolist())  # padding: a drawn row
  options = pipeline.grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  iterator = iter(dataset.to_iter_dataset(options))
  for _ in range(4):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator)["inputs"][:, 0] for _ in range(3)]
  again = iter(dataset.to_iter_dataset(options))
  again.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(again)["inputs"][:, 0], want)
  with pytest.raises(ValueError, match="expected batch 30 must be in"):
    pipeline.poisson_train_dataset(examples, seed=3, global_batch_size=24, expected_batch_size=30.0)


def test_padding_rows_contribute_nothing_and_the_sum_is_divided_by_the_expected_batch(tmp_path):
  """A Poisson batch of 8 rows, 5 drawn: its DP step (no noise, no clip) is the step of the 5 drawn rows
  alone, times 5 / (the expected batch); padding that were counted would change it."""
  config = load_config(str(ROOT / "experiments" / "shakespeare_char.py"),
                       tiny_overrides(**{"model.dropout": 0.0, "data.train_stride": 32, "privacy.enabled": True,
                                         "privacy.sampling": "poisson", "privacy.expected_batch_size": 4.0}))
  experiment, _ = build_experiment(config, str(tmp_path / "poisson"), "train")
  examples = token_windows(experiment, open_train_split(config), 32, train=True)
  drawn = pipeline._split_inputs_targets(np.stack([examples[i] for i in (3, 11, 19, 27, 35)]))  # pylint: disable=protected-access
  garbage = pipeline._split_inputs_targets(np.stack([examples[i] for i in (40, 41, 42)]))  # pylint: disable=protected-access
  padded = {key: np.concatenate([drawn[key], garbage[key]]) for key in drawn}
  padded["dp_real"] = np.asarray([1] * 5 + [0] * 3, np.int32)
  dp = privacy.DpSgd(clip_norm=math.inf, noise_multiplier=0.0, expected_batch_size=4.0)
  got, metrics = _step_results(experiment, {key: jnp.asarray(value) for key, value in padded.items()}, dp)
  want, plain = _step_results(experiment, {key: jnp.asarray(value) for key, value in drawn.items()},
                              privacy.DpSgd(clip_norm=math.inf, noise_multiplier=0.0))
  overall = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(want))
  for have, base in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert float(np.max(np.abs(have - base * 5 / 4))) <= 2e-6 * overall
  assert metrics["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-6)  # the mean over drawn rows
  assert metrics["train/dp_rows"] == 5.0 and metrics["train/example_grad_norm"] == pytest.approx(
      plain["train/example_grad_norm"], rel=1e-5)


def test_truncated_poisson_epsilon_is_the_poisson_one_when_truncation_cannot_happen_and_above_it_otherwise():
  untruncated = privacy.epsilon_poisson(1.0, 0.05, 200, 1e-5, "pld")
  assert privacy.epsilon_truncated_poisson(1.0, 400, 0.05, 400, 200, 1e-5) == pytest.approx(untruncated, rel=0.01)
  assert privacy.epsilon_truncated_poisson(1.0, 400, 0.05, 26, 200, 1e-5) >= untruncated * 0.999
  accounting = privacy.Accounting(1.0, 1.0, 1e-5, "pld", 400, 32, "poisson", 20.0)
  assert accounting.sampling_rate == 0.05 and accounting.epochs(200) == 10.0
  metrics = accounting.metrics(200)
  assert metrics["privacy/expected_batch_size"] == 20.0
  assert metrics["privacy/epsilon"] == pytest.approx(privacy.epsilon_truncated_poisson(1.0, 400, 0.05, 32, 200, 1e-5))


def test_poisson_accounting_calibrates_to_the_target_and_needs_less_noise_than_shuffling():
  settings_ = dict(enabled=True, clip_norm=1.0, noise_multiplier=1.0, target_epsilon=3.0, delta=None,
                   accountant=None, expected_batch_size=None)
  poisson = privacy.accounting(types.SimpleNamespace(**settings_, sampling="poisson"), dataset_size=5000,
                               batch_size=256, steps=100)
  assert poisson.accountant == "pld" and poisson.expected_batch_size == 256 - 64
  assert poisson.epsilon(100) <= 3.0 < poisson.epsilon(100, poisson.noise_multiplier * 0.99)
  shuffled = privacy.accounting(types.SimpleNamespace(**settings_, sampling="shuffle"), dataset_size=5000,
                                batch_size=256, steps=100)
  assert poisson.noise_multiplier < shuffled.noise_multiplier / 2


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("noise_multiplier", -0.5, "config.privacy.noise_multiplier=-0.5 must be >= 0"),
    ("clip_norm", 0.0, "config.privacy.clip_norm=0.0 must be > 0"),
    ("delta", 1.0, "config.privacy.delta=1.0 must be in (0, 1)"),
    ("delta", 0.0, "config.privacy.delta=0.0 must be in (0, 1)"),
    ("target_epsilon", -1.0, "config.privacy.target_epsilon=-1.0 must be > 0"),
    ("accountant", "moments", "config.privacy.accountant='moments': pick one of rdp, pld"),
    ("sampling", "uniform", "config.privacy.sampling='uniform': pick one of shuffle, poisson"),
    ("expected_batch_size", 4.0, "config.privacy.expected_batch_size is Poisson sampling's"),
])
def test_bad_privacy_settings_name_the_field(field, value, match):
  config = load_config(str(ROOT / "experiments" / "shakespeare_char.py"),
                       tiny_overrides(**{"privacy.enabled": True, f"privacy.{field}": value}))
  with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
    validate(config, "train")


@pytest.mark.parametrize("extra,match", [
    ({"privacy.accountant": "rdp"}, "config.privacy.accountant='rdp' cannot account privacy.sampling='poisson'"),
    ({"privacy.expected_batch_size": 9.0}, "config.privacy.expected_batch_size=9 (privacy.sampling='poisson') "
                                           "must be in (0, config.batch_size=8]"),
    ({}, "config.privacy.expected_batch_size=-3.31371"),  # batch 8: the default B - 4 sqrt(B) is negative
])
def test_bad_poisson_settings_name_the_field(extra, match):
  config = load_config(str(ROOT / "experiments" / "shakespeare_char.py"),
                       tiny_overrides(**{"privacy.enabled": True, "privacy.sampling": "poisson", **extra}))
  with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
    validate(config, "train")


@pytest.mark.parametrize("extra,match", [
    ({"data.train_stride": 4}, "error: config.privacy.enabled=True with config.data.train_stride=4 < seq_len=32"),
    ({"head": "vae", **SENTENCES}, "error: config.privacy.enabled=True, but head='vae' cannot be trained with DP-SGD"),
])
def test_runs_the_accountant_cannot_cover_are_refused_before_anything_is_written(tmp_path, extra, match):
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("kept")
  before = snapshot(workdir)
  result = run_cli("--config", "experiments/shakespeare_char.py", "--workdir", str(workdir),
                   *cli_args(**{"privacy.enabled": True, **extra}))
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors and errors[0].startswith(match), result.stderr[-1500:]
  assert snapshot(workdir) == before
