"""Every TRL internal that gvpo-trl relies on, in one place.

TRL reshapes ``GRPOTrainer``'s private methods between minor releases. The trainers here override a few narrow
seams and call ``super()``; this module names those seams and the attributes we read. ``import gvpo_trl`` warns when
the installed TRL is outside the tested range (the ``trl`` requirement in ``pyproject.toml``, read by
:func:`supported_trl`), naming the seams that changed (:func:`missing_internals`); ``gvpo-trl compat`` prints the
same report, and ``tests/test_trl_compat.py`` checks each item, also against the live objects.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

#: Multimodal keys of the generation output (vision-language models), forwarded by our loss seam to
#: ``_get_per_token_logps_and_entropies`` as TRL's own ``_compute_loss`` does. ``pixel_values`` and the per-image
#: tensors are flat over the images of all rows; ``split_pixel_values_by_grid`` turns them into per-row lists
#: (``num_images``, ``num_tiles`` are per-row lists already) and ``unsplit_pixel_values_by_grid`` back.
#: ``token_type_ids`` / ``mm_token_type_ids`` span prompt + completion: ``(B, P + C)``.
MULTIMODAL_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)

#: Methods of ``trl.GRPOTrainer`` we override or call, with the leading parameters we pass or receive.
GRPO_METHODS: dict[str, tuple[str, ...]] = {
    # called via super(); we post-process its output dict (keys in GRPO_OUTPUT_KEYS)
    "_generate_and_score_completions": ("self", "inputs"),
    # overridden (mixed buffers); super() is called on the fresh rows only. Returns the 8-tuple (prompt_ids,
    # completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images)
    "_generate": ("self", "prompts"),
    # overridden (mixed buffers): within a mixed batch, called via super() with num_generations=1, since the fresh
    # rows of a group are fewer than num_generations (vLLM's server mode generates num_generations per prompt)
    "_generate_single_turn": ("self", "prompt_ids", "images", "multimodal_fields", "num_generations"),
    # called via super(); returns rewards of shape (global batch, num reward funcs), gathered over processes in process
    # order; the mixed buffer also calls it on a subset of rows
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    # called via super(); returns (prompt_ids, images, multimodal_fields): the prompt lengths are checked against the
    # model's positions, and the per-row images of a batch mixing image and text-only prompts get [] for None
    "_tokenize_prompts": ("self", "prompts"),
    # called via super(); shuffles and splits the generation batch into ``self._buffered_inputs``, which we regroup
    "_prepare_inputs": ("self", "generation_batch"),
    # replaced: the loss seam that ``compute_loss`` calls
    "_compute_loss": ("self", "model", "inputs"),
    # called, and overridden: per-token log-probs of the completion tokens, the MoE router loss (compute_aux_loss) and,
    # by keyword, the multimodal inputs of MULTIMODAL_FORWARD_KEYS; a batch mixing image and text-only rows is passed
    # on chunk by chunk (gvpo_trl.image_chunks). Returns (logps, entropies or None, aux loss or None)
    "_get_per_token_logps_and_entropies": (
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
        *MULTIMODAL_FORWARD_KEYS,
    ),
    # called via super(); its RepeatSampler (attributes shuffle, seed, generator) is wrapped to reseed per epoch
    "_get_train_sampler": ("self", "dataset"),
    # called via super(): checkpoint hooks where the trainer state beside the model is saved / restored
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    # transformers' Trainer, called via super(): returns the scheduler (a LambdaLR for every lr_scheduler_type but
    # reduce_lr_on_plateau), whose factors buffer_scale_lr multiplies by the fresh share
    "create_scheduler": ("self", "num_training_steps", "optimizer"),
    # called via super(): the run identity is checked against the checkpoint before transformers loads it
    "train": ("self", "resume_from_checkpoint"),
    # called via super(): the micro-step loss, checked for non-finite values (all processes) before the backward
    "compute_loss": ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
    # transformers' Trainer, called via super() before each optimizer step: the global gradient norm, checked
    "_get_grad_norm": ("self", "model", "grad_norm"),
    # called via super() (at each checkpoint, before the checkpoint is written, and by push_to_hub): writes README.md
    # in args.output_dir from the class attributes GRPO_CARD_ATTRIBUTES; gvpo_trl.model_card adds to that file
    "create_model_card": ("self", "model_name", "dataset_name", "tags"),
}

#: Class attributes of ``GRPOTrainer`` that its model card is written from, set by each trainer here (``_paper`` is a
#: dict with the keys of GRPO_PAPER_KEYS).
GRPO_CARD_ATTRIBUTES = ("_name", "_paper", "_tag_names")
GRPO_PAPER_KEYS = ("title", "id", "citation")

#: Keys of the dict returned by ``_generate_and_score_completions`` that we read.
GRPO_OUTPUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")

#: Optional keys of that dict: present only in some configurations.
GRPO_OPTIONAL_OUTPUT_KEYS = (
    "old_per_token_logps",
    "ref_per_token_logps",
    "tool_mask",
    "num_items_in_batch",
    "importance_sampling_ratio",  # vLLM sampling correction, applied by the GPG/GSPO losses as TRL does
    "sampling_per_token_logps",  # re-padded when GPG joins generation rounds
)


#: Functions of ``trl.trainer.utils`` we call: the per-row split of the flat image tensors and its inverse (used where
#: rows of a generation batch are regrouped or joined across generation rounds).
TRL_UTILS = ("split_pixel_values_by_grid", "unsplit_pixel_values_by_grid")

#: Padding layout of that dict, relied on when batches are concatenated (``gvpo_trl.rows``): ``prompt_*`` tensors
#: are left-padded; completion-aligned tensors are right-padded (``tool_mask`` with 1, the others with 0 / pad id);
#: ``token_type_ids`` / ``mm_token_type_ids`` are the left-padded prompt part followed by the completion part.

#: Attributes of a constructed ``GRPOTrainer`` we read (or, for ``_buffered_inputs``, replace).
GRPO_ATTRIBUTES = (
    "_buffered_inputs",  # list of micro-batches for the current generation, indexed by ``_step % steps_per_generation``
    "_step",  # micro-step counter
    "_metrics",  # {"train"|"eval": defaultdict(list)}: averaged and logged by ``GRPOTrainer.log``
    "num_generations",
    "num_generations_eval",
    "reward_weights",
    "beta",
    "ref_model",
    "current_gradient_accumulation_steps",  # set by transformers' Trainer in the training loop
    "aux_loss_enabled",  # MoE: whether the loss adds router_aux_loss_coef × the router load-balancing loss
    "router_aux_loss_coef",  # the config's value, or the architecture's own when the config leaves it None
    "tools",  # the mixed buffer refuses buffer_rescore with environments (their state is per rollout)
    "rollout_func",  # wrapped at construction: its completions are checked before TRL decodes them
    "environment_factories",
    "processing_class",
    "train_dataset",
    "eval_dataset",
    "reward_funcs",  # wrapped at construction so that a malformed reward output names its function
    "reward_func_names",
    "state",  # state.global_step: the policy version stored with buffered samples
    "accelerator",
)

#: Per-row lists ``GRPOTrainer._generate_and_score_completions`` assigns for each generation batch (environments and
#: tools; absent without them), indexed by row position by ``_generate``'s tool loop and ``_calculate_rewards``: the
#: mixed buffer narrows them to the rows it generates or scores (``gvpo_trl.buffer.row_state``).
GRPO_ROW_STATE = ("environments", "_batch_environments", "_sync_tool_dicts", "_async_tool_dicts")

#: Outside TRL: transformers' ``Trainer._get_output_dir(trial=)`` and
#: ``transformers.trainer_utils.PREFIX_CHECKPOINT_DIR``
#: (where checkpoint state is written), accelerate's ``gather_object`` (concatenates lists in process order), and the
#: order of TRL's ``RepeatSampler``: each process receives consecutive groups of k rows, in process order.

#: ``GRPOConfig`` fields whose meaning we depend on.
GRPO_CONFIG_FIELDS = (
    "num_generations",
    "steps_per_generation",
    "generation_batch_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_iterations",
    "beta",
    "scale_rewards",
    "multi_objective_aggregation",
    "loss_type",
    "importance_sampling_level",
    "epsilon",
    "epsilon_high",
    "top_entropy_quantile",
    "entropy_coef",
    "use_adaptive_entropy",
    "off_policy_mask_threshold",
    "shuffle_dataset",
    "use_vllm",
    "delta",
    "use_bias_correction_kl",
    "seed",
    "max_completion_length",
    "remove_unused_columns",
    "router_aux_loss_coef",
    "max_steps",
)

#: ``GRPOConfig`` fields that configure TRL's own policy loss, which the GVPO and GPG losses replace: a value other
#: than TRL's default would be silently ignored, so their configs refuse it (GSPO uses the clipping fields itself).
GRPO_LOSS_FIELDS = ("loss_type", "epsilon", "epsilon_high", "delta", "importance_sampling_level")


def grpo_default(name: str):
    """The default value of the ``GRPOConfig`` field ``name``."""
    from dataclasses import MISSING, fields

    from trl import GRPOConfig

    field = next(f for f in fields(GRPOConfig) if f.name == name)
    return field.default_factory() if field.default is MISSING else field.default


def refuse_unused_grpo_fields(config, names: tuple[str, ...], why: str) -> None:
    """Raise ``ValueError`` naming every field of ``names`` whose value differs from ``GRPOConfig``'s default."""
    changed = {name: getattr(config, name) for name in names if getattr(config, name) != grpo_default(name)}
    if changed:
        settings = ", ".join(f"{name}={value!r}" for name, value in changed.items())
        defaults = ", ".join(f"{name}={grpo_default(name)!r}" for name in changed)
        raise ValueError(
            f"{type(config).__name__}: {settings}: {why}, so the value would be silently ignored. Leave "
            f"{'it' if len(changed) == 1 else 'them'} at TRL's default{'' if len(changed) == 1 else 's'} ({defaults})."
        )


