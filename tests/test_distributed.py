"""Multi-process training on CPU: 2 processes over gloo (DDP), DeepSpeed ZeRO-2 and ZeRO-3, and LoRA, for every
trainer in ``gvpo_trl.TRAINERS``. Each layout is one real ``accelerate launch --config_file accelerate_configs/...
--num_processes 2`` of ``tests/distributed/run_scenarios.py`` (the 1-process reference is plain ``python``); the
launched processes train, record, and write JSON/safetensors; the tests here judge only what was written.

What is proven:

- The world is real: every launched run reports ``accelerator.num_processes == 2``, two distinct process indices
  (gathered across ranks), the distributed type and ZeRO stage of the config it was launched with, and under ZeRO-3
  that every parameter really is partitioned (``stage3_param_persistence_threshold: 0``). A launch that silently
  starts one process, or two that both believe they are rank 0, fails here.
- Group integrity (real generation, TRL's shuffling on, ``steps_per_generation`` > ``gradient_accumulation_steps``
  > 1): in every micro-step, gathered over both processes, every group (identified by its prompt, unique within a
  generation batch, independently of the ``group_id`` column under test) has all k rows, one ``group_id``, and it
  occurs in exactly one micro-step of each pass over its generation batch; every group of the batch is used. Also
  with ``steps_per_generation=1`` and ``per_device_train_batch_size`` < k, where each group spans both processes.
- Loss equality: on the same global batch (TRL's real ``rollout_func`` hook with a deterministic rollout: the
  completion depends only on the prompt and the member's index in its group), the 2-process logged losses (HF's
  ``loss`` and the trainer's ``<algo>/loss``) equal the 1-process run with ``per_device_train_batch_size`` doubled,
  at every step, to ``1e-5·|loss| + 1e-7``; the final weights agree to ``1e-6 + 1e-5·max|update|``. Float32
  reductions in a different order (gathers, all-reduce, padding to a different batch maximum) move a sum of a few
  hundred O(1) terms by a few ulp: observed ≤ 5e-7 relative, and ≤ 1e-8 absolute where a loss cancels to ~0 (GSPO
  on-policy: a mean of advantages), hence the absolute floor of about 1 ulp at 1. The comparison is not trivial:
  ``num_iterations=2`` makes the second pass over each rollout batch off-policy (Δ = log π_θ − log π_old ≠ 0,
  checked), and plain SGD without clipping makes the weights a direct image of the summed gradients (Adam's
  per-coordinate normalisation would hide a constant factor). Two layouts are compared: groups whole within a
  process, several per micro-step, with gradient accumulation over TRL-shuffled micro-steps; and groups that span
  the processes. Negative controls (GVPO)
  show the check has teeth: a loss that forgets the ×num_processes factor, or that takes the group mean of Δ per
  process, is run for real under DDP and fails the same comparison by orders of magnitude.
- Every trainer matches its 1-process run under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (parameters partitioned).
- LoRA (``peft_config=LoraConfig``) under 1 process, DDP and ZeRO-3: base weights stay bit-identical to the toy
  checkpoint, the adapter changes; the adapter saved by ``trainer.save_model`` loads with
  ``PeftModel.from_pretrained`` on a freshly loaded base and reproduces the trained model's logits; the multi-process
  LoRA runs equal the 1-process one; and for GVPO with ``gvpo_reference='initial'`` the reference log-probs TRL fed
  the loss equal those of an independently loaded base model (while the policy's own rollout log-probs differ from
  them, so the check can fail).
- DeepSpeed's C++ op is built once per session in a shared cache (``torch_extensions_dir`` in conftest.py), and no
  launched DeepSpeed process rebuilds it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import gvpo_trl
from tests.distributed.harness import CONFIG_DIR, KNOWN_EXIT_SIGNATURE, REPO, launch
from tests.distributed.run_scenarios import member_completion

TRAINER_NAMES = sorted(gvpo_trl.TRAINERS)

# --- run specifications ----------------------------------------------------------------------------------------------

K = 4  # group size
LOSS_RTOL = 1e-5
LOSS_ATOL = 1e-7  # ~1 float32 ulp of an O(1) term: losses that cancel to ~0 (GSPO on-policy) are compared absolutely
WEIGHT_ATOL = 1e-6
WEIGHT_RTOL_OF_UPDATE = 1e-5

#: the layouts, each one launch: config file (None: plain python), processes, and what the run must report
LAYOUTS = {
    "1proc": dict(config_file=None, num_processes=1, distributed_type="NO", zero_stage=None),
    "ddp": dict(config_file="cpu_ddp_2proc.yaml", num_processes=2, distributed_type="MULTI_CPU", zero_stage=None),
    "zero2": dict(config_file="cpu_zero2_2proc.yaml", num_processes=2, distributed_type="DEEPSPEED", zero_stage=2),
    "zero3": dict(config_file="cpu_zero3_2proc.yaml", num_processes=2, distributed_type="DEEPSPEED", zero_stage=3),
}
EQUALITY_CASES = ("whole_groups", "spanning_groups")
MUTANTS = ("no_world_factor", "local_group_mean")


def equality_config(case: str, num_processes: int) -> dict:
    """The same global batch for 1 or 2 processes (the per-device batch doubles for 1 process). Off-policy second pass
    (``num_iterations=2``), plain SGD without clipping so that weights reflect the summed gradients exactly."""
    scale = 2 // num_processes
    common = dict(
        num_generations=K,
        num_iterations=2,
        max_steps=4,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        shuffle_dataset=True,
    )
    if case == "whole_groups":  # 2 groups per process per micro-step, accumulation over 2 shuffled micro-steps
        return dict(
            common, per_device_train_batch_size=8 * scale, gradient_accumulation_steps=2, steps_per_generation=2
        )
    if case == "spanning_groups":  # 12 rows = 3 groups: rows 0-5 on rank 0, 6-11 on rank 1, group 1 spans both
        return dict(
            common, per_device_train_batch_size=6 * scale, gradient_accumulation_steps=1, steps_per_generation=1
        )
    raise ValueError(case)


INTEGRITY_CASES = {
    # real generation; TRL shuffles the generation batch; spg > GA > 1; 2 groups per process per micro-step
    "shuffled": dict(
        per_device_train_batch_size=8,
        num_generations=K,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        num_iterations=1,
        max_steps=4,
        shuffle_dataset=True,
        learning_rate=1e-3,
    ),
    # one group per micro-step, half of it on each process
    "spans_processes": dict(
        per_device_train_batch_size=2,
        num_generations=K,
        gradient_accumulation_steps=2,
        steps_per_generation=1,
        num_iterations=1,
        max_steps=3,
        shuffle_dataset=True,
        learning_rate=1e-3,
    ),
}

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def lora_config(trainer: str, num_processes: int) -> dict:
    config = dict(equality_config("spanning_groups", num_processes), learning_rate=1.0)
    if trainer == "gvpo":
        config["gvpo_reference"] = "initial"  # reference log-probs from the adapter-disabled base
    return config


def _gpg_overrides(config: dict) -> dict:
    # GPG's resampling of zero-variance groups (min_valid_fraction > 0, its default) needs whole groups in each
    # process's generation batch; layouts where a group spans the processes must switch it off (GPGConfig says so).
    local_rows = config["per_device_train_batch_size"] * config["steps_per_generation"]
    return {"min_valid_fraction": 0.0} if local_rows % config["num_generations"] else {}


#: Fields a trainer needs, beyond GRPOConfig's, for a layout that its defaults refuse.
TRAINER_OVERRIDES = {"gpg": _gpg_overrides}


def _run(name: str, trainer: str, config: dict, **extra) -> dict:
    config = dict(config, **TRAINER_OVERRIDES.get(trainer, lambda c: {})(config))
    return dict(name=name, algorithm=trainer, config=config, **extra)


def layout_runs(layout: str) -> list[dict]:
    procs = LAYOUTS[layout]["num_processes"]
    runs = []
    for trainer in TRAINER_NAMES:
        if layout == "ddp":
            for case, config in INTEGRITY_CASES.items():
                runs.append(
                    _run(f"{trainer}-integrity-{case}", trainer, config, rollout="generate", save_weights=False)
                )
        for case in EQUALITY_CASES:
            runs.append(_run(f"{trainer}-{case}", trainer, equality_config(case, procs), rollout="deterministic"))
        if layout in ("1proc", "ddp", "zero3"):
            runs.append(
                _run(
                    f"{trainer}-lora",
                    trainer,
                    lora_config(trainer, procs),
                    rollout="deterministic",
                    peft=LORA,
                    probe=True,
                    record_tensors=100,
                )
            )
    if layout == "ddp" and "gvpo" in TRAINER_NAMES:
        for mutant in MUTANTS:
            runs.append(
                _run(
                    f"mutant-{mutant}",
                    "gvpo",
                    equality_config("spanning_groups", procs),
                    rollout="deterministic",
                    mutant=mutant,
                )
            )
    return runs


# --- launches (one per layout, on first use, shared by the tests of this module) ----------------------------------


class Launches:
    def __init__(self, request, work_dir: Path, model_dir: str, make_env):
        self.request, self.work_dir, self.model_dir, self.make_env = request, work_dir, model_dir, make_env
        self.done: dict[str, object] = {}

    def run(self, layout: str, name: str):
        """The result of run ``name`` in ``layout`` (launching the layout on first use). A run whose settings the
        trainer's config class refused (recorded by the launched script, which then went on) fails here."""
        launched = self.get(layout)
        refused = launched.out_dir / name / "refused.txt"
        if refused.exists():
            pytest.fail(f"{layout}/{name}: {refused.read_text()}")
        return launched.run(name)

    def refused(self, layout: str, name: str) -> bool:
        return (self.get(layout).out_dir / name / "refused.txt").exists()

    def get(self, layout: str):
        if layout not in self.done:
            info = LAYOUTS[layout]
            extra = {}
            so_before = None
            if info["distributed_type"] == "DEEPSPEED":
                ext = self.request.getfixturevalue("torch_extensions_dir")
                extra["TORCH_EXTENSIONS_DIR"] = str(ext)
                so_before = _shm_op_files(ext)
            spec = {"model": self.model_dir, "runs": layout_runs(layout)}
            result = launch(
                layout,
                spec,
                self.work_dir / layout,
                info["num_processes"],
                info["config_file"],
                env=self.make_env(extra),
            )
            if so_before is not None:
                assert _shm_op_files(ext) == so_before, "a launched DeepSpeed process rebuilt the shm op"
            self.done[layout] = result
        return self.done[layout]


