"""Launched by ``tests/test_vllm_generation.py`` through ``harness.launch`` (``... vllm_worker.py SPEC.json OUT_DIR``):
training runs (``spec["runs"]``, in turn, in the same processes) of gvpo-trl trainers or TRL's ``GRPOTrainer`` with
``use_vllm=True`` against the tests' vLLM stand-in (``tests/vllm_standin``), colocate or server mode. TRL's vLLM code
runs as written; this script only observes it and records, per run and rank, in ``OUT_DIR/NAME/rank{p}.json``:

- ``syncs``: each ``VLLMGeneration.sync_weights`` call: the optimizer step, the largest |stand-in weight − policy
  weight| right after it (the policy cast to the stand-in's dtype), and how far the policy has moved from its
  initial weights;
- ``generations``: each ``VLLMGeneration.generate`` call: step, number of prompts, ``num_generations``, tokens;
- ``rounds``: each training generation batch: the largest |vLLM sampling log-prob − TRL's recomputed rollout
  log-prob| over completion tokens, the range of TRL's ``importance_sampling_ratio``; with the mixed buffer, which
  rows are historical, the ratio's range on them, and how far TRL's sampling log-probs of those rows are from the
  buffer's behaviour column;
- ``micro_steps``: each loss call: the local group ids, the loss, and (1 process) the loss recomputed without TRL's
  ``importance_sampling_ratio`` (so the test sees whether the trainer applies it);
- ``log_history`` and, when the spec asks, the stand-in's generated-token count (server mode).

Then ``OUT_DIR/done.rank{p}``. Nothing here asserts. A run's ``resume`` (a checkpoint path) resumes from it; a run's
``prompts`` replace the spec's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # helpers.py
sys.path.insert(0, str(TESTS.parent))  # tests.vllm_standin
from tests.vllm_standin import SITE, allow_cpu_weight_transfer  # noqa: E402

sys.path.insert(0, str(SITE))  # `import vllm` finds the stand-in, before TRL is imported
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import cpu_args, tiny_model_path  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gvpo_trl import TRAINERS  # noqa: E402
from gvpo_trl.demo.toy import repeat_letter_reward  # noqa: E402


def trainer_classes(algorithm: str):
    if algorithm == "grpo":
        return GRPOConfig, GRPOTrainer
    return TRAINERS[algorithm]


def policy_params(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in trainer.accelerator.unwrap_model(trainer.model)
            .named_parameters()}  # fmt: skip


def standin_weights(trainer) -> dict[str, torch.Tensor] | None:
    generation = trainer.vllm_generation
    if generation.mode == "colocate":
        return generation.llm.engine.state_dict()
    if not trainer.accelerator.is_main_process:
        return None
    from safetensors.torch import load

    client = generation.vllm_client
    return load(client.session.get(f"{client.base_url}/standin/weights").content)


def instrument(trainer, rec: dict) -> None:
    generation = trainer.vllm_generation
    initial = policy_params(trainer)
    sync, generate = generation.sync_weights, generation.generate

    def recorded_sync():
        sync()
        policy, served = policy_params(trainer), standin_weights(trainer)
        entry = {"step": trainer.state.global_step,
                 "moved": max((policy[n] - initial[n]).abs().max().item() for n in policy)}  # fmt: skip
        if served is not None:
            entry["max_diff"] = max(
                (served[n].float() - policy[n].to(served[n].dtype).float()).abs().max().item() for n in policy
            )
            entry["names_match"] = sorted(served) == sorted(policy)
        rec["syncs"].append(entry)

    def recorded_generate(prompts, images, num_generations, profiler=None):
        out = generate(prompts, images, num_generations, profiler)
        tokens = sum(len(c) for c in out[1])
        rec["generations"].append({"step": trainer.state.global_step, "num_prompts": len(prompts),
                                   "num_generations": num_generations, "tokens": tokens})  # fmt: skip
        return out

    generation.sync_weights, generation.generate = recorded_sync, recorded_generate


def recording(cls):
    class Recording(cls):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                mask = output["completion_mask"].bool()
                entry = {"step": self.state.global_step, "rows": int(mask.size(0))}
                old, sampled = output.get("old_per_token_logps"), output.get("sampling_per_token_logps")
                if old is not None and sampled is not None:  # rows generated now (not reused, not carried over)
                    now = ~output["is_historical"].bool().unsqueeze(1) if "is_historical" in output else True
                    diff = (old - sampled).abs()[mask & torch.isfinite(sampled) & now]
                    entry["logp_max_diff"] = diff.max().item() if diff.numel() else 0.0
                ratio = output.get("importance_sampling_ratio")
                if ratio is not None:
                    entry["is_ratio"] = [ratio.min().item(), ratio.max().item()]
                if "is_historical" in output:
                    hist = output["is_historical"].bool()
                    entry["historical"] = hist.tolist()
                    if hist.any() and ratio is not None:
                        entry["is_ratio_historical"] = [ratio[hist].min().item(), ratio[hist].max().item()]
                    if hist.any() and sampled is not None:  # TRL got the stored behaviour log-probs as vLLM's
                        stored = output["behaviour_per_token_logps"]
                        entry["historical_logp_max_diff"] = (sampled - stored)[hist][mask[hist]].abs().max().item()
                self.rec["rounds"].append(entry)
            return output

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            entry = {"step": self.state.global_step, "loss": loss.item()}
            solo = self.accelerator.num_processes == 1  # a rank-local decision must not add collectives
            if "group_id" in inputs:
                entry["group_ids"] = inputs["group_id"].tolist()
            if "importance_sampling_ratio" in inputs and "group_id" in inputs and self.model.training and solo:
                metrics = {k: list(v) for k, v in self._metrics["train"].items()}
                with torch.no_grad():
                    plain = {k: v for k, v in inputs.items() if k != "importance_sampling_ratio"}
                    entry["loss_without_is"] = super()._compute_loss(model, plain).item()
                self._metrics["train"].clear()
                self._metrics["train"].update(metrics)  # the second call must not log twice
            self.rec["micro_steps"].append(entry)
            return loss

    return Recording


def train(run: dict, prompts: list[str], out_dir: Path) -> None:
    config_cls, trainer_cls = trainer_classes(run["algorithm"])
    vllm = {"use_vllm": True, "vllm_mode": run["mode"]}
    if run["mode"] == "server":
        vllm.update(vllm_server_base_url=run["server_url"], vllm_group_port=run["group_port"],
                    vllm_server_timeout=60)  # fmt: skip
    args = cpu_args(config_cls, out_dir, **vllm, **run["args"])
    trainer = recording(trainer_cls)(
        model=tiny_model_path(),
        reward_funcs=repeat_letter_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    trainer.rec = {"syncs": [], "generations": [], "rounds": [], "micro_steps": []}
    instrument(trainer, trainer.rec)
    trainer.train(resume_from_checkpoint=run.get("resume"))
    record = {"world": trainer.accelerator.num_processes, **trainer.rec, "log_history": trainer.state.log_history}
    if hasattr(trainer, "buffer_stats"):
        record["buffer_stats"] = trainer.buffer_stats
    if run["mode"] == "server" and trainer.accelerator.is_main_process:
        client = trainer.vllm_generation.vllm_client
        record["server_stats"] = client.session.get(f"{client.base_url}/standin/stats").json()
    (out_dir / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(record))


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    allow_cpu_weight_transfer()  # server mode only uses it
    for run in spec["runs"]:
        path = Path(out_dir) / run["name"]
        path.mkdir(parents=True, exist_ok=True)
        train(run, run.get("prompts", spec["prompts"]), path)
    rank = int(os.environ.get("RANK", "0"))
    (Path(out_dir) / f"done.rank{rank}").write_text("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
