"""ddl across machines, on a cluster emulated on this one (scripts/emulated-cluster.sh): nodes
n1..n4 are network namespaces joined through a bridge by links shaped at 1 Gbit/s, and `ddl
launch` on n1 starts the other nodes' ranks through scripts/netns-agent, the cluster's ssh.
Needs root, iproute2 and the kernel's veth, bridge and tbf (CI has them); skipped elsewhere.
The first tests need none of these: the launcher's spellings, and what counts as oversubscribed."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MNIST, ROOT, rank_env
from ddl import comm, launch
from ddl.models import build
from test_cluster import OPENMPI, assert_follows, one_process, train_args  # noqa: F401 (a fixture)

SCRIPT = ROOT / "scripts" / "emulated-cluster.sh"
AGENT = ROOT / "scripts" / "netns-agent"
NODES = 4
# The nodes' names: P1..P4 for DDL_CLUSTER_PREFIX=P (default n), so that two sessions' suites can
# run at once on one machine, each with its own cluster (scripts/emulated-cluster.sh).
PREFIX = os.environ.get("DDL_CLUSTER_PREFIX", "n")
GRADIENT_BYTES = sum(p.data.nbytes for p in build("mlp", *MNIST, seed=0).parameters())


def test_a_bare_host_is_one_slot_under_either_mpiexec(tmp_path):
    hosts = tmp_path / "given"
    hosts.write_text("n1\nn2 slots=2\n")
    assert Path(launch._in_spelling(hosts, "hydra", tmp_path)).read_text() == "n1:1\nn2:2\n"
    assert (Path(launch._in_spelling(hosts, "openmpi", tmp_path)).read_text()
            == "n1 slots=1\nn2 slots=2\n")


@pytest.mark.parametrize("kind, words", [
    ("hydra", ["-launcher", "ssh", "-launcher-exec", str(AGENT), "-iface", "eth0"]),
    ("openmpi", ["--mca", "plm_rsh_agent", str(AGENT), "--mca", "btl_tcp_if_include", "eth0",
                 "--mca", "oob_tcp_if_include", "eth0"])])
def test_agent_and_interface_in_each_mpiexecs_spelling(kind, words, monkeypatch, tmp_path):
    version = {"hydra": "HYDRA build details", "openmpi": "mpirun (Open MPI) 4.1.4"}[kind]
    monkeypatch.setattr(launch, "probe", lambda _: version)
    cmd = launch.command(2, ["train"], sys.executable, workdir=tmp_path, agent=str(AGENT),
                         iface="eth0")
    assert " ".join(words) in " ".join(cmd)
    assert launch.rank_env({}, iface="eth0")["UCX_NET_DEVICES"] == "eth0"
    with pytest.raises(launch.LaunchError, match="--agent /no/agent: not found"):
        launch.command(2, ["train"], sys.executable, workdir=tmp_path, agent="/no/agent")


@pytest.mark.parametrize("env, over", [
    ({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "1"}, False),     # 4 machines, one rank each
    ({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "1", "DDL_NODES_SHARE_CORES": "1"}, True),
    ({"PMI_SIZE": "1", "DDL_NODES_SHARE_CORES": "1"}, False)])
def test_emulated_nodes_share_the_machines_cores(env, over, monkeypatch):
    for var in (*comm._SIZE_VARS, *comm._LOCAL_SIZE_VARS, "DDL_NODES_SHARE_CORES"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    assert comm.oversubscribed() is over


def _cannot_make_nodes(prefix=PREFIX):
    """Why this machine cannot host the emulated cluster of nodes named `prefix`1.., or ''."""
    state = "/run/ddl-emulated-cluster" + ("" if prefix == "n" else f"-{prefix}")
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces)"
    missing = [tool for tool in ("ip", "tc", "unshare") if not shutil.which(tool)]
    if missing:
        return f"the emulated cluster needs {', '.join(missing)} (apt-get install iproute2)"
    if os.path.exists(state):
        return "an emulated cluster is already up (scripts/emulated-cluster.sh down)"
    # A veth pair, a bridge and tbf, tried in a throwaway namespace of no name.
    tried = subprocess.run(
        ["unshare", "--net", "sh", "-c", "ip link add name p0 type veth peer name p1 && "
         "ip link add name br0 type bridge && "
         "tc qdisc add dev p0 root tbf rate 1gbit burst 64k latency 100ms"],
        capture_output=True, text=True)
    if tried.returncode:
        return f"this kernel cannot make veth, bridge or tbf: {tried.stderr.strip()}"
    return ""


CANNOT = _cannot_make_nodes()
needs_nodes = pytest.mark.skipif(bool(CANNOT), reason=CANNOT)


@pytest.fixture(scope="module")
def cluster():
    """n1..n4 at 1 Gbit/s, taken down (with any process left on a node) whatever happens. A
    failed `up` cleans up after itself; one refused because another cluster is up (another
    session's, started since the check) must not take that one down."""
    up = subprocess.run([SCRIPT, "up", str(NODES), "1gbit"], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    try:
        yield
    finally:
        subprocess.run([SCRIPT, "down"], capture_output=True)


@needs_nodes
def test_a_cluster_starts_beside_one_whose_names_extend_its_own():
    """`up` refuses only namespaces of its own names: another cluster's switch (test_elastic's
    ddl-switch-el, up in another pytest worker) is not this one's. (Before the cluster fixture:
    this file runs in one worker, and this cluster is that fixture's.)"""
    switch = "ddl-switch" + ("" if PREFIX == "n" else f"-{PREFIX}")
    other = f"{switch}-zz"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        up = subprocess.run([SCRIPT, "up", "1", "none"], capture_output=True, text=True)
        assert up.returncode == 0, up.stderr
    finally:
        subprocess.run([SCRIPT, "down"], capture_output=True)
        subprocess.run(["ip", "netns", "delete", other], capture_output=True)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert switch not in listed.split() and other not in listed.split()   # both gone


def on_node(node, cmd, **popen):
    """Start CMD on NODE as its user's shell would (scripts/emulated-cluster.sh exec)."""
    return subprocess.Popen([str(SCRIPT), "exec", node, *map(str, cmd)], env=rank_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def ddl_launch(n, tmp_path, args, mpiexec=None):
    """`ddl launch -n N` on n1 over nodes n1..nN, one rank each, through the cluster's ssh."""
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"{PREFIX}{k}\n" for k in range(1, n + 1)))
    given = ["--mpiexec", mpiexec] if mpiexec else []
    return on_node(f"{PREFIX}1", [sys.executable, "-m", "ddl", "launch", "-n", n, "--hostfile",
                                  hosts, *given, "--agent", AGENT, "--iface", "eth0", "--", *args])


def sent(node):
    """Bytes that NODE has sent over its link."""
    return int(subprocess.run(["ip", "netns", "exec", node, "cat",
                               "/sys/class/net/eth0/statistics/tx_bytes"],
                              capture_output=True, text=True, check=True).stdout)


@needs_nodes
@pytest.mark.parametrize("n, mpiexec", [
    (2, None), (4, None),
    pytest.param(2, OPENMPI, marks=pytest.mark.skipif(not OPENMPI, reason="no mpirun.openmpi"))],
    ids=["hydra-2", "hydra-4", "openmpi-2"])
def test_n_nodes_follow_one_process(n, mpiexec, cluster, mnist_h5, tmp_path,
                                    one_process):  # noqa: F811 (test_cluster's fixture)
    """One rank per node, through Hydra (the project's mpiexec) or Open MPI: the weights of one
    process, and every node but the launcher's sent at least one gradient per step over its link:
    the ranks did not take a shortcut through this machine's shared memory."""
    before = {k: sent(f"{PREFIX}{k}") for k in range(2, n + 1)}
    job = ddl_launch(n, tmp_path, train_args(mnist_h5, tmp_path / "c.h5") + ["--compress", "none"],
                     mpiexec)
    stdout, stderr = job.communicate(timeout=120)
    assert_follows(one_process, subprocess.CompletedProcess([], job.returncode, stdout, stderr),
                   tmp_path / "c.h5", n)
    steps = 256 // 64           # test_cluster's TINY run
    for k, was in before.items():
        assert sent(f"{PREFIX}{k}") - was >= steps * GRADIENT_BYTES, f"{PREFIX}{k}"


REF_CNN_BYTES = sum(p.data.nbytes for p in build("ref-cnn", *MNIST, seed=0).parameters())


@needs_nodes
@pytest.mark.parametrize("compress, low, high", [("none", 1.0, 1.1), ("bf16", 0.5, 0.55),
                                                 ("powersgd", 0.0, 0.06)])
def test_the_link_carries_what_the_compression_promises(compress, low, high, cluster, mnist_h5,
                                                        tmp_path):
    """ref-cnn's gradients as n2's link counters see them, per step, against float32's 0.90 MB:
    bf16 half of it, PowerSGD at rank 4 (ddl/exchange.py) 4.6% of it (and headers)."""
    steps = 16
    before = sent(f"{PREFIX}2")
    job = ddl_launch(2, tmp_path, ["train", "--data", mnist_h5, "--model", "ref-cnn", "--subset",
                                   str(64 * steps), "--batch-size", "64", "--epochs", "1",
                                   "--quiet", "--compress", compress])
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr
    per_step = (sent(f"{PREFIX}2") - before) / steps
    assert low * REF_CNN_BYTES <= per_step <= high * REF_CNN_BYTES + 20_000, per_step


@needs_nodes
def test_the_watchdog_names_a_node_whose_link_went_down(cluster, mnist_h5, tmp_path):
    """n2's link goes down in the middle of training: within --timeout (and a little), the job
    ends with the watchdog's status, naming rank 1 and its node."""
    args = ["train", "--data", mnist_h5, "--model", "mlp", "--epochs", "50", "--batch-size", "64",
            "--timeout", "3", "--quiet"]
    before = sent(f"{PREFIX}2")
    job = ddl_launch(2, tmp_path, args)
    try:
        while sent(f"{PREFIX}2") - before < 4 * GRADIENT_BYTES:      # training is under way
            assert job.poll() is None, job.communicate()
            time.sleep(0.05)
        subprocess.run(["ip", "-n", f"{PREFIX}2", "link", "set", "eth0", "down"], check=True)
        cut = time.monotonic()
        _, stderr = job.communicate(timeout=30)
        took = time.monotonic() - cut
    finally:
        subprocess.run(["ip", "-n", f"{PREFIX}2", "link", "set", "eth0", "up"], check=True)
        if job.poll() is None:
            job.kill()
    assert job.returncode == 5, stderr
    assert f"rank 1 (on {PREFIX}2) did not reach the gradient all-reduce" in stderr
    assert took < 3 + 5, took


@needs_nodes
def test_the_agent_cannot_reach_a_node_whose_link_is_down(cluster):
    """As ssh: status 255 and its line, not a way in through the kernel."""
    reach = on_node(f"{PREFIX}1", [AGENT, "-x", f"{PREFIX}3", "cat /proc/sys/kernel/hostname"])
    assert reach.communicate(timeout=30) == (f"{PREFIX}3\n", "") and reach.returncode == 0
    subprocess.run(["ip", "-n", f"{PREFIX}3", "link", "set", "eth0", "down"], check=True)
    try:
        reach = on_node(f"{PREFIX}1", [AGENT, f"{PREFIX}3", "echo in"])
        out, err = reach.communicate(timeout=30)
    finally:
        subprocess.run(["ip", "-n", f"{PREFIX}3", "link", "set", "eth0", "up"], check=True)
    assert (reach.returncode, out) == (255, "")
    assert err.startswith(f"ssh: connect to host {PREFIX}3 port 22: "), err
