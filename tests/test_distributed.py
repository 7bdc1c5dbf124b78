"""Two processes on 127.0.0.1 with JAX's distributed runtime and gloo CPU collectives.

Each runs tests/distributed_worker.py: a data-parallel training step through filter_jit,
inputs placed by filter_shard and jax.make_array_from_process_local_data. The result must
equal the same steps computed here in one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import filterjax as fj
import filterjax._backend as fj_backend

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from distributed_common import STEPS, init_model, make_batch, train_step  # noqa: E402

TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_reference():
    model = init_model()
    x, y = make_batch()
    losses = []
    step = fj.filter_jit(train_step)
    for _ in range(STEPS):
        model, loss = step(model, x, y)
        losses.append(float(loss))
    return model, losses


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path, backend):
    port = _free_port()
    package_root = str(Path(fj.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root, str(HERE), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env["FILTERJAX_BACKEND"] = fj_backend.backend()
    env.pop("XLA_FLAGS", None)
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "distributed_worker.py"), str(i), str(port), str(outs[i])],
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            cwd=str(HERE),
        )
        for i in range(2)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], f"worker exit codes {codes}\n" + "\n----\n".join(
        t[-3000:] for t in texts
    )

    model, losses = _single_process_reference()
    for out in outs:
        got = np.load(out)
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
        for name in ("w1", "b1", "w2"):
            np.testing.assert_allclose(got[name], np.asarray(model[name]), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]  # it trained
