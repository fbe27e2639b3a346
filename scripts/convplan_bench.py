"""Training speed with the convolution algorithms measured per layer shape (ddl/kernels/convplan.py)
against the fixed rule (numba.algorithm), interleaved in one process: each model twice, one
instance running the plan and one the rule, their repeats alternating (scripts/benchmark.py's
timing: medians, one BLAS thread unless --threads). Also what planning cost, timed afresh (this
CPU's stored plans are forgotten first) and read back. Prints a markdown table.

    python scripts/convplan_bench.py [--repeats 7] [--seconds 0.3] [--models resnet-mini,...]
                                     [--threads 1]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (one BLAS thread, set before NumPy starts)

import argparse  # noqa: E402
import time  # noqa: E402

from ddl import kernels  # noqa: E402
from ddl.kernels import convplan  # noqa: E402
from ddl.models import build  # noqa: E402
from ddl.step import rehearse  # noqa: E402

BATCH = 64
MODELS = {"resnet-mini": benchmark.MNIST[0], "resnet-mini colour": benchmark.COLOUR,
          "vgg-mini": benchmark.COLOUR, "ref-cnn": benchmark.MNIST[0],
          "seed-cnn": benchmark.MNIST[0]}


def contestants(label):
    """{"fixed rule": step, "measured plan": step} for model `label`, the plan's step running
    the plan made now; and (its shapes, seconds to plan afresh, seconds to read it back)."""
    name, shape = label.split()[0], MODELS[label]
    model = build(name, shape, benchmark.MNIST[1], seed=0, input_grad=False)
    costs = []
    for _ in range(2):                       # timed, then read back from the store
        started = time.perf_counter()
        count, _ = kernels.choose(lambda: rehearse(model, shape, BATCH, benchmark.MICRO_BATCH))
        costs.append(time.perf_counter() - started)
    plan = dict(convplan._chosen)
    steps = {"fixed rule": ({}, benchmark.ddl_step(name, BATCH, shape=shape)),
             "measured plan": (plan, benchmark.ddl_step(name, BATCH, shape=shape))}

    def running(chosen, step):
        def run():
            convplan.adopt(chosen)
            step()
        return run
    return {k: running(*v) for k, v in steps.items()}, (count, *costs), plan


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads (as `ddl train` alone uses every core)")
    args = parser.parse_args()
    benchmark.threadpool_limits(args.threads)
    kernels.use("numba")
    kernels.warm()
    forgot = convplan.forget()
    threads = convplan._where()[1].rsplit(", ", 1)[1]
    print(f"CPU: {benchmark.cpu_model()}; kernels compiled for {kernels.target()}; batch "
          f"{BATCH}; {threads}; {args.repeats} repeats of {args.seconds} s; forgot {forgot} "
          f"stored plan(s); load average {os.getloadavg()[0]:.1f}\n")
    print("| model | fixed rule (images/s) | measured plan (images/s) | plan / rule | shapes "
          "| planning s (timed / read back) | where the plan differs from the rule |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label in args.models.split(","):
        steps, (count, cold, warm), plan = contestants(label)
        rates = benchmark.throughput(steps, BATCH, args.repeats, args.seconds)
        rule = {c: kernels.get().algorithm(c.weight, c.stride, c.padding, c.pool) for c in plan}
        differs = "; ".join(f"{c.weight[1]}->{c.weight[0]} {c.weight[2]}x{c.weight[3]} at "
                            f"{c.x[2]}x{c.x[3]}: {plan[c]} (rule {rule[c]})"
                            for c in plan if plan[c] != rule[c]) or "nowhere"
        fixed, measured = rates["fixed rule"], rates["measured plan"]
        print(f"| {label} | {fixed:,.0f} | {measured:,.0f} | {measured / fixed:.2f}x | {count} "
              f"| {cold:.2f} / {warm:.2f} | {differs} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
