"""Device meshes and sharding rules (:mod:`.mesh`), several processes and batch placement
(:mod:`.distributed`), and Hugging Face directories read straight into a mesh's shardings and
written back from them (:mod:`.hf_io`). The memory model of a run counts the engine's trees, so
it sits above the engine: :mod:`simu_jax.memory`.

Every public name of the three modules is importable from here
(``from simu_jax.sharding import place_batch``). The Unlearner's placement on a mesh lives
with the Unlearner (``engine.build_unlearner`` / ``engine.shard_unlearner``): this package
does not import the engine.
"""

from simu_jax.sharding import distributed, hf_io, mesh
from simu_jax.sharding.distributed import *  # noqa: F401,F403 - each module's __all__ is the list
from simu_jax.sharding.hf_io import *  # noqa: F401,F403
from simu_jax.sharding.mesh import *  # noqa: F401,F403

__all__ = [*mesh.__all__, *distributed.__all__, *hf_io.__all__]
