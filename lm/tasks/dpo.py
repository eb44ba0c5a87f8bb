"""`config.head = "dpo"`: direct preference optimization of a language model against a frozen reference.

Records `{"prompt": ..., "chosen": ..., "rejected": ...}` (`.jsonl` or `.tsv`
columns; what the server's feedback export writes) of data.source's train and
eval splits, encoded as the language model was trained (`lm.data.pairs`).
The loss is `lm.models.preference`'s: DPO's (`dpo.loss="sigmoid"`, Rafailov
et al. 2023) with `dpo.beta` and `dpo.label_smoothing` (conservative DPO),
or IPO's (`dpo.loss="ipo"`).

Parameters: {"policy": the language model trained, "reference": the frozen
one}. Both start from `config.init_from` (a head="lm" or "sft" run, or
`hf:DIR`; a head="dpo" run gives its policy to both, for another round), or
the reference from `dpo.reference` (a head="lm" or "sft" run of the same
shape and tokenizer). The reference is part of the state, so it is sharded
like the policy, checkpointed with it and restored exactly on resume, and its
log-probabilities are computed in the step (one forward pass, no gradient):
no pass over the data before training, and no stale numbers when the
reference changes (the online loop's reference is the served model). Only the
policy has an optimizer. Dropout is off in both (as TRL does for DPO): the
log-ratios must not be noisy.

Metrics: train/ and eval/ loss, reward accuracy (the chosen's implicit reward
above the rejected's), the mean chosen and rejected rewards and their margin;
every eval, `eval/kl`: a sampled estimate of the sequence-level KL(pi || ref)
on the eval split's prompts (`dpo.kl_prompts` of them, one sample each at
temperature 1, a fixed seed: mean of log pi(y|x) - log ref(y|x)).
`eval/loss` picks the best checkpoint. Sampling, serving and export use the
policy (`lm_params`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm.core.configs import ConfigPart, require
from lm.core.errors import CheckpointError
from lm.data import pairs
from lm.data import sentences as sentences_lib
from lm.inference import prompts as prompts_lib
from lm.models.preference import LOSSES, pair_logprobs, pair_weights, preference_loss, sequence_logprobs
from lm.models.transformer import TransformerLM
from lm.tasks.lm import LMTask
from lm.tasks.sft import validate_records_config
from lm.train import optim
from lm.train import step as step_lib
from lm.train.evaluate import ROWS

POLICY, REFERENCE = "policy", "reference"
REFERENCE_TASKS = ("lm", "sft")  # the runs whose weights dpo.reference may name

FIELDS = {
    "dpo.beta": 0.1,  # the strength of the pull toward the reference (the paper's beta)
    "dpo.label_smoothing": 0.0,  # conservative DPO: the chance a preference label is flipped, in [0, 0.5)
    "dpo.loss": "sigmoid",  # sigmoid (DPO) | ipo
    "dpo.reference": "",  # a head=lm or sft run whose weights are the reference; "": the init_from weights
    "dpo.kl_prompts": 64,  # eval prompts of the sampled KL(pi || ref) estimate at every eval; 0: none
    "dpo.kl_seed": 0,
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  del mode
  dpo = config.dpo
  require(dpo.beta > 0, f"config.dpo.beta={dpo.beta} must be > 0: it scales the log-ratios (the paper uses 0.1 "
          "to 0.5; smaller lets the policy move further from the reference).")
  require(0 <= dpo.label_smoothing < 0.5, f"config.dpo.label_smoothing={dpo.label_smoothing} must be in [0, 0.5): "
          "it is the chance that a preference label is wrong.")
  require(dpo.loss in LOSSES, f"config.dpo.loss={dpo.loss!r} is not one of {LOSSES}.")
  require(dpo.kl_prompts >= 0, f"config.dpo.kl_prompts={dpo.kl_prompts} must be >= 0 (0: no KL estimate).")


def make_preference_loss(model: TransformerLM, *, beta: float, label_smoothing: float, kind: str,
                         reference_of: Callable[[step_lib.StepContext], Any]) -> step_lib.LossFn:
  """The engine's loss function of a preference batch (`lm.data.pairs.PreferenceExamples`' keys).

  reference_of(ctx): the frozen reference's params (the DPO task's "reference" part; the online loop's
  served model). Rows without a response (padding) count for nothing; every figure is a contribution to
  the mean over the global batch's pairs (`loss_totals`: "pairs").
  """

  def loss_fn(params, batch, ctx):
    valid = pair_weights(batch)
    policy_chosen, policy_rejected = pair_logprobs(model, params, batch)
    reference_chosen, reference_rejected = jax.lax.stop_gradient(pair_logprobs(model, reference_of(ctx), batch))
    losses, figures = preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                      beta=beta, label_smoothing=label_smoothing, kind=kind)
    mean = lambda values: ctx.mean(jnp.sum(values * valid), "pairs")  # noqa: E731
    return mean(losses), {"accuracy": mean(figures["correct"]), "chosen_reward": mean(figures["chosen_reward"]),
                          "rejected_reward": mean(figures["rejected_reward"]), "margin": mean(figures["margin"])}

  return loss_fn


def preference_totals(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {"pairs": jnp.sum(pair_weights(batch))}


def make_preference_eval_step(model: TransformerLM, *, beta: float, label_smoothing: float, kind: str,
                              reference_of: Callable[[Any], Any], policy_of: Callable[[Any], Any]) -> Callable:
  """`eval_step(params, batch)`: summed loss, correct pairs, rewards and margin, and per-row figures."""

  def eval_step(params, batch):
    valid = pair_weights(batch)
    policy = pair_logprobs(model, policy_of(params), batch)
    reference = pair_logprobs(model, reference_of(params), batch)
    losses, figures = preference_loss(*policy, *reference, beta=beta, label_smoothing=label_smoothing, kind=kind)
    sums = {"loss_sum": jnp.sum(losses * valid), "pairs": jnp.sum(valid)}
    sums.update({f"{name}_sum": jnp.sum(value * valid) for name, value in figures.items()})
    return {**sums, ROWS + "loss": losses, ROWS + "margin": figures["margin"], ROWS + "valid": valid,
            ROWS + "index": batch["index"]}

  return eval_step


def summarize_preferences(sums: Mapping[str, float]) -> dict[str, float]:
  pairs_ = max(sums["pairs"], 1.0)
  return {"eval/loss": sums["loss_sum"] / pairs_, "eval/accuracy": sums["correct_sum"] / pairs_,
          "eval/chosen_reward": sums["chosen_reward_sum"] / pairs_,
          "eval/rejected_reward": sums["rejected_reward_sum"] / pairs_, "eval/margin": sums["margin_sum"] / pairs_,
          "eval/pairs": sums["pairs"]}


class DPOTask(LMTask):
  """Direct preference optimization (module doc)."""

  name = "dpo"
  CONFIG = ConfigPart("lm.tasks.dpo", FIELDS, validate)
  data_formats = ("sentences", "windows")
  init_from_tasks = ("lm", "sft", "dpo")
  requires_init_from = ("config.head='dpo' tunes a language model: set config.init_from to a head='lm' or 'sft' run "
                        "(or hf:DIR); its weights start the policy and, unless config.dpo.reference names another "
                        "run, are the frozen reference.")
  counts_lm_flops = False  # a step is two sequences per pair, and a reference forward pass: not the LM's count
  supports_online = sliding_eval = synthetic_data = supports_privacy = False
  exports_hf = True  # the policy is a language model (lm_params)
  ab_comparable = False
  lm_part = POLICY

  @classmethod
  def lm_part_target(cls, target, merge):
    # Both parts have the language model's shapes; the policy is the tuned model.
    return {POLICY: target, REFERENCE: target}, lambda params, restored: merge(params, restored[POLICY])

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict, mode: str) -> None:
    del mode
    validate_records_config(config, cls.name)

  def __init__(self, config, model_config, tokenizer, *, train_split=None):
    super().__init__(config, model_config, tokenizer, train_split=train_split)
    dpo = config.dpo
    self.beta, self.label_smoothing, self.kind = float(dpo.beta), float(dpo.label_smoothing), str(dpo.loss)
    self._kl_prompts: list[np.ndarray] | None = None

  # -- parameters ----------------------------------------------------------------------------------
  @property
  def batch_ranks(self) -> dict[str, int]:
    return dict(pairs.PREFERENCE_BATCH_RANKS)

  def init_params(self, key: jax.Array) -> Any:
    micro = self.config.batch_size // self.config.grad_accum_steps
    inputs = jnp.zeros((micro, self.config.seq_len), jnp.int32)
    policy = self.model.init(key, inputs)["params"]
    return {POLICY: policy, REFERENCE: policy}

  def make_optimizer(self):
    tx, schedule = optim.make_optimizer(self.config.optim, self.config.steps)
    return optim.MultiOptimizer({POLICY: tx}), schedule  # the reference has none: it never changes

  def init_from_target(self, abstract_params: Any, source_task: str) -> tuple[Any, Callable[[Any, Any], Any]]:
    if source_task == self.name:  # another round: the run's policy becomes both
      return abstract_params, lambda params, restored: {POLICY: restored[POLICY], REFERENCE: _copy(restored[POLICY])}
    return abstract_params[POLICY], lambda params, restored: {POLICY: restored, REFERENCE: _copy(restored)}

  def frozen_weights(self) -> dict[str, str]:
    return {REFERENCE: self.config.dpo.reference} if self.config.dpo.reference else {}

  def check_frozen(self, part: str, directory: str, written_by: str) -> None:
    """dpo.reference must be a language model's run (its shapes and tokenizer: the builder checks them)."""
    del part
    if written_by not in REFERENCE_TASKS:
      raise CheckpointError(f"config.dpo.reference={directory!r} was written by a head={written_by!r} run; the "
                            f"reference is a language model: name a run of head {' or '.join(REFERENCE_TASKS)}. "
                            "Nothing was written.")

  @staticmethod
  def lm_params(params: Any) -> Any:
    return params[POLICY]

  # -- the loss --------------------------------------------------------------------------------------
  def updates(self) -> Sequence[step_lib.Update]:
    loss_fn = make_preference_loss(self.model, beta=self.beta, label_smoothing=self.label_smoothing, kind=self.kind,
                                   reference_of=lambda ctx: ctx.params[REFERENCE])
    return (step_lib.Update(loss_fn, part=POLICY),)

  def loss_totals(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return preference_totals(batch)

  def make_eval_step(self) -> Callable:
    return make_preference_eval_step(self.model, beta=self.beta, label_smoothing=self.label_smoothing,
                                     kind=self.kind, reference_of=lambda params: params[REFERENCE],
                                     policy_of=lambda params: params[POLICY])

  # -- data ------------------------------------------------------------------------------------------
  def examples(self, source: Any, *, train: bool, stride: int | None = None) -> Any:
    del stride
    examples = pairs.preference_examples(source, self.tokenizer, self.config.seq_len, sentences=self.sentences)
    if train:
      return examples
    self._kl_prompts = _distinct(examples.prompts)[:int(self.config.dpo.kl_prompts)]
    return sentences_lib.PaddedToBatches(examples, self.config.batch_size)

  # -- evaluation ------------------------------------------------------------------------------------
  def summarize(self, sums: Mapping[str, float], rows: Mapping[str, np.ndarray], chars_per_token: float
                ) -> dict[str, float]:
    del rows, chars_per_token
    return summarize_preferences(sums)

  def sampled_metrics(self, params: Any) -> dict[str, float]:
    """eval/kl (module doc) on the prompts of the last eval split given to `examples`; call under the mesh context."""
    if not self._kl_prompts:
      return {}
    kl = sampled_kl(self.model, self.lm_params(params), params[REFERENCE], self._kl_prompts,
                    encoder=pairs.SequenceEncoder(self.tokenizer, self.config.seq_len, self.sentences),
                    rows_per_batch=int(self.config.batch_size), seed=int(self.config.dpo.kl_seed))
    return {"eval/kl": float(np.mean(kl)), "eval/kl_stderr": float(np.std(kl) / np.sqrt(len(kl)))}

  # -- generation ------------------------------------------------------------------------------------
  def sample(self, params: Any, options: ml_collections.ConfigDict, prompt: str | None = None, *,
             prompts: Sequence[Any] | None = None) -> list[str]:
    """The policy's continuations (`LMTask.sample`)."""
    return super().sample(self.lm_params(params), options, prompt, prompts=prompts)


def _copy(params: Any) -> Any:
  """Other buffers with the same values (and shardings): the step donates the state, each buffer once."""
  return jax.tree.map(lambda leaf: leaf.copy(), params)


def _distinct(prompts: Sequence[np.ndarray]) -> list[np.ndarray]:
  seen, out = set(), []
  for ids in prompts:
    key = ids.tobytes()
    if key not in seen:
      seen.add(key)
      out.append(ids)
  return out


def sampled_kl(model: TransformerLM, policy: Any, reference: Any, prompts: Sequence[np.ndarray], *,
               encoder: pairs.SequenceEncoder, rows_per_batch: int, seed: int) -> np.ndarray:
  """Per prompt, log pi(y|x) - log ref(y|x) of one y sampled from pi at temperature 1: an unbiased estimate of
  the sequence-level KL(pi || ref) when averaged. Call under the mesh context."""
  stops = (encoder.vocab.eos,) if encoder.vocab is not None else ()
  longest = max(len(ids) for ids in prompts)
  continuations = prompts_lib.decode_batched(
      model, policy, list(prompts), count=1, rows_per_batch=rows_per_batch,
      max_new_tokens=encoder.seq_len + 1 - longest, temperature=1.0, stop_tokens=stops, pad_id=encoder.pad,
      seed=seed)
  rows = [encoder.encode_ids(ids, outs[0].tokens) for ids, outs in zip(prompts, continuations)]
  batch = {key: jnp.asarray(np.stack([row[key] for row in rows])) for key in pairs.SEQUENCE_KEYS}
  return prompts_lib.host_array(_log_ratio(model, policy, reference, batch))


@functools.partial(jax.jit, static_argnums=0)
def _log_ratio(model: TransformerLM, policy: Any, reference: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
  """[batch] log pi - log ref of each row's masked targets (jitted: the model's sharding constraints trace)."""
  return (sequence_logprobs(model, policy, batch["inputs"], batch["targets"], batch["mask"])
          - sequence_logprobs(model, reference, batch["inputs"], batch["targets"], batch["mask"]))
