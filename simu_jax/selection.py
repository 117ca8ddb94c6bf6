"""Which parameters an unlearning method trains, as one mechanism for FO, SO, SIMU and ablations.

`TrainableSpec(attention, mlp, rest)`:
  attention  'full' (q/k/v/o) | 'frozen'
  mlp        'masked' (down_proj rows of the selected neurons) | 'down' (all of down_proj)
             | 'full' (gate/up/down) | 'frozen'
  rest       'frozen' | 'full' (embeddings, norms, lm_head)

Only the trainable subset is differentiated: `Partition.split` gives (trainable, frozen);
the loss closes over `frozen`. SIMU's neuron rows are a compact [L, K, H] array (K = the
largest per-layer count) gathered from `down_proj`; their kernel rows are zeroed in the
frozen params and the model adds `a[..., idx] @ rows` (see `models.transformer`), so the
backward pass computes K rows of weight gradient per layer instead of I, and the optimizer
and curvature state hold K rows. Padding slots (layers with fewer than K neurons) are
masked out (`row_valid`) and contribute nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class TrainableSpec:
    attention: str = "full"
    mlp: str = "masked"
    rest: str = "frozen"

    def __post_init__(self):
        for name, allowed in (("attention", ("full", "frozen")), ("mlp", ("masked", "down", "full", "frozen")),
                              ("rest", ("frozen", "full"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"trainable.{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")


ALL_PARAMS = TrainableSpec(attention="full", mlp="full", rest="full")
SIMU = TrainableSpec(attention="full", mlp="masked", rest="frozen")


def _is_trainable(path: tuple[str, ...], spec: TrainableSpec) -> bool:
    if path[:2] == ("model", "layers") and path[2] == "self_attn" and path[3] in ATTENTION:
        return spec.attention == "full"
    if path[:3] == ("model", "layers", "mlp"):
        return spec.mlp == "full" or (spec.mlp == "down" and path[3] == "down_proj")
    return spec.rest == "full"


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def set_path(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of `tree` with `path` replaced (shallow copies along the path only)."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}


def get_path(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


DOWN = ("model", "layers", "mlp", "down_proj", "kernel")


def gather_rows(down, index, valid):
    """down [L, I, H] -> the rows `index` [L, K] as [L, K, H]; padding slots (not `valid`) are 0."""
    rows = jnp.take_along_axis(down, index[..., None], axis=1)
    return jnp.where(valid[..., None], rows, 0).astype(down.dtype)


def scatter_rows(down, index, valid, rows):
    """down [L, I, H] with rows [L, K, H] written at rows `index` [L, K] where `valid`.

    Padding slots are redirected to the out-of-bounds row I and dropped (`mode="drop"`), so
    they write nothing: their index (0) may repeat a real selected row, and a scatter with
    duplicate indices keeps an unspecified one of the values.
    """
    safe = jnp.where(valid, index, down.shape[1])
    return jax.vmap(lambda k, i, r: k.at[i].set(r, mode="drop"))(down, safe, rows.astype(down.dtype))


_scatter_rows_jit = jax.jit(scatter_rows)


class Partition:
    """Split params into a trainable subset and the frozen rest, and put them back together."""

    def __init__(self, params: dict, spec: TrainableSpec, selected: np.ndarray | None = None):
        if spec.mlp == "masked" and selected is None:
            raise ValueError("trainable.mlp='masked' needs a neuron mask")
        self.spec = spec
        self.paths = [p for p, _ in _flatten(params) if _is_trainable(p, spec)]
        self.row_index = self.row_valid = None
        if spec.mlp == "masked":
            selected = np.asarray(selected, bool)
            if selected.sum() == 0:
                raise ValueError("the neuron mask selects zero neurons (lower the threshold t or use top_fraction)")
            counts = selected.sum(axis=1)
            k = int(counts.max())
            index = np.zeros((selected.shape[0], k), np.int32)
            valid = np.zeros((selected.shape[0], k), bool)
            for layer, row in enumerate(selected):
                ids = np.flatnonzero(row)
                index[layer, : len(ids)] = ids
                valid[layer, : len(ids)] = True
            self.row_index, self.row_valid = jnp.asarray(index), jnp.asarray(valid)

    @staticmethod
    def leaf_key(path):
        return "/".join(path)

    # Hashable by structure (spec, trainable paths, row count), not by the mask's values, so a
    # jit-compiled step keyed on the partition is reused across masks of the same shape; the
    # row index/validity arrays are passed to the step as traced arguments (`rows`).
    def _static(self):
        k = None if self.row_index is None else tuple(self.row_index.shape)
        return (self.spec, tuple(self.paths), k)

    def __hash__(self):
        return hash(self._static())

    def __eq__(self, other):
        return isinstance(other, Partition) and self._static() == other._static()

    @property
    def rows(self) -> tuple[jax.Array, jax.Array] | None:
        """(row_index [L, K], row_valid [L, K]) of the trained neuron rows, or None."""
        return None if self.row_index is None else (self.row_index, self.row_valid)

    def take(self, params: dict, rows=None) -> dict:
        """The trainable flat dict {'a/b/kernel': array, 'down_rows': [L, K, H]} read from `params`
        (the leaves themselves, not copies; `down_rows` gathered, zero in padding slots)."""
        trainable = {self.leaf_key(p): get_path(params, p) for p in self.paths}
        if self.row_index is not None:
            index, valid = rows if rows is not None else self.rows
            trainable["down_rows"] = gather_rows(get_path(params, DOWN), index, valid)
        return trainable

    def frozen_from(self, params: dict, down=None) -> dict:
        """`params` with the trainable leaves set to None and, if given, down_proj replaced by `down`
        (down_proj with the trained rows zeroed). Everything else aliases `params`."""
        frozen = params if down is None else set_path(params, DOWN, down)
        for p in self.paths:  # drop trainable leaves from the frozen tree (they are replaced anyway)
            frozen = set_path(frozen, p, None)
        return frozen

    def zero_rows(self, down, rows=None):
        """down_proj [L, I, H] with the trained rows set to 0 (their values live in `down_rows`)."""
        index, valid = rows if rows is not None else self.rows
        return scatter_rows(down, index, valid, jnp.zeros(index.shape + down.shape[2:], down.dtype))

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen). Trainable is a flat dict {'a/b/kernel': array, 'down_rows': [L,K,H]}."""
        down = self.zero_rows(get_path(params, DOWN)) if self.row_index is not None else None
        return self.take(params), self.frozen_from(params, down)

    def combine(self, trainable: dict, frozen: dict, rows=None) -> tuple[dict, dict]:
        """(full params for `apply`, extra `apply` kwargs) from the two halves.

        `rows` = (row_index, row_valid); defaults to this partition's own (pass them explicitly
        inside a jit-compiled function so they are traced, not baked in as constants).
        """
        params = frozen
        for p in self.paths:
            params = set_path(params, p, trainable[self.leaf_key(p)])
        kwargs = {}
        if self.row_index is not None:
            index, valid = rows if rows is not None else self.rows
            values = jnp.where(valid[..., None], trainable["down_rows"], 0)
            kwargs["mlp_rows"] = (index, values)
        return params, kwargs

    def merge_back(self, trainable: dict, base: dict, rows=None, scatter=None) -> dict:
        """Full params: `base` (the frozen tree, or any full tree) with the trained values written in.

        The selected down_proj rows are scattered back into `base`'s down_proj (which may have
        them zeroed, as the frozen tree does), so no copy of the original params is needed.
        `scatter` defaults to a jitted :func:`scatter_rows`; an engine on a mesh passes one
        with `out_shardings` so the merged down_proj keeps its layout.
        """
        params = base
        for p in self.paths:
            params = set_path(params, p, trainable[self.leaf_key(p)])
        if self.row_index is not None:
            index, valid = rows if rows is not None else self.rows
            scatter = scatter if scatter is not None else _scatter_rows_jit
            params = set_path(params, DOWN, scatter(get_path(base, DOWN), index, valid, trainable["down_rows"]))
        return params

    def optimizer_mask(self, trainable: dict, rows=None) -> dict | None:
        """Element-wise trainable mask for the optimizer (only padding row slots are masked)."""
        if self.row_index is None:
            return None
        valid = (rows if rows is not None else self.rows)[1]
        return {k: (valid[..., None] if k == "down_rows" else True) for k in trainable}


def count_trainable(partition: Partition, trainable: dict) -> int:
    """Number of trainable scalars (padding row slots excluded)."""
    total = 0
    for k, v in trainable.items():
        if k == "down_rows":
            total += int(partition.row_valid.sum()) * v.shape[-1]
        else:
            total += int(v.size)
    return total
