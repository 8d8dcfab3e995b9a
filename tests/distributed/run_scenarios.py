"""Launched by ``tests/test_distributed.py`` (``accelerate launch ... run_scenarios.py SPEC.json OUT_DIR``, or plain
``python`` for 1-process reference runs): trains each run of the spec in turn, in the same processes, and writes what
it saw for the pytest side to judge. Nothing here asserts the algorithm is right; it only records.

Per run ``NAME`` it writes, under ``OUT_DIR/NAME/``:

- ``rank{p}.json`` from every process: the world it really got (``num_processes``, ``process_index``, distributed
  type, ZeRO stage, how many parameters are really partitioned), and one record per training micro-step with the
  local rows' group ids, prompts and completions (read from the inputs of ``_compute_loss``, before the real loss).
- ``result.json`` from the main process: ``trainer.state.log_history``, the trainer class, and tensors recorded for
  the first micro-steps (token ids, masks, the reference/rollout log-probs) when ``record_tensors`` is set.
- ``final.safetensors``: the full trained weights (gathered from every rank under ZeRO-3) as float32;
  ``probe.safetensors``: the trained model's logits on fixed probe sequences.
- ``adapter/`` (LoRA runs): ``trainer.save_model`` output.
- ``refused.txt`` instead, when the trainer's config class rejects the run's settings (the other runs go on).

Finally every process writes ``OUT_DIR/done.rank{p}`` so that a run is judged complete only when all ranks got
through all runs (the launcher's exit code alone is not trusted: see ``harness.py``).

The deterministic rollout (``"rollout": "deterministic"``) is TRL's real ``rollout_func`` hook: the completion of a
row depends only on its prompt and on its member index in its group (its position in the global generation batch
modulo k), so any process layout sees exactly the same global batch. Process ``p`` holds rows
``[p * n, (p + 1) * n)`` of the global generation batch (accelerate dispatches consecutive sampler batches to
consecutive ranks), which is what ``GroupTrainer`` itself relies on.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental" in TRL 1.16


def unique_prompt_dataset(num_prompts: int, seed: int = 0):
    """Prompts ``"xyz:"`` (first letter to repeat + 2 distractors), all distinct, so a prompt names its group."""
    from datasets import Dataset

    from gvpo_trl.demo.toy import LETTERS

    prompts = ["".join(c) + ":" for c in itertools.product(LETTERS, repeat=3)]
    random.Random(seed).shuffle(prompts)
    if num_prompts > len(prompts):
        raise ValueError(f"at most {len(prompts)} distinct prompts")
    return Dataset.from_dict({"prompt": prompts[:num_prompts]})


def member_completion(prompt: str, member: int) -> str:
    """The deterministic completion of group member ``member``: its reward grows with the member index, its length
    varies (padding differs between rows), and it uses the prompt's letters."""
    return prompt[0] * (member + 1) + prompt[1] * (member % 3) + prompt[2]


def deterministic_rollout(prompts: list[str], trainer) -> dict:
    """TRL ``rollout_func``: completion = f(prompt, member index in the group); independent of the process layout."""
    tok = trainer.processing_class
    k = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
    start = trainer.accelerator.process_index * len(prompts)
    prompt_ids, completion_ids = [], []
    for i, prompt in enumerate(prompts):
        member = (start + i) % k
        prompt_ids.append(tok(prompt, add_special_tokens=False)["input_ids"])
        completion_ids.append(
            tok(member_completion(prompt, member), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        )
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def probe_ids(tokenizer) -> torch.Tensor:
    """Fixed sequences (same length, no padding) on which trained outputs are compared after reloading."""
    texts = ["abc:aaaab", "hde:hhhhh", "cab:ccbca", "gfa:ggaaf"]
    return torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])


# --- test-probe subclasses (record inputs, then run the real loss) ----------------------------------------------------


