import jax.numpy as jnp

import filterjax as fj


def test_backend_in_use_is_the_one_requested(backend):
    assert fj.backend() == backend


def test_partition_round_trip_through_active_core():
    tree = {"w": jnp.ones(3), "act": "relu", "n": [1, None, 2.0]}
    dynamic, key = fj._backend.flatten_split(tree)
    assert len(dynamic) == 1 and dynamic[0] is tree["w"]
    rebuilt = fj._backend.rebuild(key, dynamic)
    assert rebuilt["act"] == "relu" and rebuilt["n"] == [1, None, 2.0]
    assert rebuilt["w"] is tree["w"]
