"""Device meshes and sharding rules (:mod:`.mesh`), several processes and batch placement
(:mod:`.distributed`), a memory model (:mod:`.memory`), and Hugging Face directories read
straight into a mesh's shardings and written back from them (:mod:`.hf_io`).

Every public name of the four modules is importable from here
(``from simu_jax.sharding import place_batch``). The Unlearner's placement on a mesh lives
with the Unlearner (``engine.build_unlearner`` / ``engine.shard_unlearner``): this package
does not import the engine.
"""

from simu_jax.sharding.distributed import (any_process, initialize_distributed, is_main_process, place_batch,
                                           place_like, process_index_slice, process_slice, to_host)
from simu_jax.sharding.hf_io import load_pretrained, save_pretrained, source_dtype
from simu_jax.sharding.memory import (LLAMA2_7B, OLMO_1B, memory_estimate, memory_table, param_counts, per_device,
                                      print_memory_table)
from simu_jax.sharding.mesh import (DEFAULT_RULES, MESH_AXES, batch_sharding, batch_shardings, constrain_like,
                                    device_put_tree, logical_axes, logical_constraint, logical_to_spec, make_mesh,
                                    mask_partition_spec, mesh_description, opt_state_shardings, param_partition_specs,
                                    param_shardings, parse_mesh_spec, replicated, shard_mask, shard_opt_state,
                                    shard_params)

__all__ = [
    "MESH_AXES",
    "DEFAULT_RULES",
    "parse_mesh_spec",
    "make_mesh",
    "mesh_description",
    "replicated",
    "logical_axes",
    "logical_to_spec",
    "param_partition_specs",
    "param_shardings",
    "device_put_tree",
    "shard_params",
    "opt_state_shardings",
    "shard_opt_state",
    "mask_partition_spec",
    "shard_mask",
    "batch_sharding",
    "batch_shardings",
    "logical_constraint",
    "constrain_like",
    "initialize_distributed",
    "is_main_process",
    "process_slice",
    "process_index_slice",
    "place_batch",
    "to_host",
    "place_like",
    "any_process",
    "param_counts",
    "memory_estimate",
    "per_device",
    "memory_table",
    "print_memory_table",
    "LLAMA2_7B",
    "OLMO_1B",
    "load_pretrained",
    "save_pretrained",
    "source_dtype",
]
