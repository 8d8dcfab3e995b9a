"""The TRL internals gvpo-trl relies on (gvpo_trl/_trl_compat.py) exist with the expected shape."""

import inspect
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from gvpo_trl import GVPOConfig, GVPOTrainer, _trl_compat
from gvpo_trl._trl_compat import (
    GRPO_ATTRIBUTES,
    GRPO_OPTIONAL_OUTPUT_KEYS,
    GRPO_OUTPUT_KEYS,
    UntestedTRLWarning,
    check_trl_version,
    missing_internals,
    supported_trl,
    trl_version_problem,
)
from gvpo_trl.demo.toy import build_dataset, repeat_letter_reward

from .helpers import cpu_args, tiny_model_path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_trl_has_every_internal_we_use():
    assert missing_internals() == []


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "2.0.0"])
def test_untested_trl_version_warns_and_says_what_to_do(version):
    with pytest.warns(UntestedTRLWarning) as record:
        check_trl_version(version)
    (message,) = [str(w.message) for w in record]
    assert f"tested with trl<1.17,>=1.16.0 but trl {version} is installed" in message
    assert "Every internal it checks without training is still there" in message  # the installed TRL is 1.16
    assert f"make check-trl TRL={version}" in message and 'pip install "trl<1.17,>=1.16.0"' in message


def test_tested_versions_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trl_version("1.16.0")
        check_trl_version("1.16.3")
    assert trl_version_problem("1.16.3") is None


def test_the_range_has_one_source_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (trl,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "trl"]
    assert supported_trl() == trl.specifier == SpecifierSet(">=1.16.0,<1.17")
    # constraints.txt pins the exact TRL CI tests on, inside that range; no other file restates the range
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert Version(pins["trl"]) in supported_trl()
    assert "1.17" not in inspect.getsource(_trl_compat)


def test_changed_seams_are_named(monkeypatch):
    # a TRL release that renamed one seam and reshaped another: the report (and the import warning) name exactly those
    from trl import GRPOTrainer

    monkeypatch.delattr(GRPOTrainer, "_generate_and_score_completions")
    monkeypatch.setattr(GRPOTrainer, "_generate", lambda self, batch, mode: None)
    monkeypatch.setattr(GRPOTrainer, "_paper", {"title": "x"})
    assert missing_internals() == [
        "GRPOTrainer._generate_and_score_completions is missing",
        "GRPOTrainer._generate('self', 'batch', 'mode') no longer starts with ('self', 'prompts')",
        "GRPOTrainer._paper has keys ['title'], not ['title', 'id', 'citation']",
    ]
    message = trl_version_problem("1.17.0")
    assert "These internals it relies on changed: GRPOTrainer._generate_and_score_completions is missing; " in message
    assert "GRPOTrainer._generate('self', 'batch', 'mode') no longer starts with" in message


def test_trainer_attributes_and_generation_output_keys(tmp_path):
    args = cpu_args(GVPOConfig, tmp_path, max_steps=1, steps_per_generation=2)
    trainer = GVPOTrainer(
        model=tiny_model_path(), reward_funcs=repeat_letter_reward, args=args, train_dataset=build_dataset(16)
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the HF training loop; read by our loss
    for name in GRPO_ATTRIBUTES:
        assert hasattr(trainer, name), name
    inner = trainer._get_train_sampler().sampler  # TRL's RepeatSampler, reseeded per epoch by EpochSeededSampler
    assert inner.shuffle is True and inner.seed == 0 and isinstance(inner.generator, torch.Generator)
    batch = next(iter(trainer.get_train_dataloader()))
    out = trainer._generate_and_score_completions(batch)
    for key in GRPO_OUTPUT_KEYS:
        assert isinstance(out[key], torch.Tensor), key
    assert set(out) - {"rewards", "group_id"} <= set(GRPO_OUTPUT_KEYS) | set(GRPO_OPTIONAL_OUTPUT_KEYS)
    # TRL's reward gathering returns one row per completion of all processes (here one process)
    assert trainer._rewards_per_func.shape == (len(batch), 1)


def test_loss_seam_forwards_every_input_trls_loss_forwards():
    # every batch key TRL's own _compute_loss reads is either forwarded by ours (multimodal inputs) or read by the
    # algorithms' losses; a TRL upgrade that forwards a new key (a new vision model) fails here
    import inspect
    import re

    from trl import GRPOTrainer

    from gvpo_trl._trl_compat import MULTIMODAL_FORWARD_KEYS

    source = inspect.getsource(GRPOTrainer._compute_loss)
    read = set(re.findall(r'inputs\.get\("(\w+)"\)', source)) | set(re.findall(r'inputs\["(\w+)"\]', source))
    ours = set(MULTIMODAL_FORWARD_KEYS) | set(GRPO_OUTPUT_KEYS) | set(GRPO_OPTIONAL_OUTPUT_KEYS)
    assert read - ours == set()
    assert set(MULTIMODAL_FORWARD_KEYS) <= read
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert set(MULTIMODAL_FORWARD_KEYS) | {"compute_aux_loss"} <= set(params)


def test_loss_fields_refused_at_trls_defaults():
    from gvpo_trl._trl_compat import GRPO_LOSS_FIELDS, grpo_default

    defaults = {name: grpo_default(name) for name in GRPO_LOSS_FIELDS}
    assert defaults == {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": None, "delta": None,
                        "importance_sampling_level": "token"}  # fmt: skip


def test_trl_splits_images_per_row_as_we_rely_on():
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

    batch = {"num_images": [1, 2], "pixel_values": torch.arange(12.0).reshape(6, 2),
             "image_grid_thw": torch.tensor([[1, 1, 2], [1, 1, 1], [1, 1, 3]])}  # fmt: skip
    split = split_pixel_values_by_grid(batch)
    assert [p.size(0) for p in split["pixel_values"]] == [2, 4] and len(split["image_grid_thw"]) == 2
    merged = unsplit_pixel_values_by_grid(split)
    assert torch.equal(merged["pixel_values"], batch["pixel_values"])
    assert torch.equal(merged["image_grid_thw"], batch["image_grid_thw"])


def test_trls_per_row_state_is_assigned_per_batch_and_read_by_row():
    # the mixed buffer narrows these lists to the rows it generates or scores (gvpo_trl.buffer.row_state): TRL must
    # build them per generation batch and index them by row position in the tool loop / reward call
    import inspect

    from trl import GRPOTrainer

    from gvpo_trl._trl_compat import GRPO_ROW_STATE

    built = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    methods = ("_generate", "_tool_call_loop", "_calculate_rewards", "_tokenize_prompts")
    readers = "".join(inspect.getsource(getattr(GRPOTrainer, name)) for name in methods)
    for name in GRPO_ROW_STATE:
        assert f"self.{name} = [" in built or f"self.{name} = []" in built, name
        assert f"self.{name}" in readers, name
