"""Multi-node rehearsal (issue 7, item 9): two network namespaces joined by a veth pair stand in for two
hosts; `mpirun` with a hostfile naming both starts one rank in each (scripts/netns_agent.sh in place
of ssh), with Open MPI held to TCP on that link. Three training steps there must equal the
single-process run on the global batch (the equivalence of item 2). Needs root and iproute2 (CI has
both); where the namespaces cannot be made the test skips saying why (it never passes there)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from test_distributed import assert_equivalent

REHEARSAL = REPO / "scripts" / "netns_rehearsal.sh"
SCRIPT = REPO / "tests" / "mpi" / "equivalence.py"
XLA = "--xla_force_host_platform_device_count=2"  # as in tests/test_distributed.py
NEEDS = "the multi-node rehearsal needs root and iproute2 (ip netns, veth) and util-linux (unshare)"
# Each rank says where it runs, then becomes the equivalence script (same processes, same job).
WHERE = ('echo "rehearsal-rank=$OMPI_COMM_WORLD_RANK host=$(hostname) netns=$(readlink /proc/self/ns/net) '
         'addr=$(ip -4 -o addr show scope global | awk \'{print $4}\' | paste -sd,)"; exec "$0" "$@"')


def test_two_hosts_over_tcp_equal_one_process(tmp_path):
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip(f"{NEEDS}; here: euid={os.geteuid()}, ip={shutil.which('ip')}, unshare={shutil.which('unshare')}")
    env = {**os.environ, "XLA_FLAGS": XLA, "JAX_PLATFORMS": "cpu"}
    # the single-process reference runs alongside the two-host job (the machine has few cores; time adds up)
    ref = subprocess.Popen([sys.executable, str(SCRIPT), "single", str(tmp_path / "ref.npz")], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the rehearsal tears its namespaces down on SIGTERM (not on SIGKILL, which subprocess.run's timeout sends)
    job = subprocess.Popen(
        ["bash", str(REHEARSAL), "-x", "JAX_PLATFORMS=cpu", "-x", f"XLA_FLAGS={XLA}",
         "bash", "-c", WHERE, sys.executable, str(SCRIPT), "mpi", str(tmp_path / "mpi.npz")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = job.communicate(timeout=400)
        ref_out, ref_err = ref.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        job.terminate()
        out, err = job.communicate(timeout=60)
        pytest.fail(f"the two-host job or the reference timed out:\n{out[-3000:]}{err[-3000:]}")
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
    log = out[-3000:] + err[-5000:]
    if "netns_rehearsal: needs" in err or "cannot create" in err:
        pytest.skip(f"{NEEDS}; the rehearsal could not set up the namespaces:\n{log}")
    assert job.returncode == 0, log
    assert ref.returncode == 0, ref_err[-3000:]

    # one rank on each "host": two different network namespaces (neither the test's own), two addresses
    where = dict((int(m[0]), m[1:]) for m in
                 re.findall(r"rehearsal-rank=(\d+) host=(\S+) netns=(\S+) addr=(\S*)", out))
    assert sorted(where) == [0, 1], log
    own = os.readlink("/proc/self/ns/net")
    assert where[0][1] != where[1][1] and own not in (where[0][1], where[1][1]), where
    assert where[0][0] != where[1][0], where  # own hostnames too
    assert where[0][2] != where[1][2] and all(w[2] for w in where.values()), where

    # training traffic went over the veth: host B sent and received at least one full gradient per
    # step (allreduce of 2 ranks; Open MPI was given only btl tcp,self on that subnet)
    m = re.search(r"veth B rx_bytes=(\d+) tx_bytes=(\d+)", err)
    assert m, log
    res, reference = np.load(tmp_path / "mpi.npz"), np.load(tmp_path / "ref.npz")
    need = int(res["step"]) * res["grads0"].nbytes
    assert int(m[1]) > need and int(m[2]) > need, (m[0], need)

    assert_equivalent(res, reference, 2)