def _shm_op_files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in Path(root).rglob("*.so")}


@pytest.fixture(scope="module")
def launches(request, tmp_path_factory, toy_model_dir, launch_env):
    return Launches(request, tmp_path_factory.mktemp("distributed"), toy_model_dir, launch_env)


# --- checks ----------------------------------------------------------------------------------------------------------


def assert_world(run, layout: str) -> None:
    """The run really had the layout's world: N processes, distinct ranks, the launched backend."""
    info = LAYOUTS[layout]
    n = info["num_processes"]
    ranks = run.ranks
    assert len(ranks) == n, f"{run.dir.name}: {len(ranks)} rank files for {n} processes"
    assert sorted(r["process_index"] for r in ranks) == list(range(n)), "process indices not distinct"
    for r in ranks:
        assert r["num_processes"] == n, f"rank {r['process_index']} saw {r['num_processes']} processes, expected {n}"
        assert r["gathered_process_indices"] == list(range(n))
        assert r["distributed_type"].endswith(info["distributed_type"]), r["distributed_type"]
        assert r["zero_stage"] == info["zero_stage"]
        if info["zero_stage"] == 3:
            assert r["zero3_partitioned_params"] > 0, "ZeRO-3 left every parameter whole"
    if info["zero_stage"] == 3 and not run.result["spec"].get("peft"):
        assert all(r["zero3_partitioned_params"] == r["num_params"] for r in ranks), "some parameters not partitioned"


