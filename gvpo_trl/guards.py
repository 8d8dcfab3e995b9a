"""The non-finite guards: nothing non-finite reaches the parameters, and what was non-finite shows in the logs.

``NonFiniteGuards`` is mixed into ``GroupTrainer`` (see ``docs/hardening.md``):

- ``_calculate_rewards``: a reward of ±∞ (or NaN) counts as unscorable, like ``None`` (:func:`unscorable_rewards`);
  centred against ±∞, every other member of its group would get ±∞. Shown in ``groups/nonfinite_reward_frac``.
- ``compute_loss``: a non-finite loss on any process stops every process together, before the backward.
- ``_get_grad_norm``: a non-finite gradient norm stops before the optimizer step.
"""

from __future__ import annotations

import math
import warnings

import torch

from .nonfinite_causes import nonfinite_cause


def unscorable_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rewards`` (rows × reward functions) with every non-finite value as NaN (= unscorable), and the mask of the
    non-finite values."""
    nonfinite = ~torch.isfinite(rewards)
    return rewards.masked_fill(nonfinite, float("nan")), nonfinite


class NonFiniteGuards:
    """Mixin for a ``trl.GRPOTrainer`` subclass: the three guards of this module."""

    _warned_nonfinite_reward: bool = False
    _loss_inputs: dict | None = None  # the last micro-step's batch, for naming the cause of a non-finite value

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        raw = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        rewards, nonfinite = unscorable_rewards(raw)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["groups/nonfinite_reward_frac"].append(nonfinite.float().mean().item())
        if torch.isinf(raw).any() and not self._warned_nonfinite_reward:
            self._warned_nonfinite_reward = True
            warnings.warn(
                f"{type(self).__name__}: a reward function returned ±inf; such rewards count as unscorable (like "
                "None) and show in groups/nonfinite_reward_frac. Warned once per run.",
                stacklevel=2,
            )
        return rewards

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._loss_inputs = inputs
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # every process learns whether any loss is non-finite, so that all stop together, before the backward
        bad = self.accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), reduction="sum")
        if bad.item() > 0:
            world = self.accelerator.num_processes
            self._stop_nonfinite(
                "loss", loss.detach().item(), f"non-finite on {int(bad.item())} of {world} process(es)"
            )
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        value = float(grad_norm.item() if hasattr(grad_norm, "item") else grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(value):  # the norm is global: every process sees the same value
            self._stop_nonfinite("gradient norm", value, str(value))
        return grad_norm

    def _stop_nonfinite(self, what: str, value: float, state: str) -> None:
        """Log the non-finite value and stop: HF's logging_nan_inf_filter would show it as a plausible loss."""
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self.log({f"nonfinite/{what.replace(' ', '_')}": value})
        cause = nonfinite_cause(self.args, self._loss_inputs)  # a setting or a stored sample, where it is visible
        generic = ("Look at the last logged metrics (groups/nonfinite_reward_frac, the reward functions' outputs, the "
                   "learning rate).")  # fmt: skip
        look = f"Likely cause: {cause}" if cause else generic
        raise FloatingPointError(
            f"{type(self).__name__}: the {what} is {state} (this process: {value}) at step {self.state.global_step} "
            f"({mode}); stopping before it reaches the parameters. {look} Resume from the last checkpoint with a fix."
        )