class UntestedTRLWarning(UserWarning):
    """The installed TRL is outside the range gvpo-trl is tested on."""


def supported_trl() -> SpecifierSet:
    """The TRL versions gvpo-trl is tested on: the ``trl`` requirement of ``pyproject.toml``, the one place it is
    written. Read from the source tree when gvpo-trl runs from one (a clone, an editable install), else from the
    installed distribution's metadata, which pip built from that file."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    requirements = None
    if pyproject.is_file():
        import tomllib

        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "gvpo-trl":
            requirements = project.get("dependencies", [])
    if requirements is None:
        from importlib.metadata import requires

        requirements = requires("gvpo-trl") or []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "trl" and requirement.marker is None:
            return requirement.specifier
    raise RuntimeError("gvpo-trl's requirements name no trl range (pyproject.toml: [project] dependencies).")


def trl_version_problem(version: str | None = None) -> str | None:
    """Why the installed (or given) TRL version is untested, with the seams of the installed TRL that changed (see
    :func:`missing_internals`); None inside the tested range."""
    if version is None:
        import trl

        version = trl.__version__
    tested = supported_trl()
    if tested.contains(Version(version), prereleases=True):
        return None
    changed = missing_internals()
    found = (
        "These internals it relies on changed: " + "; ".join(changed) + "."
        if changed
        else "Every internal it checks without training is still there; behaviour can still differ."
    )
    return (
        f"gvpo-trl is tested with trl{tested} but trl {version} is installed. {found} Run `gvpo-trl compat` for the "
        f'report and `make check-trl TRL={version}` for the tests, or install a tested TRL: pip install "trl{tested}".'
    )


def check_trl_version(version: str | None = None) -> None:
    """Warn (:class:`UntestedTRLWarning`) when the installed (or given) TRL is outside the tested range: gvpo-trl
    overrides a few ``GRPOTrainer`` internals, which TRL may change between releases."""
    problem = trl_version_problem(version)
    if problem:
        warnings.warn(problem, UntestedTRLWarning, stacklevel=2)


def missing_internals() -> list[str]:
    """Names (with reasons) of the internals above that the installed TRL lacks or has changed; empty when all is
    well."""
    from dataclasses import fields

    from trl import GRPOConfig, GRPOTrainer

    problems = []
    for name, expected in GRPO_METHODS.items():
        method = getattr(GRPOTrainer, name, None)
        if method is None:
            problems.append(f"GRPOTrainer.{name} is missing")
            continue
        params = tuple(inspect.signature(method).parameters)
        if params[: len(expected)] != expected:
            problems.append(f"GRPOTrainer.{name}{params} no longer starts with {expected}")
    problems += [f"GRPOTrainer.{name} is missing" for name in GRPO_CARD_ATTRIBUTES if not hasattr(GRPOTrainer, name)]
    paper = getattr(GRPOTrainer, "_paper", None)
    if isinstance(paper, dict) and not set(GRPO_PAPER_KEYS) <= set(paper):
        problems.append(f"GRPOTrainer._paper has keys {sorted(paper)}, not {list(GRPO_PAPER_KEYS)}")
    from trl.trainer import utils as trl_utils

    problems += [f"trl.trainer.utils.{name} is missing" for name in TRL_UTILS if not hasattr(trl_utils, name)]
    config_fields = {f.name for f in fields(GRPOConfig)}
    problems += [f"GRPOConfig.{name} is missing" for name in GRPO_CONFIG_FIELDS if name not in config_fields]
    return problems