def assert_whole_groups(run, deterministic: bool) -> None:
    """Every group whole (k rows) within one micro-step across processes, never in two micro-steps of a pass."""
    ranks = sorted(run.ranks, key=lambda r: r["process_index"])
    args = ranks[0]["args"]
    k, per_device = args["num_generations"], args["per_device_train_batch_size"]
    spg, iterations = args["steps_per_generation"], args["num_iterations"]
    counts = {len(r["micro_steps"]) for r in ranks}
    assert len(counts) == 1 and counts.pop() == args["max_steps"] * args["gradient_accumulation_steps"]
    seen: dict[tuple, int] = {}
    group_id_of: dict[tuple, int] = {}
    groups_per_pass: dict[tuple, set] = defaultdict(set)
    spanning = 0
    for m in range(len(ranks[0]["micro_steps"])):
        generation, pass_ = m // (spg * iterations), (m % (spg * iterations)) // spg
        members: dict[str, list] = defaultdict(list)
        for r in ranks:
            record = r["micro_steps"][m]
            assert len(record["group_id"]) == per_device
            for gid, prompt, completion in zip(
                record["group_id"], record["prompt"], record["completion"], strict=False
            ):
                members[prompt].append((gid, completion, r["process_index"]))
        for prompt, rows in members.items():
            assert len(rows) == k, f"micro-step {m}: group of prompt {prompt!r} has {len(rows)} rows here, not {k}"
            gids = {gid for gid, _, _ in rows}
            assert len(gids) == 1, f"micro-step {m}: prompt {prompt!r} carries group ids {gids}"
            key = (generation, pass_, prompt)
            assert key not in seen, f"group of {prompt!r} in micro-steps {seen[key]} and {m} of one pass"
            seen[key] = m
            assert group_id_of.setdefault((generation, prompt), gids.pop()) == rows[0][0]
            groups_per_pass[(generation, pass_)].add(prompt)
            spanning += len({p for _, _, p in rows}) > 1
            if deterministic:
                assert sorted(c for _, c, _ in rows) == sorted(member_completion(prompt, j) for j in range(k))
        assert len({rows[0][0] for rows in members.values()}) == len(members), f"micro-step {m}: group ids shared"
    rows_per_generation = spg * per_device * len(ranks)
    for (generation, pass_), prompts in groups_per_pass.items():
        assert len(prompts) * k == rows_per_generation, f"generation {generation} pass {pass_}: groups lost"
    run.spanning_groups = spanning


