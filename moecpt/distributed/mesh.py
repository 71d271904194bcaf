"""The device mesh of a job: islands × data parallel × expert parallel, as pure rank arithmetic.

A world of ``W`` ranks is laid out as ``[islands M, dp D, ep E]`` (row-major, so the ranks of an expert-parallel
group are consecutive and land on one node first, where the all-to-all is cheapest)::

    W = M · D · E          island size S = D · E
    rank r = i · S + d · E + e       (island i, data-parallel index d, expert-parallel index e)

* **EP group** (``i``, ``d`` fixed): the ``E`` ranks that split each MoE layer's routed experts and exchange tokens
  by all-to-all (Lepikhin et al., GShard, arXiv 2006.16668; Fedus et al., Switch Transformer, arXiv 2101.03961,
  Sec. 2.2). As in torchtitan and Megatron-Core, EP *borrows* from data parallelism: every rank still reads its own
  rows of the batch, so the non-expert parameters are data parallel over all ``S`` ranks of the island.
* **Expert-DP group** (``i``, ``e`` fixed): the ``D`` ranks that hold the same expert shard; expert gradients are
  averaged over it.
* **Island** (``i`` fixed): the ``S`` ranks that synchronise every step (DDP or FSDP2); with ``M = 1`` the world.
* **Across islands** (``d``, ``e`` fixed): the ``M`` ranks at the same place in every island; the local-SGD family's
  outer step (every ``H`` steps) communicates over these groups, so its ``K = M`` (DiLoCo across clusters with
  ordinary data parallelism inside each: Douillard et al., arXiv 2311.08105; Jaghouar et al., OpenDiLoCo,
  arXiv 2407.07852).

Nothing here touches ``torch.distributed``: the strategies build their process groups from these rank lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from moecpt.config import Recipe, SyncKind
from moecpt.errors import MoecptError
from moecpt.train.parallel import check_batch_split

LOCAL_KINDS = (SyncKind.LOCAL_SGD, SyncKind.SLOWMO, SyncKind.DILOCO)


@dataclass(frozen=True)
class Mesh:
    """The ``[islands, dp, ep]`` layout of ``world`` ranks (module docstring). Build it with :func:`build_mesh`,
    which checks it against the recipe."""

    world: int
    islands: int = 1
    ep: int = 1

    @property
    def island_size(self) -> int:
        """S = D · E ranks per island."""
        return self.world // self.islands

    @property
    def dp(self) -> int:
        """D: data-parallel replicas of each expert shard inside one island."""
        return self.island_size // self.ep

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``rank`` -> ``(island, dp_index, ep_index)``."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside a world of {self.world}")
        island, local = divmod(rank, self.island_size)
        d, e = divmod(local, self.ep)
        return island, d, e

    def rank(self, island: int, d: int, e: int) -> int:
        """Inverse of :meth:`coords`."""
        return island * self.island_size + d * self.ep + e

    def ep_group(self, rank: int) -> list[int]:
        """The ranks that split the experts with ``rank`` (consecutive, ``E`` of them, ``rank`` included)."""
        i, d, _ = self.coords(rank)
        return [self.rank(i, d, e) for e in range(self.ep)]

    def expert_dp_group(self, rank: int) -> list[int]:
        """The ranks that hold the same expert shard as ``rank`` inside its island (``D`` of them)."""
        i, _, e = self.coords(rank)
        return [self.rank(i, d, e) for d in range(self.dp)]

    def island_group(self, rank: int) -> list[int]:
        """The ranks of ``rank``'s island (``S`` of them): data parallel every step."""
        i, _, _ = self.coords(rank)
        return list(range(i * self.island_size, (i + 1) * self.island_size))

    def cross_island_group(self, rank: int) -> list[int]:
        """The rank at ``rank``'s place in every island (``M`` of them): the outer step's group."""
        _, d, e = self.coords(rank)
        return [self.rank(i, d, e) for i in range(self.islands)]

    def all_groups(self, kind: str) -> list[list[int]]:
        """Every group of one kind (``"ep"``, ``"expert_dp"``, ``"island"``, ``"cross_island"``), each once, in
        rank order: ``torch.distributed.new_group`` must be called by every rank for every group in the same
        order."""
        fn = {"ep": self.ep_group, "expert_dp": self.expert_dp_group, "island": self.island_group,
              "cross_island": self.cross_island_group}[kind]
        seen: list[list[int]] = []
        for r in range(self.world):
            g = fn(r)
            if g not in seen:
                seen.append(g)
        return seen


def check_expert_split(recipe: Recipe) -> None:
    """Refuse, in one line, ``distributed.expert_parallel`` on a dense model or one whose routed experts it does not
    divide (whatever the world size: part of :func:`build_mesh`, and asked first by the runtime)."""
    ep, moe = recipe.distributed.expert_parallel, recipe.model.moe
    if ep == 1:
        return
    if moe is None:
        raise MoecptError(f"distributed.expert_parallel={ep} needs an MoE model; the recipe's model has no "
                          "[model.moe] (set expert_parallel = 1)")
    if moe.num_experts % ep:
        raise MoecptError(f"distributed.expert_parallel={ep} does not divide the model's {moe.num_experts} routed "
                          f"experts; choose a divisor of {moe.num_experts}")


def build_mesh(recipe: Recipe, world: int) -> Mesh:
    """The mesh of ``recipe.distributed`` on ``world`` ranks, checked against the model and the batch.

    Raises:
        MoecptError (one line, saying how to fix it): the islands do not divide the world; expert parallelism does
            not divide an island or the model's routed experts, or is asked of a dense model; EP with a local-SGD
            family sync but no islands (each rank would be its own worker with different experts); the batch does
            not split over the ranks that read it.
    """
    d = recipe.distributed
    if world < 1:
        raise MoecptError(f"a world of {world} ranks: give at least 1")
    if world % d.islands:
        raise MoecptError(f"distributed.islands={d.islands} does not divide the {world} ranks; launch a multiple of "
                          f"{d.islands} ranks or change islands")
    island = world // d.islands
    if d.expert_parallel > 1:
        check_expert_split(recipe)
        if island % d.expert_parallel:
            where = "an island" if d.islands > 1 else "the job"
            raise MoecptError(f"distributed.expert_parallel={d.expert_parallel} does not divide the {island} ranks "
                              f"of {where}; launch a multiple of {d.expert_parallel} ranks per island, or choose an "
                              f"expert_parallel that divides both {island} and the model's experts")
        if d.sync in LOCAL_KINDS and d.islands == 1:
            raise MoecptError(f"distributed.expert_parallel={d.expert_parallel} with sync = {d.sync.value!r} needs "
                              "islands > 1 (EP inside an island, the outer step across islands)")
    check_batch_split(recipe.train.batch_size, world)
    return Mesh(world=world, islands=d.islands, ep=d.expert_parallel)
