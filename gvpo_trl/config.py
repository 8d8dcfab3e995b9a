"""``GroupConfig``: the ``GRPOConfig`` every trainer here extends, with the defaults and checks they share.

The checks of :meth:`GroupConfig.__post_init__` run in this order, and the order matters:

1. ``scale_rewards`` booleans become strings (TRL accepts ``True``/``False``; every later check compares strings).
2. Values no run can use: a group of fewer than 2, NaN/∞ floats, lengths and sampling settings
   (``gvpo_trl.validation``, ``gvpo_trl.generation_checks``: greedy sampling, ``generation_kwargs``, step schedules
   that train nothing), the dynamic-sampling fields.
3. The algorithm's own checks (:meth:`GroupConfig.validate`, written by each subclass), which may also set fields TRL
   reads next (GVPO sets ``beta`` for ``gvpo_reference='initial'``).
4. TRL options that the loss seam does not carry over (entropy terms, off-policy masking, aggregation).
5. ``updates_per_rollout`` turns into ``steps_per_generation`` (only when neither it nor ``generation_batch_size`` is
   set), because ``GRPOConfig.__post_init__`` (step 6) derives the generation batch from it.
6. ``GRPOConfig.__post_init__``: TRL's own checks and derived sizes.
7. Whole groups: per micro-step (needs the sizes of step 6), per process for the features that count groups on one
   process (:meth:`GroupConfig.whole_group_needs`), then the mixed-buffer fields (some need the derived sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from trl import GRPOConfig

from .buffer import BufferArgs, buffer_enabled, check_buffer_config
from .dynamic_sampling import DynamicSamplingArgs, check_dynamic_sampling_config, dynamic_sampling_enabled
from .generation_checks import check_sampling_settings, check_schedule
from .validation import check_finite_fields, check_lengths


def check_whole_groups_per_process(args: Any, name: str, needed_by: str, remedy: str) -> None:
    """Raise ``ValueError`` unless each process's generation batch (``per_device_train_batch_size ×
    steps_per_generation`` rows) holds whole groups of ``num_generations``, which ``needed_by`` requires. TRL only
    checks the global batch, which differs from the local one with several processes."""
    rows = args.per_device_train_batch_size * args.steps_per_generation
    if rows % args.num_generations:
        raise ValueError(
            f"{name}: {needed_by} needs each process's generation batch (per_device_train_batch_size × "
            f"steps_per_generation = {args.per_device_train_batch_size} × {args.steps_per_generation} = {rows} rows) "
            f"to hold whole groups of num_generations={args.num_generations}. Make it a multiple of num_generations, "
            f"{remedy}."
        )


def refuse_unsupported_grpo_options(config: GRPOConfig, name: str) -> None:
    """GRPOTrainer's own loss terms that the loss seam of ``GroupTrainer`` does not carry over."""
    algorithm = name.removesuffix("Config")
    if config.entropy_coef != 0 or config.use_adaptive_entropy:
        raise ValueError(
            f"{name}: {algorithm} has no entropy bonus. Set entropy_coef=0 and use_adaptive_entropy=False."
        )
    if config.top_entropy_quantile < 1.0:
        raise ValueError(
            f"{name}: top_entropy_quantile < 1 masks tokens out of the loss, which {algorithm} defines on whole "
            "completions. Set top_entropy_quantile=1.0."
        )
    if config.off_policy_mask_threshold is not None:
        raise ValueError(
            f"{name}: off_policy_mask_threshold (TRL's off-policy sequence masking) is not part of {algorithm}; "
            "off-policy samples are handled by the algorithm itself (see docs/mixed_buffers.md). Leave it at None."
        )
    if config.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"{name}: multi_objective_aggregation={config.multi_objective_aggregation!r} is not supported: the "
            "trainers here compute their own advantages from the weighted sum of the reward functions. Use "
            "'sum_then_normalize'."
        )


@dataclass
class GroupConfig(DynamicSamplingArgs, BufferArgs, GRPOConfig):
    """``GRPOConfig`` plus the checks and defaults every group-based trainer here shares, the mixed-buffer fields
    (``buffer_*``, ``external_*``: see ``gvpo_trl.buffer.BufferArgs``) and the dynamic-sampling fields
    (``min_valid_fraction``, ``max_resample_rounds``: see ``gvpo_trl.dynamic_sampling``). Not used directly: a
    subclass adds its fields, its own checks in :meth:`validate`, and sets :attr:`updates_per_rollout`."""

    #: Optimizer steps per rollout when neither ``steps_per_generation`` nor ``generation_batch_size`` is set:
    #: ``steps_per_generation = updates_per_rollout × gradient_accumulation_steps``. None keeps TRL's default (1).
    updates_per_rollout: ClassVar[int | None] = None

    def validate(self) -> None:
        """The algorithm's own checks (raise ``ValueError`` saying what to change); run before ``GRPOConfig``'s, with
        ``scale_rewards`` already normalised to a string."""

    def whole_group_needs(self) -> list[tuple[str, str]]:
        """``(what, remedy)`` for each setting that needs every process's generation batch to hold whole groups."""
        needs = []
        if buffer_enabled(self):
            needs.append(("the mixed buffer (the process that holds a group chooses its historical members)",
                          "or turn the buffer off"))  # fmt: skip
        if dynamic_sampling_enabled(self):
            needs.append(
                ("min_valid_fraction > 0 (valid groups are counted per process)", "or set min_valid_fraction=0")
            )
        return needs

    def __post_init__(self):
        name = type(self).__name__
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)  # step 1
        if self.num_generations is not None and self.num_generations < 2:  # step 2
            raise ValueError(
                f"{name}: num_generations (the group size k) must be at least 2, got {self.num_generations}: a group "
                "statistic needs two members. Set num_generations >= 2."
            )
        check_finite_fields(self, name)
        check_lengths(self, name)
        check_sampling_settings(self, name)  # config fields and generation_kwargs together
        check_schedule(self, name)  # steps, epochs, save/log intervals that would train or save nothing
        check_dynamic_sampling_config(self, name)
        self.validate()  # step 3
        refuse_unsupported_grpo_options(self, name)  # step 4
        if self.updates_per_rollout and self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = self.updates_per_rollout * self.gradient_accumulation_steps  # step 5
        super().__post_init__()  # step 6
        if self.steps_per_generation > 1 and self.per_device_train_batch_size % self.num_generations != 0:  # step 7
            raise ValueError(
                f"{name}: per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}) when steps_per_generation ({self.steps_per_generation}) "
                "> 1: each micro-step must hold whole groups, and a group cannot span micro-steps. Raise "
                "per_device_train_batch_size, or set steps_per_generation=1 (then a group may span processes)."
            )
        for needed_by, remedy in self.whole_group_needs():
            check_whole_groups_per_process(self, name, needed_by, remedy)
        check_buffer_config(self, name)
