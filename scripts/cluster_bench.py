"""Gradient exchange across an emulated link: ddl's --compress choices, 2 ranks on 2 nodes against
the same 2 ranks on one host, and PyTorch DDP over the same link (scripts/ddp_rank.py; needs root:
scripts/emulated-cluster.sh, and torch: make install-torch).

    sudo .venv/bin/python scripts/cluster_bench.py --out docs/cluster-benchmarks.md

For each link rate, rounds of runs interleaved (one host exact, then 2 nodes with each --compress),
images/s as --metrics reports them for one epoch of --subset images (64 per rank per step, ref-cnn),
and the bytes that node n2 sent per step (its link's counters). Medians over the rounds.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT, AGENT = ROOT / "scripts" / "emulated-cluster.sh", ROOT / "scripts" / "netns-agent"
COMPRESS = ("none", "bf16", "powersgd")
DDP_HOOKS = ("none", "fp16", "powersgd")
# The nodes' names: P1, P2 with scripts/emulated-cluster.sh's DDL_CLUSTER_PREFIX=P (default n).
N1, N2 = (os.environ.get("DDL_CLUSTER_PREFIX", "n") + k for k in "12")


def sent(node):
    return int(subprocess.run([str(SCRIPT), "exec", node, "cat",
                               "/sys/class/net/eth0/statistics/tx_bytes"],
                              capture_output=True, text=True, check=True).stdout)


def one_run(hosts, compress, args, folder):
    """(images/s, bytes n2 sent per step) of one `ddl train` launched from n1 over `hosts`."""
    hostfile, metrics = folder / "hosts", folder / "m.jsonl"
    hostfile.write_text(hosts)
    before = sent(N2)
    cmd = [str(SCRIPT), "exec", N1, sys.executable, "-m", "ddl", "launch", "-n", "2",
           "--hostfile", str(hostfile), "--agent", str(AGENT), "--iface", "eth0", "--",
           "train", "--model", "ref-cnn", "--data", args.data, "--subset", str(args.subset),
           "--batch-size", "128", "--epochs", "1", "--quiet", "--compress", compress,
           "--metrics", str(metrics), "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise Failed(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    steps = args.subset // 128
    return (json.loads(metrics.read_text().splitlines()[-1])["images_per_second"],
            (sent(N2) - before) / steps)


class Failed(Exception):
    """A run failed: its cluster may have been taken down under it (see `again`)."""


def again(run, rate, *args):
    """`run(*args)`, run again on a fresh cluster when it failed because the cluster went away
    (a test run elsewhere on the machine may take it down); any other failure ends the script."""
    for _ in range(3):
        try:
            return run(*args)
        except Failed as e:
            status = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True)
            if "no emulated cluster is up" not in status.stdout + status.stderr:
                raise SystemExit(str(e)) from None
            print(f"the cluster went away during a run: up again at {rate}", flush=True)
            up(rate)
    raise SystemExit("the cluster keeps going away")


def ddp_run(hook, args):
    """(images/s, bytes n2 sent per step) of PyTorch DDP, rank 0 on n1 and rank 1 on n2."""
    before = sent(N2)
    ranks = [subprocess.Popen([str(SCRIPT), "exec", (N1, N2)[r], "env", "GLOO_SOCKET_IFNAME=eth0",
                               sys.executable, str(ROOT / "scripts" / "ddp_rank.py"), str(r),
                               "10.99.0.1", hook, str(args.ddp_steps)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=600) for p in ranks]
    if any(p.returncode for p in ranks):
        raise Failed(f"DDP ({hook}) failed:\n{outs[0][1][-2000:]}\n{outs[1][1][-2000:]}")
    speed = float(outs[0][0].split()[-1])
    return speed, (sent(N2) - before) / (args.ddp_steps + 3)


def up(rate):
    """The cluster of 2 nodes at `rate` (tried for 5 minutes: another user of the machine's
    cluster, a test run, may hold it meanwhile)."""
    for _ in range(30):
        done = subprocess.run([str(SCRIPT), "up", "2", rate], capture_output=True, text=True)
        if done.returncode == 0:
            return
        time.sleep(10)
    raise SystemExit(f"emulated-cluster.sh up 2 {rate}: {done.stderr.strip()}")


def measure(rate, args):
    """{case: [(images/s, bytes/step) per round]} on a cluster of 2 nodes at `rate`."""
    up(rate)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):
                cases = [("one host, none", f"{N1}:2\n", "none")] + [
                    (f"2 nodes, {c}", f"{N1}\n{N2}\n", c) for c in COMPRESS]
                for name, hosts, compress in cases:
                    results.setdefault(name, []).append(again(one_run, rate, hosts, compress,
                                                             args, Path(tmp)))
                    print(rate, name, results[name][-1], flush=True)
                for hook in DDP_HOOKS if args.ddp_steps else ():
                    name = f"2 nodes, PyTorch DDP, {hook} hook"
                    results.setdefault(name, []).append(again(ddp_run, rate, hook, args))
                    print(rate, name, results[name][-1], flush=True)
    finally:
        subprocess.run([str(SCRIPT), "down"], capture_output=True)
    return results


def table(all_results, rounds):
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if line.startswith("Model name")), platform.processor())
    lines = ["# Gradient exchange across an emulated link (scripts/cluster_bench.py)", "",
             f"ref-cnn, 2 ranks, 64 images per rank per step, one epoch; {cpu}; medians of "
             f"{rounds} interleaved round(s); efficiency = images/s over the same 2 ranks on "
             "one host with exact gradients, medians of the same rounds; bytes: what n2 sent "
             "over its link per step.", "",
             "| link | case | images/s | efficiency | bytes/step | runs |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for rate, results in all_results.items():
        base = statistics.median(r[0] for r in results["one host, none"])
        for name, runs in results.items():
            speed = statistics.median(r[0] for r in runs)
            size = statistics.median(r[1] for r in runs)
            lines.append(f"| {rate} | {name} | {speed:,.0f} | {speed / base:.0%} | "
                         f"{size / 1e3:,.1f} kB | {', '.join(f'{r[0]:,.0f}' for r in runs)} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="none,1gbit,100mbit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subset", type=int, default=8192)
    parser.add_argument("--data", default=str(ROOT / "data" / "mnist.h5"))
    parser.add_argument("--ddp-steps", type=int, default=32, help="0: no PyTorch DDP")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    results = {rate: measure(rate, args) for rate in args.rates.split(",")}
    text = table(results, args.rounds)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