def _losses(run) -> list[dict[str, float]]:
    out = []
    for entry in run.step_logs:
        out.append({key: value for key, value in entry.items() if key == "loss" or key.endswith("/loss")})
    return out


def training_deviation(run, reference, initial: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """How far ``run`` is from ``reference``, each in units of its tolerance (<= 1 passes): the worst logged loss over
    steps and loss keys, and the worst weight; plus the size of the reference's weight update (max |Δw|)."""
    a, b = _losses(run), _losses(reference)
    assert len(a) == len(b) == run.result["spec"]["config"]["max_steps"], (len(a), len(b))
    loss_dev = 0.0
    for step_a, step_b in zip(a, b, strict=False):
        assert set(step_a) == set(step_b) and "loss" in step_a
        for key in step_a:
            x, y = step_a[key], step_b[key]
            loss_dev = max(loss_dev, abs(x - y) / (LOSS_RTOL * max(abs(x), abs(y)) + LOSS_ATOL))
    wa, wb = run.weights(), reference.weights()
    assert set(wa) == set(wb)
    if any("lora_" in key for key in wb):  # the adapter moves from lora_B = 0; base weights are checked separately
        update = max(wb[key].abs().max().item() for key in wb if "lora_B" in key)
    else:
        update = max((wb[key] - initial[_base_key(key, initial)]).abs().max().item() for key in wb)
    weight_dev = max((wa[key] - wb[key]).abs().max().item() for key in wa)
    return loss_dev, weight_dev / (WEIGHT_ATOL + WEIGHT_RTOL_OF_UPDATE * update), update


def assert_same_training(run, reference, initial) -> None:
    loss_dev, weight_dev, update = training_deviation(run, reference, initial)
    assert update > 1e-3, f"the reference run barely moved its weights ({update:.2e}): the comparison is trivial"
    assert loss_dev <= 1, f"{run.dir.name}: logged loss off by {loss_dev:.1f}× its tolerance from 1 process"
    assert weight_dev <= 1, f"{run.dir.name}: weights off by {weight_dev:.1f}× their tolerance from 1 process"


def assert_off_policy(run) -> None:
    """The second pass over each rollout batch saw a changed policy: TRL computed rollout log-probs (π_old), and for
    GVPO the logged spread of Δ = log π_θ − log π_old is clearly non-zero."""
    assert any(rec["has_old_logps"] for rec in run.ranks[0]["micro_steps"])
    stds = [entry[key] for entry in run.step_logs for key in entry if key.endswith("delta_std")]
    if stds:
        assert max(stds) > 1e-2, f"Δ stayed ~0 ({max(stds):.2e}): the loss comparison would not involve the policy"


def _base_key(key: str, reference: dict) -> str:
    """Name in the toy checkpoint of a (possibly PEFT-wrapped) parameter; lm_head is tied to the embeddings."""
    key = key.replace("base_model.model.", "", 1).replace(".base_layer", "")
    if key not in reference and key == "lm_head.weight":
        return "model.embed_tokens.weight"
    return key


@pytest.fixture(scope="module")
def toy_weights(toy_model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(toy_model_dir) / "model.safetensors"))


