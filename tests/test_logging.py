"""Metrics reach the trackers users look at: a run with ``report_to="tensorboard"`` writes every ``gvpo/*``, ``gpg/*``,
``gspo/*``, ``buffer/*`` and ``groups/*`` metric, read back from the event files."""

from __future__ import annotations

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gvpo_trl.demo.toy import build_dataset

from .helpers import make_trainer

OURS = ("gvpo/", "gpg/", "gspo/", "buffer/", "groups/")
EXPECTED = {  # a few names each run must log, besides whatever else it logs under OURS
    "gvpo": {"gvpo/loss", "gvpo/mse", "gvpo/delta_std"},
    "gpg": {"gpg/loss", "gpg/alpha", "gpg/valid_fraction"},
    "gspo": {"gspo/loss", "gspo/ratio_mean", "gspo/clip_ratio/region"},
}
COMMON = {"buffer/historical_share", "buffer/generated_tokens", "groups/zero_variance_frac", "groups/unscorable_frac"}


@pytest.mark.parametrize("algorithm", ["gvpo", "gpg", "gspo"])
def test_tensorboard_receives_every_metric(tmp_path, algorithm):
    # 8 prompts = one generation batch, so every prompt recurs and the mixed buffer has history to give
    trainer = make_trainer(algorithm, tmp_path, dataset=build_dataset(8), max_steps=8, logging_steps=2,
                           report_to=["tensorboard"], buffer_history_per_group=1, buffer_max_staleness=8)  # fmt: skip
    trainer.train()
    logged = {}  # (tag, step) -> value, as the HF Trainer handed them to its callbacks
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key.startswith(OURS):
                logged[(f"train/{key}", entry["step"])] = value
    assert EXPECTED[algorithm] | COMMON <= {tag.removeprefix("train/") for tag, _ in logged}

    (run_dir,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    written = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    missing = sorted({tag for tag, step in logged if (tag, step) not in written})
    assert not missing, f"logged but not in TensorBoard: {missing}"
    for key, value in logged.items():
        assert math.isclose(written[key], value, rel_tol=1e-6, abs_tol=1e-6), (key, written[key], value)
    shares = [value for (tag, _), value in written.items() if tag == "train/buffer/historical_share"]
    assert max(shares) > 0, shares  # history was used and shows
