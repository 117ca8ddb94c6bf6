"""Child of tests/test_host_memory.py: page faults per call of a jitted gradient whose temp buffers
are ~70 MB, under the host allocator that `SIMU_JAX_HOST_ALLOCATOR` asks for (printed as JSON)."""

import json, resource, sys
from simu_jax.host_memory import configure_host_allocator, host_allocator
configure_host_allocator()
import jax, jax.numpy as jnp
k = jax.random.split(jax.random.key(0), 3)
w1, w2 = jax.random.normal(k[0], (256, 1024)) * 0.05, jax.random.normal(k[1], (1024, 256)) * 0.05
x = jax.random.normal(k[2], (8192, 256))
loss = lambda w1, w2: jnp.mean(jnp.tanh(jnp.tanh(x @ w1) @ w2) ** 2)  # [8192, 1024] activations: 32 MB each
g = jax.jit(jax.grad(loss, argnums=(0, 1)))
for _ in range(2):
    jax.block_until_ready(g(w1, w2))
faults = []
for _ in range(10):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(g(w1, w2))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
temp = g.lower(w1, w2).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"allocator": host_allocator(), "faults": faults, "temp_pages": temp // 4096}))