def recording_class(base, record_tensors: int, mutant: str | None):
    """A subclass of the trainer under test that records each training micro-step's inputs before calling the real
    ``_compute_loss``. ``mutant`` (negative controls only, GVPO only) swaps in a deliberately wrong loss."""

    class Recording(base):
        def _compute_loss(self, model, inputs):
            if self.model.training:
                tok = self.processing_class
                prompts = tok.batch_decode(
                    [ids[m.bool()] for ids, m in zip(inputs["prompt_ids"], inputs["prompt_mask"], strict=False)]
                )
                completions = tok.batch_decode(
                    [
                        ids[m.bool()]
                        for ids, m in zip(inputs["completion_ids"], inputs["completion_mask"], strict=False)
                    ],
                    skip_special_tokens=True,
                )
                self.micro_steps.append(
                    {
                        "micro_step": len(self.micro_steps),
                        "trl_step": int(self._step),
                        "global_step": int(self.state.global_step),
                        "group_id": inputs["group_id"].tolist(),
                        "prompt": prompts,
                        "completion": completions,
                        "advantages": inputs["advantages"].tolist(),
                        "has_old_logps": inputs.get("old_per_token_logps") is not None,
                        "has_ref_logps": inputs.get("ref_per_token_logps") is not None,
                    }
                )
                if len(self.tensors) < record_tensors:
                    keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
                    keep += ("old_per_token_logps", "ref_per_token_logps")
                    self.tensors.append(
                        {key: inputs[key].detach().cpu().clone() for key in keep if inputs.get(key) is not None}
                    )
            return super()._compute_loss(model, inputs)

    if mutant == "no_world_factor":
        # forgets the × num_processes factor: each process's share of the micro-step's groups is divided as if whole

        def group_loss(self, inputs, per_token_logps, mask):
            loss, metrics = base.group_loss(self, inputs, per_token_logps, mask)
            return loss / self.accelerator.num_processes, metrics

        Recording.group_loss = group_loss
    elif mutant == "local_group_mean":
        # GVPO with Δ̄ (the group mean of the log-ratio) taken over this process's rows only, everything else right

        def group_loss(self, inputs, per_token_logps, mask):
            from gvpo_trl.groups import group_mean, group_sizes, sequence_sum
            from gvpo_trl.gvpo import gvpo_loss

            seq = sequence_sum(per_token_logps, mask)
            old = inputs.get("old_per_token_logps")
            ref = seq.detach() if old is None else sequence_sum(old.float(), mask)
            delta = (seq - ref).detach()
            all_ids, num_groups = self.micro_step_groups(inputs["group_id"], self.group_size)
            sizes = group_sizes(all_ids)[self._local_slice(delta.numel())]
            local_mean = group_mean(delta, inputs["group_id"])
            beta, share = self.args.gvpo_beta, num_groups / self.accelerator.num_processes
            return gvpo_loss(seq, ref, inputs["advantages"], local_mean, sizes, beta, share), {}

        Recording.group_loss = group_loss
    elif mutant is not None:
        raise ValueError(f"unknown mutant {mutant!r}")
    Recording.__name__ = Recording.__qualname__ = f"Recording{base.__name__}"
    return Recording


# --- one run --------------------------------------------------------------------------------------------------------


def full_state_dict(trainer) -> dict[str, torch.Tensor]:
    """All weights, gathered (ZeRO-3) and unwrapped; every process must call this."""
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return {k: v.detach().float().cpu().clone() for k, v in (state or {}).items()}


def zero3_partition_counts(model) -> tuple[int, int]:
    """(parameters whose full data this rank does NOT hold, all parameters): under ZeRO-3 a partitioned parameter
    keeps only its shard (``ds_tensor``) and an empty ``data`` outside forward/backward, while one kept whole
    (below ``stage3_param_persistence_threshold``) keeps its full data. (0, n) without ZeRO-3."""
    params = list(model.parameters())
    partitioned = sum(
        1 for p in params if hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel and p.data.numel() == 0
    )
    return partitioned, len(params)


