"""The [islands, dp, ep] mesh: rank arithmetic, groups, and one-line refusals (moecpt.distributed.mesh)."""

import pytest

from moecpt.config import Recipe
from moecpt.distributed.mesh import Mesh, build_mesh
from moecpt.errors import MoecptError


def _recipe(**dist):
    moe = dict(num_experts=8, top_k=2)
    return Recipe.model_validate({"model": {"moe": moe}, "train": {"batch_size": 16}, "distributed": dist})


def test_coords_round_trip_and_groups_partition_the_world():
    m = Mesh(world=16, islands=2, ep=4)
    assert (m.island_size, m.dp) == (8, 2)
    for r in range(16):
        assert m.rank(*m.coords(r)) == r
    assert m.coords(13) == (1, 1, 1)
    assert m.ep_group(13) == [12, 13, 14, 15]
    assert m.expert_dp_group(13) == [9, 13]
    assert m.island_group(13) == list(range(8, 16))
    assert m.cross_island_group(13) == [5, 13]
    for kind, size in (("ep", 4), ("expert_dp", 2), ("island", 8), ("cross_island", 2)):
        groups = m.all_groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(16)), kind
        assert {len(g) for g in groups} == {size}, kind


def test_build_mesh_accepts_dividing_layouts():
    assert build_mesh(_recipe(expert_parallel=4), 8) == Mesh(8, 1, 4)
    assert build_mesh(_recipe(sync="diloco", local_steps=4, islands=2), 4) == Mesh(4, 2, 1)
    assert build_mesh(_recipe(sync="diloco", local_steps=4, islands=2, expert_parallel=2), 8) == Mesh(8, 2, 2)


@pytest.mark.parametrize("dist, world, needle", [
    (dict(expert_parallel=3), 6, "does not divide the model's 8 routed experts"),
    (dict(expert_parallel=4), 6, "does not divide the 6 ranks"),
    (dict(sync="diloco", local_steps=2, islands=3), 4, "islands=3 does not divide the 4 ranks"),
    (dict(sync="diloco", local_steps=2, expert_parallel=2), 4, "needs islands > 1"),
    (dict(), 3, "batch_size=16 does not split over 3 workers .* set train.batch_size to 15 or 18 .* "
     "divides 16: 1, 2, 4, 8, 16$"),
])
def test_build_mesh_refuses_in_one_line(dist, world, needle):
    with pytest.raises(MoecptError, match=needle) as e:
        build_mesh(_recipe(**dist), world)
    assert "\n" not in str(e.value)


def test_ep_needs_an_moe_model():
    with pytest.raises(MoecptError, match="needs an MoE model"):
        build_mesh(Recipe.model_validate({"distributed": {"expert_parallel": 2}}), 2)


@pytest.mark.parametrize("dist, needle", [
    (dict(islands=2), "needs sync = local-sgd"),
    (dict(sync="diloco", local_steps=2, islands=2, island_sync="diloco"), "choose 'ddp' or 'fsdp'"),
    (dict(island_sync="fsdp"), "only with islands > 1"),
])
def test_config_refuses_islands_without_an_outer_step(dist, needle):
    with pytest.raises(ValueError, match=needle):
        Recipe.model_validate({"distributed": dist})
