"""`python -m ddl.kernels [--show | --retune | --replan]`: compile every kernel into numba's cache
(`make install` runs it), after measuring which CPU tuning is fastest here if that is not known yet.
--show prints the choice and what it was measured from, and the convolution algorithm timed
fastest for each layer shape; --retune measures both again, --replan only the convolutions'
(docs/tuning.md)."""
import argparse
import os

from ddl import kernels
from ddl.kernels import convplan, jit, tune

parser = argparse.ArgumentParser(prog="python -m ddl.kernels", description=__doc__.split("\n")[0])
parser.add_argument("--show", action="store_true", help="print the tuning choice; compile nothing")
parser.add_argument("--retune", action="store_true",
                    help="forget this CPU's choices, measure the CPU tuning again")
parser.add_argument("--replan", action="store_true",
                    help="forget this CPU's convolution algorithms (ddl train times them again)")
args = parser.parse_args()
if args.show:
    path, found = tune.stored(jit.choice_files(), jit.version(), log=print)
    print(f"CPU: {tune.cpu_key()}\nkernels version: {jit.version()}")
    if os.environ.get(tune.EXPLICIT):
        print(f"target: {os.environ[tune.EXPLICIT]} (${tune.EXPLICIT}; wins over the choice)")
    if found is None:
        print("no tuning choice stored yet: the next compile measures it")
    else:
        print(f"choice file: {path}\ntarget: {found['target']} (chosen {found.get('when')})"
              + (f"; the measurement failed: {found['error']}" if "error" in found else ""))
        for name, seconds in found.get("measured", {}).items():
            print(f"  {name}: " + ", ".join(f"{model} {1 / s:,.0f} images/s"
                                           for model, s in seconds.items()))
    target = os.environ.get(tune.EXPLICIT) or (found or {}).get("target")
    path, key, convs = convplan.stored(print, target) if target else (None, None, {})
    print(f"convolution algorithms: {len(convs)} layer shape(s) timed" + (
        f" for {key} in {path}" if convs else " (ddl train times its model's at start-up)"))
    for shape, entry in sorted(convs.items()):
        timed = ", ".join(f"{name} {ms:.2f}" for name, ms in entry.get("ms", {}).items())
        print(f"  {shape}: {entry['algorithm']} "
              + (f"(ms: {timed})" if timed else "(the only one that fits)"))
    if os.environ.get(convplan.FORCE):
        print(f"forced: {os.environ[convplan.FORCE]} wherever it fits (${convplan.FORCE})")
    raise SystemExit(0)
if args.retune or args.replan:
    print(f"forgot {convplan.forget()} stored convolution plan(s)")
    if args.replan:
        raise SystemExit(0)
if args.retune:
    tune.forget(jit.choice_files(), jit.version())
kernels.setup()
processes = jit.cores()
with kernels.using("numba"):
    seconds = kernels.warm(processes=processes)
print(f"numba kernels for CPU {jit.target()} ready in {seconds:.1f} s, {processes} process(es) "
      f"(cache: {jit.cache_dir()})")
