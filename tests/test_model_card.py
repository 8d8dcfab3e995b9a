"""A checkpoint's model card names the algorithm that trained it, cites its paper and tags it (gvpo_trl/model_card.py),
and says when the mixed buffer or demonstrations were used."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from gvpo_trl import __version__
from gvpo_trl.demo.toy import build_dataset
from gvpo_trl.model_card import PAPERS, insert_notes

from .helpers import make_trainer


def train_and_read_cards(tmp_path, algorithm, steps=2, **overrides) -> tuple[object, ModelCard, str]:
    trainer = make_trainer(algorithm, tmp_path, max_steps=steps, save_strategy="steps", save_steps=steps, **overrides)
    trainer.train()
    in_checkpoint = Path(tmp_path) / f"checkpoint-{steps}" / "README.md"
    in_output_dir = Path(tmp_path) / "README.md"
    assert in_checkpoint.read_text() == in_output_dir.read_text()
    return trainer, ModelCard.load(in_checkpoint), in_checkpoint.read_text()


@pytest.mark.parametrize(("algorithm", "name"), [("gvpo", "GVPO"), ("gpg", "GPG"), ("gspo", "GSPO")])
def test_card_names_the_algorithm_cites_its_paper_and_tags_it(tmp_path, algorithm, name):
    trainer, card, text = train_and_read_cards(tmp_path, algorithm)
    paper = PAPERS[algorithm]
    assert set(card.data.tags) == {"generated_from_trainer", "trl", "gvpo-trl", algorithm}
    assert (
        f"This model was trained with {name}, a method introduced in [{paper['title']}]"
        f"(https://huggingface.co/papers/{paper['id']})." in text
    )
    assert f"Cite {name} as:" in text and f"eprint       = {{arXiv:{paper['id']}}}" in text
    assert "GRPO" not in text and "DeepSeekMath" not in text and "2402.03300" not in text
    own = {
        "gvpo": "`gvpo_beta=0.1`, `gvpo_reference='rollout'`, `scale_rewards='none'`.",
        "gpg": "`scale_rewards='none'`, `use_age=True`, `min_valid_fraction=0.6`, `importance_weight_cap=2.0`.",
        "gspo": "`epsilon=0.0003`, `epsilon_high=0.0004`, `importance_sampling_level='sequence'`, `loss_type='grpo'`, "
        "`scale_rewards='group'`, `gspo_token=False`.",
    }[algorithm]
    assert f"Trained with gvpo-trl {__version__} (`{name}Trainer`): groups of 4 completions per prompt, {own}" in text
    assert "Mixed buffer" not in text and "Demonstrations" not in text
    assert trainer.model.model_tags == ["trl", "gvpo-trl", algorithm]  # what transformers' push_to_hub adds


def test_card_says_how_much_came_from_history_and_demonstrations(tmp_path):
    data = build_dataset(8)  # one generation batch (8 prompts x 4): each prompt recurs in every generation round
    data = data.add_column("demo", [p[0] * 8 for p in data["prompt"]])
    trainer, card, text = train_and_read_cards(
        tmp_path, "gvpo", steps=8, dataset=data, buffer_history_per_group=1, buffer_max_staleness=8,
        external_completions_column="demo", remove_unused_columns=False,
    )  # fmt: skip
    stats = trainer.buffer_stats
    total = stats["generated_rows"] + stats["historical_rows"] + stats["external_rows"]
    assert stats["historical_rows"] > 0 and stats["external_rows"] > 0
    assert {"mixed-buffer", "demonstrations", "gvpo"} <= set(card.data.tags)
    assert (
        "Mixed buffer: up to `buffer_history_per_group=1` of each group were earlier samples of the same prompt "
        f"(`buffer_max_staleness=8` steps, `buffer_selection='newest'`): {stats['historical_rows']} of the {total} "
        "completions trained on so far were reused from history." in text
    )
    assert (
        f"Demonstrations: completions from the dataset column `demo` joined the groups ({stats['external_rows']} of "
        f"the {total} completions trained on so far)." in text
    )


def test_notes_go_after_the_method_sentence_or_before_the_versions_or_at_the_end():
    card = "# Card\n\nThis model was trained with GVPO.\n\n### Framework versions\n\n- TRL: 1.16.0\n"
    assert insert_notes(card, "NOTES") == (
        "# Card\n\nThis model was trained with GVPO.\n\nNOTES\n\n\n### Framework versions\n\n- TRL: 1.16.0\n"
    )
    reworded = "# Card\n\nTrained by GVPO.\n\n### Framework versions\n- TRL\n"
    assert insert_notes(reworded, "NOTES") == "# Card\n\nTrained by GVPO.\n\n\nNOTES\n\n### Framework versions\n- TRL\n"
    assert insert_notes("# Card\n", "NOTES") == "# Card\n\nNOTES\n"
