"""The library's thread pools (bitpack chunks, noise chunks) in forked children and at exit."""

import subprocess
import sys

# Runs in its own interpreter: a fork of the test runner would copy its threads and state,
# and a hang must cost a timeout, not the suite.
_SCRIPT = r"""
import os, sys, time
import numpy as np
import torch
from diffq_triton.codec import cpu_pool
from diffq_triton.ops import eager as eager_ops

torch.set_num_threads(2)  # both pools are used only with more than one thread


def work():
    starts = []
    with cpu_pool.cpu_threads():
        cpu_pool.run_chunks(8, 1, starts.extend)
    noise = eager_ops.draw_noise(3 * eager_ops.NOISE_CHUNK, 7, "gaussian", torch.device("cpu"))
    # Copied by numpy: a torch op of this size would run an OpenMP region, and GNU OpenMP
    # cannot start one in a child forked after the parent used it (that is not ours).
    return sorted(starts), noise.numpy().copy()


starts, noise = work()
assert cpu_pool._POOL.started and eager_ops._POOL.started
pid = os.fork()
if pid == 0:
    child_starts, child_noise = work()
    os._exit(0 if child_starts == starts and np.array_equal(child_noise, noise) else 1)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status) and 2)
    time.sleep(0.02)
os.kill(pid, 9)
sys.exit(3)
"""


def test_pools_work_in_forked_child_and_exit_cleanly():
    """A child forked after the pools ran gets working pools; the parent then exits at once.

    Exit codes: 2 the child computed something else, 3 the child hung on a pool whose
    threads stayed behind in the parent. A hang at interpreter exit (pool threads that
    cannot be joined) shows as the timeout.
    """
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
