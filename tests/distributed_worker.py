"""One process of the two-process data-parallel test (see test_distributed.py).

    python distributed_worker.py PROCESS_ID COORDINATOR_PORT OUT.npz

Every process holds 2 CPU devices; the global mesh spans the 4 devices of both. Each
process feeds its own half of the batch with `jax.make_array_from_process_local_data`;
the parameters are replicated with `filterjax.filter_shard`; three training steps run
through `filterjax.filter_jit`.
"""

from __future__ import annotations

import sys

import jax
from jax_features import make_mesh, set_cpu_device_count  # noqa: E402

set_cpu_device_count(2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from distributed_common import BATCH, STEPS, init_model, make_batch, train_step  # noqa: E402

import filterjax as fj  # noqa: E402


def main() -> None:
    process_id, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = make_mesh((4,), ("data",), "auto")
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    model = fj.filter_shard(init_model(), replicated)
    x, y = make_batch()
    half = BATCH // 2
    local = slice(process_id * half, (process_id + 1) * half)
    x = jax.make_array_from_process_local_data(data, x[local], (BATCH, x.shape[1]))
    y = jax.make_array_from_process_local_data(data, y[local], (BATCH, y.shape[1]))

    step = fj.filter_jit(train_step)
    losses = []
    for _ in range(STEPS):
        model, loss = step(model, x, y)
        losses.append(float(loss))
    assert model["activation"] == "tanh"  # the static leaf came through untouched
    assert model["w1"].sharding.is_equivalent_to(replicated, 2)
    arrays = {k: np.asarray(v) for k, v in model.items() if k != "activation"}
    np.savez(out_path, losses=np.array(losses), **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
