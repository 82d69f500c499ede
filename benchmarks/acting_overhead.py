"""Where a compiled S2AC acting call spends its time, on the CPU, at Hopper-v5 shapes (m = 10, L = 3).

    python benchmarks/acting_overhead.py [--threads 1] [--out results/acting_overhead.md]

Prints, per call, at 1 and 8 envs (training selection, ``SVGDActor(compile_acting=True)``): the actor's forward
(what a collector pays), the compiled graph alone, the part of it that is dynamo's guard check (the profiler's
``TorchDynamo Cache Lookup``), and SAC's eager forward. Then the same graph compiled with the truncated normal's
inverse CDF left as a call back into Python (its inductor lowering not registered) and what that callback costs per
call. Then the 256-wide matrix product of an SVGD step (``[2, M, 256] @ [2, 256, 256]``, twin critics) at the
acting row counts, in fp32 and bf16. Times are medians over repetitions after warm-up; inductor's graph cache is off
so that each variant is compiled as it is.
"""

from __future__ import annotations

import argparse

import torch
import torch._dynamo
from torch._inductor import config as inductor_config
from torch.profiler import ProfilerActivity, profile
from torchrl.envs.utils import ExplorationType, set_exploration_type

import torchrl_s2ac.distributions as distributions
from bench_update import Report, act_fn, median_ms, s2ac_agent, sac_agent
from torchrl_s2ac import describe_device

OBS_DIM, ACT_DIM = 11, 3  # Hopper-v5
ENVS = (1, 8)


def profiled_us_per_call(fn, event_key: str, calls: int) -> float:
    """Self time (total time, for an operator with children) of the profiler event ``event_key`` per call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = [event for event in prof.key_averages() if event.key == event_key]
    if not events:
        return 0.0
    total = events[0].cpu_time_total if event_key.startswith("torchrl_s2ac::") else events[0].self_cpu_time_total
    return total / calls


def acting_rows(repeats: int) -> list[str]:
    """Per-call times of the compiled acting path with the lowering off, then on (``torch._dynamo.reset`` between:
    dynamo would otherwise reuse the first graph)."""
    rows = []
    register = distributions._register_inductor_lowering
    sac, _ = sac_agent(OBS_DIM, ACT_DIM)
    for lowering in (False, True):
        distributions._register_inductor_lowering = register if lowering else lambda: None
        torch._dynamo.reset()
        actor, _ = s2ac_agent(OBS_DIM, ACT_DIM, compile_acting=True)
        for envs in ENVS:
            observation = torch.randn(envs, OBS_DIM)
            forward = act_fn(actor, OBS_DIM, envs)
            forward()  # compiles
            graph = actor._compiled_choose["cpu"]

            def graph_call(graph=graph, observation=observation):
                with torch.no_grad():
                    graph(observation, "random")

            times = {name: 1000 * median_ms(fn, repeats) for name, fn in (("forward", forward), ("graph", graph_call))}
            guards = profiled_us_per_call(graph_call, "TorchDynamo Cache Lookup", repeats)
            callback = profiled_us_per_call(graph_call, "torchrl_s2ac::truncated_normal_icdf", repeats)
            sac_us = 1000 * median_ms(act_fn(sac, OBS_DIM, envs), repeats)
            rows.append(
                f"| {'lowered' if lowering else 'Python callback'} | {envs} | {times['forward']:.0f} | "
                f"{times['graph']:.0f} | {guards:.0f} | {callback:.0f} | {sac_us:.0f} |"
            )
    distributions._register_inductor_lowering = register
    return rows


def matmul_rows(repeats: int) -> list[str]:
    rows = []
    for rows_per_critic in (10, 80):  # m = 10 particles of 1 and of 8 envs
        for dtype in (torch.float32, torch.bfloat16):
            x, weight = torch.randn(2, rows_per_critic, 256, dtype=dtype), torch.randn(2, 256, 256, dtype=dtype)
            us = 1000 * median_ms(lambda x=x, weight=weight: torch.bmm(x, weight), repeats * 10)
            gflops = 2 * 2 * rows_per_critic * 256 * 256 / us / 1000
            rows.append(f"| {rows_per_critic} | {str(dtype).removeprefix('torch.')} | {us:.1f} | {gflops:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=300, help="calls per median")
    parser.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inductor_config.fx_graph_cache = False  # a cached graph would hide whether the lowering is registered
    lines = Report(args.out)
    lines += [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {describe_device(torch.device('cpu'))}",
        f"medians over {args.repeats} calls; command: `python benchmarks/acting_overhead.py"
        + (f" --threads {args.threads}" if args.threads else "")
        + "`",
        "",
        "## A compiled acting call (training selection), microseconds per call",
        "",
        "| inverse CDF in the graph | envs | actor forward | compiled graph alone | of which dynamo's guard check "
        "| of which the inverse-CDF callback | SAC eager forward |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    with set_exploration_type(ExplorationType.RANDOM):
        lines += acting_rows(args.repeats)
    lines += [
        "",
        "## An SVGD step's 256-wide product, `[2, M, 256] @ [2, 256, 256]` (twin critics)",
        "",
        "| rows M per critic | dtype | us | GFLOP/s |",
        "| --- | --- | --- | --- |",
        *matmul_rows(args.repeats),
    ]


if __name__ == "__main__":
    main()
