"""Every trainer through TRL's vLLM generation, colocate and server mode, against the tests' vLLM stand-in.

vLLM cannot run here; ``tests/vllm_standin`` (owned by these tests, NOT vLLM) implements the part of vLLM's surface
that TRL 1.16 uses, so that TRL's own ``VLLMGeneration`` / ``VLLMClient`` code runs unchanged. It generates with
transformers from the weights TRL synced into it. The stand-in is imported only in the launched processes
(``tests/distributed/vllm_worker.py`` puts it on their ``sys.path``), never in the pytest process: TRL decides at
import time whether vLLM exists.

What is proven, per trainer (TRL's ``GRPOTrainer`` as the reference schedule):

- the stand-in samples from the distribution whose log-probs it reports (unit tests of its engine, in-process);
- after every weight sync the stand-in's weights equal the policy's, and syncs happen exactly at TRL's steps (once per
  generation: every 4th optimizer step for GVPO/GSPO, every step for GPG, whose β_th resampling rounds generate
  through vLLM within the step without a re-sync);
- groups stay whole in every micro-step; TRL's recomputed rollout log-probs equal the stand-in's sampling log-probs
  (fp32 stand-in), so the colocate round trip is exact;
- with a bf16 server (a sampler less precise than the trainer, as a real vLLM is) TRL's importance-sampling ratio
  moves away from 1; GSPO's and GPG's losses change with it, GVPO's does not (it needs no correction);
- the same with 2 processes (colocate: one engine per process; server: the main process talks to the server).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from gvpo_trl.demo.toy import LETTERS
from tests.distributed.harness import REPO, free_port, launch, launch_env
from tests.helpers import tiny_model_path
from tests.vllm_standin.engine import Engine, Sampling, processed_logits

WORKER = Path(__file__).with_name("distributed") / "vllm_worker.py"
PROMPTS = [f"{a}{b}{c}:" for a, b, c in itertools.product(LETTERS, "abcd", "ef")]  # 64 distinct prompts
K = 4
STEPS = 8  # two generations of GVPO/GSPO (4 optimizer steps each), eight of GPG
#: every run: k = 4, 8 rows per micro-step (2 whole groups), sampling at temperature 0.7 (processed log-probs matter)
COMMON = {"per_device_train_batch_size": 8, "num_generations": K, "temperature": 0.7}
RUNS = {
    "grpo": {"algorithm": "grpo", "args": {"steps_per_generation": 4}},  # TRL's own schedule, as the reference
    "gvpo": {"algorithm": "gvpo", "args": {}},  # 4 optimizer steps per generation (its default)
    "gspo": {"algorithm": "gspo", "args": {}},  # 4 optimizer steps per generation (its default)
    "gpg": {"algorithm": "gpg", "args": {}},  # on-policy, with β_th resampling rounds
}


# --- the stand-in's engine (in-process: it does not register a `vllm` module) ---------------------------------------


@pytest.fixture(scope="module")
def engine_and_prompt():
    from transformers import AutoTokenizer

    path = tiny_model_path()
    return Engine(path, seed=0), AutoTokenizer.from_pretrained(path)("abc:", add_special_tokens=False)["input_ids"]


def test_standin_samples_from_the_distribution_it_reports(engine_and_prompt):
    engine, prompt = engine_and_prompt
    seqs = engine.generate(prompt, Sampling(n=4000, temperature=0.3, max_tokens=1, logprobs=0))
    vocab = engine.model.config.vocab_size
    freq = torch.bincount(torch.tensor([s.token_ids[0] for s in seqs]), minlength=vocab).float() / len(seqs)
    reported = torch.zeros(vocab)
    for s in seqs:
        reported[s.token_ids[0]] = s.logprobs[0][s.token_ids[0]][0]
    seen = freq > 0
    with torch.no_grad():
        model = (engine.model(torch.tensor([prompt])).logits[0, -1] / 0.3).log_softmax(-1)
    torch.testing.assert_close(reported[seen], model[seen], rtol=0, atol=1e-5)  # the processed distribution's
    # total variation between the sampled frequencies and that distribution: 0.027 here (seed 0, 4000 draws); drawing
    # at temperature 1 while reporting 0.3 gives 0.36
    assert 0.5 * (freq - model.exp()).abs().sum().item() < 0.08


def test_standin_logprobs_follow_every_sampling_transform(engine_and_prompt):
    engine, prompt = engine_and_prompt
    params = Sampling(n=6, temperature=0.7, top_k=5, max_tokens=8, logprobs=2)
    seqs = engine.generate(prompt, params)
    eos = next(iter(engine.eos_token_ids))
    for seq in seqs:
        ids = torch.tensor([prompt + seq.token_ids])
        with torch.no_grad():
            logits = engine.model(ids).logits[0, len(prompt) - 1 : -1]
        expected = processed_logits(logits, ids[:, : len(prompt)].expand(len(seq.token_ids), -1), params)
        expected = expected.log_softmax(-1)
        for t, (token, position) in enumerate(zip(seq.token_ids, seq.logprobs, strict=True)):
            logprob, rank = position[token]
            assert logprob == pytest.approx(expected[t, token].item(), abs=1e-5)
            assert rank <= 5  # top-k = 5: nothing else can be drawn
            assert len(position) <= 3  # the sampled token and the top 2
        assert eos not in seq.token_ids[:-1]  # generation stops at EOS
        assert len(seq.token_ids) == 8 or seq.token_ids[-1] == eos


def test_processed_logits_hand_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    history = torch.tensor([[0]])
    keep = torch.isfinite(processed_logits(logits, history, Sampling(top_p=0.7)))
    assert keep.tolist() == [[True, True, False, False]]  # softmax: 0.64, 0.24, ...: the first two reach 0.7
    out = processed_logits(logits, history, Sampling(repetition_penalty=2.0, temperature=0.5))
    assert out.tolist() == [[2.0, 2.0, 0.0, -2.0]]  # token 0 seen: 2 / 2, then everything / 0.5
    out = processed_logits(logits, history, Sampling(min_p=0.3))
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]  # p >= 0.3 × 0.64


# --- TRL's vLLM path, launched ------------------------------------------------------------------------------------


@contextlib.contextmanager
def standin_server(dtype: str = "auto"):
    """The stand-in's HTTP server on a free port of 127.0.0.1, for the duration of the block."""
    port = free_port()
    cmd = [sys.executable, "-m", "tests.vllm_standin.server", "--model", tiny_model_path(), "--port", str(port),
           "--dtype", dtype]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the stand-in server did not start:\n{proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.kill()
        proc.wait()


def launch_runs(tmp_path, mode, names, num_processes=1, server_url=None, steps=STEPS, prompts=PROMPTS, **extra_args):
    runs = []
    for name in names:
        run = {"name": name, "mode": mode, "algorithm": RUNS[name]["algorithm"],
               "args": {**COMMON, "max_steps": steps, **RUNS[name]["args"], **extra_args}}  # fmt: skip
        if mode == "server":
            run.update(server_url=server_url, group_port=free_port())
        runs.append(run)
    config = None if num_processes == 1 else "cpu_ddp_2proc.yaml"
    done = launch(f"vllm-{mode}-{num_processes}p", {"runs": runs, "prompts": prompts}, tmp_path, num_processes,
                  config, script=WORKER, timeout=900)  # fmt: skip
    return {
        name: [json.loads((done.out_dir / name / f"rank{p}.json").read_text()) for p in range(num_processes)]
        for name in names
    }


def sync_steps(record):
    return [s["step"] for s in record["syncs"]]


def logged(record, key):
    return {entry["step"]: entry[key] for entry in record["log_history"] if key in entry}


def check_common(name, ranks, exact_logps, steps=STEPS, per_prompt=K):
    """What holds for every trainer, mode and process count (``per_prompt``: completions asked per prompt)."""
    for rec in ranks:
        assert rec["world"] == len(ranks)
        expected = list(range(steps)) if name == "gpg" else list(range(0, steps, 4))
        assert sync_steps(rec) == expected, name  # one sync per generation step, exactly TRL's
        served = [s for s in rec["syncs"] if "max_diff" in s]
        assert served or rec is not ranks[0], name  # server mode: only the main process reads the server's weights
        for s in served:
            assert s["names_match"] and s["max_diff"] == 0.0, (name, s)  # the served weights are the policy's
        assert rec["syncs"][-1]["moved"] > 1e-3, name  # ... which trained: the syncs carried new weights
        for gen in rec["generations"]:
            assert gen["num_generations"] == per_prompt and gen["num_prompts"] % K == 0, (name, gen)  # whole groups
        for rnd in rec["rounds"]:
            assert rnd["rows"] % K == 0
            if exact_logps:  # fp32 stand-in: vLLM's sampling log-probs are the trainer's own
                assert rnd["logp_max_diff"] < 1e-5, (name, rnd)
        if name != "grpo":
            assert len(rec["micro_steps"]) == steps
    if name != "grpo":  # every micro-step holds whole groups, over the processes
        for step in range(steps):
            ids = Counter(g for rec in ranks for g in rec["micro_steps"][step]["group_ids"])
            assert set(ids.values()) == {K}, (name, step, ids)


def check_gpg_rounds(ranks):
    """GPG's β_th resampling generates through vLLM inside the step, without a re-sync, on every process alike."""
    rounds = {step - 1: r for step, r in logged(ranks[0], "dynamic_sampling/rounds").items()}  # logged after the step
    calls = [Counter(g["step"] for g in rec["generations"]) for rec in ranks]
    assert all(c == calls[0] for c in calls)  # every process takes the same rounds
    assert {step: n - 1 for step, n in calls[0].items()} == {s: int(r) for s, r in rounds.items()}
    assert sum(rounds.values()) > 0  # the path was exercised


@pytest.mark.slow
def test_every_trainer_through_colocate_mode(tmp_path):
    records = launch_runs(tmp_path, "colocate", list(RUNS))
    for name, ranks in records.items():
        check_common(name, ranks, exact_logps=True)
    assert sync_steps(records["gvpo"][0]) == sync_steps(records["gspo"][0]) == sync_steps(records["grpo"][0])
    check_gpg_rounds(records["gpg"])


@pytest.mark.slow
def test_every_trainer_through_server_mode_and_the_sampling_correction(tmp_path):
    with standin_server(dtype="bfloat16") as url:
        records = launch_runs(tmp_path, "server", list(RUNS), server_url=url)
    for name, ranks in records.items():
        check_common(name, ranks, exact_logps=False)
        rec = ranks[0]
        stats = rec["server_stats"]
        assert stats["weight_updates"] >= len(rec["syncs"])  # the server is shared by the runs, in turn
        ratios = [r for rnd in rec["rounds"] for r in rnd["is_ratio"]]
        assert max(abs(r - 1) for r in ratios) > 1e-3  # bf16 sampling: TRL's correction is not the identity
        if name == "grpo":
            continue
        changed = [abs(m["loss"] - m["loss_without_is"]) > 1e-6 * max(1e-3, abs(m["loss"])) for m in rec["micro_steps"]]
        if name == "gvpo":
            assert not any(changed)  # Theorem 2: no importance weight, the ratio is not used
        else:
            assert sum(changed) >= 2, (name, rec["micro_steps"])  # GSPO and GPG apply TRL's ratio
    check_gpg_rounds(records["gpg"])


@pytest.mark.distributed
def test_two_processes_colocate_and_server(tmp_path):
    # GVPO: generations at steps 0 and 4. GPG with dynamic-sampling carry-over (its default): carried groups sit on one
    # process only, which once deadlocked this run at its second step (one rank in the loss, the other in refill)
    both = dict(names=["gvpo", "gpg"], num_processes=2, steps=5)
    colocate = launch_runs(tmp_path / "colocate", "colocate", **both)
    with standin_server() as url:
        server = launch_runs(tmp_path / "server", "server", server_url=url, **both)
    for records in (colocate, server):
        for name, ranks in records.items():
            check_common(name, ranks, exact_logps=True, steps=5)  # fp32 server: exact too
        check_gpg_rounds(records["gpg"])
    # colocate: each process has its own engine, synced; server: only the main process talks to the server
    assert all("max_diff" in s for rec in colocate["gvpo"] for s in rec["syncs"])
    assert not any("max_diff" in s for s in server["gvpo"][1]["syncs"])
