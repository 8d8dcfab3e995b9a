"""Model cards that credit the algorithm a model was trained with.

TRL writes a model card (``README.md`` in ``output_dir``) at every checkpoint and on ``push_to_hub``, from the
trainer class's ``_name``, ``_paper`` and ``_tag_names``. Each trainer here sets them from :data:`PAPERS` and
:func:`tag_names`; :class:`ModelCardMixin` then adds what TRL's card cannot know: the tags ``mixed-buffer`` /
``demonstrations`` when the run used them, and a paragraph naming gvpo-trl, the algorithm's settings and what the
mixed buffer did (:func:`training_notes`). The card is also copied into each checkpoint folder, so that a checkpoint
pushed or shared on its own says how it was trained.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from typing import Any

from .checkpoints import checkpoint_dir

#: The paper of each algorithm, in the form of TRL's ``_paper`` (title, arXiv id, BibTeX).
PAPERS: dict[str, dict[str, str]] = {
    "gvpo": {
        "title": "GVPO: Group Variance Policy Optimization for Large Language Model Post-Training",
        "id": "2504.19599",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zhang2025gvpo,
                title        = {{GVPO: Group Variance Policy Optimization for Large Language Model Post-Training}},
                author       = {Kaichen Zhang and Yuzhong Hong and Junwei Bao and Hongfei Jiang and Yang Song and
                                Dingqian Hong and Hui Xiong},
                year         = 2025,
                booktitle    = {Advances in Neural Information Processing Systems},
                eprint       = {arXiv:2504.19599},
            }"""),
    },
    "gpg": {
        "title": "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
        "id": "2504.02546",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{chu2025gpg,
                title        = {{GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning}},
                author       = {Xiangxiang Chu and Hailang Huang and Xiao Zhang and Fei Wei and Yong Wang},
                year         = 2025,
                eprint       = {arXiv:2504.02546},
            }"""),
    },
    "gspo": {
        "title": "Group Sequence Policy Optimization",
        "id": "2507.18071",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zheng2025gspo,
                title        = {{Group Sequence Policy Optimization}},
                author       = {Chujie Zheng and Shixuan Liu and Mingze Li and Xiong-Hui Chen and Bowen Yu and
                                Chang Gao and Kai Dang and Yuqiong Liu and Rui Men and An Yang and Jingren Zhou and
                                Junyang Lin},
                year         = 2025,
                eprint       = {arXiv:2507.18071},
            }"""),
    },
}

#: Card tags of a run that used the mixed buffer (historical members) / external completions (demonstrations).
BUFFER_TAG, DEMONSTRATIONS_TAG = "mixed-buffer", "demonstrations"


def tag_names(algorithm: str) -> list[str]:
    """A trainer's ``_tag_names``: TRL's own tag, this library's and the algorithm's (``gvpo``, ``gpg``, ``gspo``)."""
    return ["trl", "gvpo-trl", algorithm]


def algorithm_settings(args: Any) -> dict[str, Any]:
    """The fields the algorithm's config class declares itself (``gvpo_beta``, GSPO's ``epsilon``, ...), with their
    values; ``num_generations`` is left out (the card states the group size)."""
    declared = vars(type(args)).get("__annotations__", {})
    return {name: getattr(args, name) for name in declared if name != "num_generations"}


def training_notes(trainer_name: str, k: int, settings: dict[str, Any], args: Any, stats: dict[str, int]) -> str:
    """The card's paragraph about the run: the trainer, group size and algorithm settings, and, when the groups held
    members that were not generated for them, how many were reused from history or came from the dataset."""
    from . import __version__

    shown = ", ".join(f"`{name}={value!r}`" for name, value in settings.items())
    notes = [
        f"Trained with gvpo-trl {__version__} (`{trainer_name}`): groups of {k} completions per "
        f"prompt{', ' + shown if shown else ''}."
    ]
    generated, historical, external = (stats.get(key, 0) for key in ("generated_rows", "historical_rows",
                                                                       "external_rows"))  # fmt: skip
    total = generated + historical + external
    if getattr(args, "buffer_history_per_group", 0):
        notes.append(
            f"Mixed buffer: up to `buffer_history_per_group={args.buffer_history_per_group!r}` of each group were "
            f"earlier samples of the same prompt (`buffer_max_staleness={args.buffer_max_staleness}` steps, "
            f"`buffer_selection={args.buffer_selection!r}`): {historical} of the {total} completions trained on so "
            "far were reused from history."
        )
    if getattr(args, "external_completions_column", None):
        notes.append(
            f"Demonstrations: completions from the dataset column `{args.external_completions_column}` joined the "
            f"groups ({external} of the {total} completions trained on so far)."
        )
    return "\n\n".join(notes)


def card_tags(args: Any, stats: dict[str, int]) -> list[str]:
    """Tags beyond the trainer's ``_tag_names`` for what the run used."""
    tags = []
    if getattr(args, "buffer_history_per_group", 0):
        tags.append(BUFFER_TAG)
    if getattr(args, "external_completions_column", None):
        tags.append(DEMONSTRATIONS_TAG)
    return tags


def insert_notes(card: str, notes: str) -> str:
    """``card`` (TRL's README text) with ``notes`` as a paragraph after the sentence that names the method, or before
    the framework versions when a TRL template words it differently, or at the end."""
    lines = card.split("\n")
    for anchor, after in (("This model was trained with", True), ("### Framework versions", False)):
        at = next((i for i, line in enumerate(lines) if line.startswith(anchor)), None)
        if at is not None:
            at += 1 if after else 0
            return "\n".join([*lines[:at], "", notes, "", *lines[at:]])
    return card.rstrip("\n") + "\n\n" + notes + "\n"


class ModelCardMixin:
    """Adds to TRL's ``create_model_card``: the run's tags and :func:`training_notes`. Mixed into ``GroupTrainer``
    before ``GRPOTrainer``; reads the trainer's ``buffer_stats`` (the mixed buffer's counts) when it has them."""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        stats = dict(getattr(self, "buffer_stats", {}))
        extra = card_tags(self.args, stats)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=[*tags, *extra])
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        if not os.path.isfile(path):
            return
        settings = algorithm_settings(self.args)
        notes = training_notes(type(self).__name__, self.num_generations, settings, self.args, stats)
        with open(path, encoding="utf-8") as f:
            card = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(insert_notes(card, notes))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)  # TRL's writes the card to output_dir first
        card = os.path.join(self.args.output_dir, "README.md")
        if self.args.should_save and os.path.isfile(card):
            shutil.copy(card, os.path.join(checkpoint_dir(self, trial), "README.md"))
