"""The OpenMP setting the engine makes before torch loads (`limit_openmp_spinning`)."""

from __future__ import annotations

from teisup.embedded.engine import SPIN_COUNT, limit_openmp_spinning


def test_openmp_threads_spin_briefly_unless_the_user_chose() -> None:
    env: dict[str, str] = {}
    limit_openmp_spinning(env)
    assert env == {"GOMP_SPINCOUNT": SPIN_COUNT}
    mine = {"GOMP_SPINCOUNT": "300000"}
    limit_openmp_spinning(mine)
    assert mine == {"GOMP_SPINCOUNT": "300000"}
    policy = {"OMP_WAIT_POLICY": "ACTIVE"}
    limit_openmp_spinning(policy)
    assert policy == {"OMP_WAIT_POLICY": "ACTIVE"}  # a policy of the user's: no spin count of ours
