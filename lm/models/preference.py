"""Preference losses on sequence log-probabilities: DPO (sigmoid, conservative) and IPO.

With the policy's and the frozen reference's log-probabilities of the chosen
(w) and rejected (l) responses, each summed over the response's tokens,

  h = (log pi(w) - log ref(w)) - (log pi(l) - log ref(l))       the margin of implicit rewards / beta

  sigmoid (DPO, Rafailov et al. 2023, eq. 7), with label smoothing eps
  (conservative DPO: the label is flipped with probability eps):
      loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
  ipo (Azar et al. 2023, eq. 17: the squared distance to the margin 1 / (2 beta)):
      loss = (h - 1 / (2 * beta))^2

The implicit rewards are r = beta * (log pi - log ref) (the paper's eq. 5, without
the partition function, which cancels in the margin). With the policy equal to
the reference every h is 0 and the sigmoid loss is log 2.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.losses import lm_token_losses

LOSSES = ("sigmoid", "ipo")
SEQUENCE_KEYS = ("inputs", "targets", "mask")  # of each side of a pair: chosen_inputs, ..., rejected_mask


def sequence_logprobs(model: nn.Module, params: Any, inputs: jax.Array, targets: jax.Array, mask: jax.Array
                      ) -> jax.Array:
  """[batch] log-probabilities of each row's masked targets under a TransformerLM (dropout off)."""
  losses = lm_token_losses(model, params, inputs, targets)
  return -jnp.sum(losses * mask.astype(jnp.float32), axis=-1)


def preference_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
                    reference_rejected: jax.Array, *, beta: float, label_smoothing: float = 0.0,
                    kind: str = "sigmoid") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-row losses [batch] and per-row figures {chosen_reward, rejected_reward, margin, correct} (module doc)."""
  chosen_ratio = policy_chosen - reference_chosen
  rejected_ratio = policy_rejected - reference_rejected
  h = chosen_ratio - rejected_ratio
  if kind == "sigmoid":
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  elif kind == "ipo":
    losses = (h - 1.0 / (2.0 * beta)) ** 2
  else:
    raise ValueError(f"preference loss {kind!r} is not one of {LOSSES}")
  chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
  return losses, {"chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
                  "margin": chosen_reward - rejected_reward, "correct": (h > 0).astype(jnp.float32)}


def pair_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
  """[batch] 1 for a row holding a pair, 0 for a padding row (no chosen response)."""
  return jnp.any(batch["chosen_mask"] > 0, axis=-1).astype(jnp.float32)


def pair_logprobs(model: nn.Module, params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Chosen and rejected sequence log-probabilities [batch] each, in one forward pass of 2 x batch rows."""
  rows = batch["chosen_inputs"].shape[0]
  both = {key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0) for key in SEQUENCE_KEYS}
  logprobs = sequence_logprobs(model, params, both["inputs"], both["targets"], both["mask"])
  return logprobs[:rows], logprobs[rows:]