# --- tests ------------------------------------------------------------------------------------------------------------


def test_accelerate_configs_are_valid():
    """Every accelerate config loads with accelerate's own loader; DeepSpeed ones point at a JSON that exists, parses,
    has the stage of its name, and that DeepSpeedPlugin accepts; ZeRO-3 ones gather 16-bit weights on save; the CPU
    ZeRO-3 one partitions everything (persistence threshold 0). (They are launched for real by the tests below, the
    GPU ones as far as a CPU allows: see docs/scaling.md.)"""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    expected = {
        "single_gpu.yaml": ("NO", 1),
        "multi_gpu.yaml": ("MULTI_GPU", 8),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 8),
        "deepspeed_zero3.yaml": ("DEEPSPEED", 8),
        "cpu_ddp_2proc.yaml": ("MULTI_GPU", 2),
        "cpu_zero2_2proc.yaml": ("DEEPSPEED", 2),
        "cpu_zero3_2proc.yaml": ("DEEPSPEED", 2),
        "multi_node_zero3.yaml": ("DEEPSPEED", 16),  # 2 nodes × 8 (tests/test_multi_node.py)
        "cpu_multi_node_2x1.yaml": ("DEEPSPEED", 2),  # its CPU twin: 2 nodes × 1 on 127.0.0.1
    }
    found = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert found == sorted(expected), found
    for name, (dist, procs) in expected.items():
        config = load_config_from_file(str(CONFIG_DIR / name))
        assert str(config.distributed_type).endswith(dist) and config.num_processes == procs, name
        if dist != "DEEPSPEED":
            continue
        path = REPO / config.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(path.read_text())
        stage = 3 if "zero3" in path.name else 2
        assert ds["zero_optimization"]["stage"] == stage, name
        if stage == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
            assert config.deepspeed_config.get("zero3_init_flag") is True
        if name.startswith("cpu_zero3"):
            assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
        plugin = DeepSpeedPlugin(hf_ds_config=str(path))
        assert plugin.zero_stage == stage


@pytest.mark.parametrize(
    "behaviour, attempts, accepted",
    [
        ("ok", 1, True),  # complete, exit 0
        ("abort_after_results", 1, True),  # the known exit-time abort after all results: judged by the results
        ("abort_before_results", 2, False),  # the known abort without results: retried once, then a failure
        ("other_failure", 1, False),  # any other failure: no retry
        ("exit0_without_results", 1, False),  # exit 0 is not trusted either
    ],
)
def test_launch_is_judged_by_what_it_wrote(tmp_path, behaviour, attempts, accepted):
    """The harness's verdict (with a stand-in script, no training): results decide, and only the known rank-1 exit
    signature is forgiven or retried."""
    script = tmp_path / "fake.py"
    script.write_text(
        "import json, sys, pathlib\n"
        "spec, out = json.loads(pathlib.Path(sys.argv[1]).read_text()), pathlib.Path(sys.argv[2])\n"
        "b = spec['behaviour']\n"
        "if b in ('ok', 'abort_after_results'):\n"
        "    (out / 'done.rank0').write_text('ok')\n"
        f"if b.startswith('abort'):\n    print({KNOWN_EXIT_SIGNATURE!r}); sys.exit(134)\n"
        "if b == 'other_failure':\n    sys.exit(1)\n"
    )
    if accepted:
        result = launch("fake", {"behaviour": behaviour}, tmp_path / "work", 1, script=script)
        assert result.attempts == attempts
    else:
        with pytest.raises(AssertionError, match="launch failed"):
            launch("fake", {"behaviour": behaviour}, tmp_path / "work", 1, script=script)
        assert len(list((tmp_path / "work").glob("log*.txt"))) == attempts


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_launch_gives_the_requested_world(launches, layout):
    launches.get(layout)
    for run in layout_runs(layout):
        if not launches.refused(layout, run["name"]):  # refused runs fail in their own tests
            assert_world(launches.run(layout, run["name"]), layout)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(INTEGRITY_CASES))
