"""The jit-compiled fine-tuning step: AdamW with warmup + cosine decay and global-norm clipping,
and exact gradient accumulation over ``[grad_accum, B, T]`` micro-batches (see
:func:`make_train_step`). Used by :mod:`simu_jax.finetune`; cached per (model graph, optimizer
settings) so runs in one process (resume, tests, sweeps) share compiled steps.
"""

from __future__ import annotations

import functools

def make_optimizer(key: tuple):
    """AdamW + warmup/cosine (+ global-norm clipping) from :func:`simu_jax.finetune.optimizer_key`'s tuple.

    Weight decay applies to linear kernels only (not embeddings or norm weights).
    """
    import jax
    import optax

    lr, min_lr_ratio, (b1, b2), eps, weight_decay, max_grad_norm, total, warmup = key
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=lr * min_lr_ratio,
    )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)

    chain = []
    if max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*chain), schedule


@functools.lru_cache(maxsize=8)
def compiled_steps(graphdef, opt_key: tuple, donate: bool):
    """(optimizer, schedule, train_step, eval_step), cached so that runs with the same model
    and optimizer settings in one process (resume, tests, sweeps) share compiled steps."""
    optimizer, schedule = make_optimizer(opt_key)
    train_step, eval_step = make_steps(graphdef, optimizer, schedule, donate)
    return optimizer, schedule, train_step, eval_step


def global_norm(tree):
    import jax
    import jax.numpy as jnp

    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(sums, optimizer, schedule, donate: bool = False, out_shardings=None):
    """A jit-compiled optimizer step with exact gradient accumulation.

    ``sums(params, batch) -> (loss_sum, (token_count, hits))`` on one micro-batch ([B, T]
    leaves). The step takes ``batch`` with leaves ``[A, B, T]``: gradients of the summed
    loss are accumulated over the A micro-batches in float32 (a ``lax.scan``; none when
    A == 1) and divided by the total token count, which is exactly the gradient of the
    token-mean loss over all A*B rows. ``loss_scale`` multiplies the loss (1.0; NaN
    injection in tests); ``step`` (0-based) only feeds the logged learning rate.
    ``out_shardings`` (``(params, opt_state, metrics)`` shardings) pins a sharded step's
    outputs to its inputs' layout.
    """
    import jax
    import jax.numpy as jnp
    import optax

    grad_fn = jax.value_and_grad(sums, has_aux=True)

    def train_step(params, opt_state, batch, loss_scale, step):
        if jax.tree.leaves(batch)[0].shape[0] == 1:
            (tot, (cnt, hits)), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            def micro(carry, mb):
                g_acc, tot, cnt, hits = carry
                (loss, (count, h)), g = grad_fn(params, mb)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, tot + loss, cnt + count, hits + h), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            init = (zeros, jnp.float32(0), jnp.int32(0), jnp.int32(0))
            (grads, tot, cnt, hits), _ = jax.lax.scan(micro, init, batch)
        denom = jnp.maximum(cnt, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g * (loss_scale / denom), grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"nll": tot / denom * loss_scale, "grad_norm": global_norm(grads),
                   "accuracy": hits / denom, "tokens": cnt, "lr": schedule(step)}
        return params, opt_state, metrics

    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(train_step, donate_argnums=(0, 1) if donate else (), **kw)


def make_steps(graphdef, optimizer, schedule, donate: bool, out_shardings=None):
    """(train_step, eval_step) for the causal LM ``graphdef`` (answer-token NLL)."""
    import jax
    import jax.numpy as jnp

    from simu_jax.losses import sequence_nll, token_accuracy
    from simu_jax.models import apply

    def sums(params, mb):
        logits = apply(graphdef, params, mb["input_ids"], mb["attention_mask"])
        total, count = sequence_nll(logits, mb["labels"])
        hits, _ = token_accuracy(logits, mb["labels"])
        return jnp.sum(total), (jnp.sum(count), hits)

    def eval_step(params, batch):
        total, (count, hits) = sums(params, batch)
        return total, count, hits

    return make_train_step(sums, optimizer, schedule, donate, out_shardings), jax.jit(eval_step)