def run_one(spec: dict, model_path: str, out_dir: Path) -> None:
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    import gvpo_trl

    name = spec["name"]
    run_dir = out_dir / name
    config_cls, trainer_cls = gvpo_trl.TRAINERS[spec["algorithm"]]
    kwargs = dict(
        output_dir=str(run_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=42,
        max_completion_length=8,
        temperature=1.0,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    kwargs.update(spec.get("config", {}))
    try:
        args = config_cls(**kwargs)
    except ValueError as error:  # the same on every rank: recorded, and the other runs go on
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "refused.txt").write_text(f"{config_cls.__name__} refuses {spec.get('config')}: {error}")
        return

    peft_config = None
    if spec.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **spec["peft"])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cls = recording_class(trainer_cls, spec.get("record_tensors", 0), spec.get("mutant"))
    extra = {"rollout_func": deterministic_rollout} if spec.get("rollout") == "deterministic" else {}
    from gvpo_trl.demo.toy import repeat_letter_reward

    trainer = cls(
        model=model_path,
        reward_funcs=repeat_letter_reward,
        args=args,
        train_dataset=unique_prompt_dataset(spec.get("num_prompts", 256)),
        processing_class=tokenizer,
        peft_config=peft_config,
        **extra,
    )
    trainer.micro_steps, trainer.tensors = [], []
    acc = trainer.accelerator
    # the world this process really got (a launch trap can silently give 1 process, or 2 that both think rank 0)
    indices = gather_object([acc.process_index])

    start = time.time()
    trainer.train()
    seconds = time.time() - start
    final = full_state_dict(trainer) if spec.get("save_weights", True) else {}
    partitioned, num_params = zero3_partition_counts(trainer.model)

    probe = None
    if spec.get("probe"):
        trainer.model.eval()
        with torch.no_grad():
            probe = trainer.model(input_ids=probe_ids(tokenizer).to(acc.device)).logits.float().cpu()
    if spec.get("peft"):
        trainer.save_model(str(run_dir / "adapter"))

    ds_plugin = getattr(acc.state, "deepspeed_plugin", None)
    world = {
        "process_index": acc.process_index,
        "num_processes": acc.num_processes,
        "gathered_process_indices": indices,
        "distributed_type": str(acc.distributed_type),
        "zero_stage": ds_plugin.zero_stage if ds_plugin is not None else None,
        "zero3_partitioned_params": partitioned,
        "num_params": num_params,
        "trainer_class": type(trainer).__mro__[1].__name__,
        "args": {
            key: getattr(trainer.args, key)
            for key in (
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "steps_per_generation",
                "num_iterations",
                "num_generations",
                "shuffle_dataset",
                "max_steps",
            )
        },
        "train_seconds": seconds,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"rank{acc.process_index}.json").write_text(json.dumps({**world, "micro_steps": trainer.micro_steps}))
    if acc.is_main_process:
        if final:
            save_file(final, str(run_dir / "final.safetensors"))
        if probe is not None:
            save_file({"input_ids": probe_ids(tokenizer), "logits": probe}, str(run_dir / "probe.safetensors"))
        tensors = {
            f"{i}.{key}": value.contiguous() for i, rec in enumerate(trainer.tensors) for key, value in rec.items()
        }
        if tensors:
            save_file(tensors, str(run_dir / "tensors.safetensors"))
        (run_dir / "result.json").write_text(
            json.dumps({**world, "log_history": trainer.state.log_history, "spec": spec}, default=str)
        )
    acc.wait_for_everyone()
    del trainer


def main() -> None:
    spec_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(1)
    rank = None
    for run in spec["runs"]:
        run_one(run, spec["model"], out_dir)
    from accelerate import PartialState

    rank = PartialState().process_index
    (out_dir / f"done.rank{rank}").write_text("ok")


if __name__ == "__main__":
    main()