@pytest.mark.parametrize("trainer", TRAINER_NAMES)
def test_groups_stay_whole_under_shuffling(launches, trainer, case):
    run = launches.run("ddp", f"{trainer}-integrity-{case}")
    assert_world(run, "ddp")
    assert_whole_groups(run, deterministic=False)
    if case == "spans_processes":
        assert run.spanning_groups == len(run.ranks[0]["micro_steps"]), "every group should span both processes"


@pytest.mark.distributed
@pytest.mark.parametrize("case", EQUALITY_CASES)
@pytest.mark.parametrize("layout", ["ddp", "zero2", "zero3"])
@pytest.mark.parametrize("trainer", TRAINER_NAMES)
def test_loss_equals_one_process(launches, toy_weights, trainer, layout, case):
    run = launches.run(layout, f"{trainer}-{case}")
    reference = launches.run("1proc", f"{trainer}-{case}")
    assert_world(run, layout)
    assert_world(reference, "1proc")
    assert_whole_groups(run, deterministic=True)
    assert_whole_groups(reference, deterministic=True)
    if case == "spanning_groups":
        assert run.spanning_groups > 0
    assert_off_policy(reference)
    assert_same_training(run, reference, toy_weights)


@pytest.mark.distributed
@pytest.mark.parametrize("mutant", MUTANTS)
def test_wrong_implementations_fail_the_equality_check(launches, toy_weights, mutant):
    """Negative controls: the same comparison as test_loss_equals_one_process rejects a real DDP run of a GVPO loss that
    forgets the ×num_processes factor, or that takes the group mean of Δ over one process's rows."""
    if "gvpo" not in TRAINER_NAMES:
        pytest.skip("the negative controls are GVPO losses")
    run = launches.run("ddp", f"mutant-{mutant}")
    reference = launches.run("1proc", "gvpo-spanning_groups")
    assert_world(run, "ddp")
    loss_dev, weight_dev, _ = training_deviation(run, reference, toy_weights)
    assert loss_dev > 100, f"{mutant}: logged loss only {loss_dev:.1f}× the tolerance off: it could slip through"
    assert weight_dev > 100, f"{mutant}: weights only {weight_dev:.1f}× the tolerance off: they could slip through"


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["1proc", "ddp", "zero3"])
@pytest.mark.parametrize("trainer", TRAINER_NAMES)
def test_lora(launches, toy_weights, toy_model_dir, trainer, layout):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = launches.run(layout, f"{trainer}-lora")
    assert_world(run, layout)
    assert_whole_groups(run, deterministic=True)

    # only the adapter changed
    weights = run.weights()
    adapter = [key for key in weights if "lora_" in key]
    assert adapter, "no LoRA weights in the trained model"
    for key, value in weights.items():
        if "lora_" not in key:
            assert torch.equal(value, toy_weights[_base_key(key, toy_weights)].float()), f"base weight {key} changed"
    assert max(weights[key].abs().max().item() for key in adapter if "lora_B" in key) > 1e-4, "adapter never trained"

    # the saved adapter loads on a fresh base and gives the trained outputs
    probe = run.probe()
    base = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=probe["input_ids"]).logits
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32), str(run.dir / "adapter")
    ).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)
    assert (base_logits - probe["logits"]).abs().max() > 1e-3, "the trained adapter does not change the outputs"

    # GVPO's frozen reference is the adapter-disabled base
    if trainer == "gvpo":
        records = run.tensors()
        assert records and all("ref_per_token_logps" in rec for rec in records)
        policy_moved = 0.0
        for rec in records:
            prompt_ids, completion_ids = rec["prompt_ids"], rec["completion_ids"]
            ids = torch.cat([prompt_ids, completion_ids], dim=1)
            mask = torch.cat([rec["prompt_mask"], rec["completion_mask"]], dim=1)
            with torch.no_grad():
                out = base(input_ids=ids, attention_mask=mask).logits[:, prompt_ids.size(1) - 1 : -1].float()
            base_logps = torch.log_softmax(out, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
            on = rec["completion_mask"].bool()
            torch.testing.assert_close(rec["ref_per_token_logps"][on], base_logps[on], rtol=0, atol=1e-5)
            if "old_per_token_logps" in rec:
                policy_moved = max(
                    policy_moved, (rec["old_per_token_logps"] - rec["ref_per_token_logps"])[on].abs().max().item()
                )
        assert policy_moved > 1e-3, "the policy never left the base: the reference check is vacuous"

    if layout != "1proc":
        assert_same_training(run, launches.run("1proc", f"{trainer}-lora"), toy_weights)
