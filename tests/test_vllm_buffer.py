"""The mixed buffer with TRL's vLLM generation, colocate and server mode, against the tests' vLLM stand-in (see
``tests/test_vllm_generation.py`` and ``tests/vllm_standin``).

Only the fresh members are generated: each generation call gets exactly the fresh rows, one completion each (in
server mode TRL would otherwise ask for ``num_generations`` per prompt), and the server's own count of sampled tokens
equals the buffer's ``generated_tokens``. A historical member reaches TRL with its stored behaviour log-probs (vLLM's
sampling log-probs of the step that generated it) and TRL's importance-sampling ratio is 1 on it: its off-policy
weight is the algorithm's own, against those log-probs."""

from __future__ import annotations

import pytest

from tests.test_vllm_generation import check_common, launch_runs, standin_server

#: 8 prompts: every generation batch (32 rows = 8 groups) holds all of them, so the second one reuses history; 16 for
#: 2 processes (64 rows)
PROMPTS = ["abc:", "bcd:", "cde:", "def:", "efg:", "fgh:", "gha:", "hab:"]
PROMPTS_2P = PROMPTS + [p[0] + p[2] + p[1] + ":" for p in PROMPTS]
BUFFER = {"buffer_history_per_group": 2, "buffer_max_staleness": 16}


def check_buffer(name, ranks, server_stats=None):
    check_common(name, ranks, exact_logps=False, per_prompt=1)
    for rec in ranks:
        calls = {}
        for gen in rec["generations"]:
            calls.setdefault(gen["step"], []).append(gen)
        with_history = 0
        for rnd in rec["rounds"]:
            fresh = rnd["historical"].count(False)
            gens = calls[rnd["step"]]
            assert [g["num_prompts"] for g in gens] == [fresh], (name, rnd["step"])  # the fresh rows, no more
            assert all(g["num_generations"] == 1 for g in gens)  # one completion per fresh row
            if fresh < rnd["rows"]:
                with_history += 1
                assert rnd["is_ratio_historical"] == [1.0, 1.0]  # no second correction on reused members
                assert rnd["historical_logp_max_diff"] == 0.0  # their stored behaviour log-probs reached TRL
        assert with_history >= 1, name
    generated = sum(g["tokens"] for rec in ranks for g in rec["generations"])  # what each process received
    assert all(rec["buffer_stats"]["generated_tokens"] == generated for rec in ranks)  # summed over processes
    if server_stats is not None:  # what the server sampled is what the buffer counted as generated
        assert server_stats == generated


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_mixed_buffer_generates_only_fresh_members_through_vllm(tmp_path, mode):
    names = ["gvpo", "gspo"]
    if mode == "colocate":
        records = launch_runs(tmp_path, mode, names, prompts=PROMPTS, **BUFFER)
        tokens = {name: None for name in names}
    else:
        records = {}
        tokens = {}
        for name in names:  # one server per run: its token count is that run's
            with standin_server() as url:
                records.update(launch_runs(tmp_path / name, mode, [name], server_url=url, prompts=PROMPTS, **BUFFER))
            tokens[name] = records[name][0]["server_stats"]["generated_tokens"]
    for name, ranks in records.items():
        check_buffer(name, ranks, tokens[name])


@pytest.mark.distributed
def test_mixed_buffer_through_a_vllm_server_with_two_processes(tmp_path):
    # the plan equalises fresh rows over the processes, as TRL's server mode needs (each process takes its slice of
    # the main process's request by position)
    with standin_server() as url:
        records = launch_runs(tmp_path, "server", ["gvpo"], num_processes=2, server_url=url, prompts=PROMPTS_2P,
                              **BUFFER)  # fmt: skip
    ranks = records["gvpo"]
    check_buffer("gvpo", ranks, ranks[0]["server_stats"]["generated_tokens"])
    assert [len(rec["generations"]) for rec in ranks] == [2, 2]
