"""`simu-jax demo`: the whole story on the embedded synthetic benchmark, on a CPU, in minutes.

1. generate the benchmark (fictitious people + general facts) and train a BPE tokenizer;
2. fine-tune a tiny LLaMA on everything (the target) and on retain only (the reference);
3. attribute MLP neurons (integrated gradients) on forget and retain;
4. unlearn with fo_graddiff (AdamW, all params), so_graddiff (SOUL's Sophia, all params),
   simu_graddiff (Sophia on attention + critical neurons), simu_newton (trust-region Newton with
   the exact Hessian on the same subset) and simu_ggn (trust-region Gauss-Newton, PSD);
5. evaluate every model (TOFU-style metrics, forget quality against the reference) and write
   the report (markdown table + plots).

Re-running reuses the fine-tuned models (and finished unlearning runs) in --out.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from simu_jax.base import ArgumentParser
from simu_jax.config import load_config
from simu_jax.data import DataSpec, SyntheticConfig
from simu_jax.models.spec import ModelSpec

__all__ = ["FULL", "METHOD_SETTINGS", "QUICK", "DemoSize", "demo_data", "evaluate_model", "finetune_model",
           "run_demo", "unlearn_method"]

# Per-method step settings, from a sweep on this benchmark (20 steps, batch 4; /tmp sweep noted in
# the README "Demo"). Sophia runs SOUL's preset (linear warmup + decay, clipping, gamma 2,
# per-sequence loss mean): simu_graddiff at 3e-3 and so_graddiff at 2e-3 reach a forget NLL of
# 16-19 nats with retain NLL 1.1-1.4 (at 1e-2 / 5e-3 the retain NLL triples). Newton-type: a small
# damping, so the step is the quadratic model's (with damping 1, (H + I)^-1 is within 0.99
# cosine of the identity here); the trust region, adapted by the ratio test, sets the length.
METHOD_SETTINGS = {
    "fo_graddiff": {"optim.learning_rate": 3e-4},
    "so_graddiff": {"optim.learning_rate": 2e-3},
    "simu_graddiff": {"optim.learning_rate": 3e-3},
    "simu_newton": {"optim.trust_radius": 0.5, "optim.damping": 1e-3},
    "simu_ggn": {"optim.trust_radius": 0.25, "optim.damping": 1e-3},
}


@dataclasses.dataclass(frozen=True)
class DemoSize:
    num_people: int
    num_general: int
    epochs: int
    unlearn_steps: int
    eval_limit: int | None
    max_new_tokens: int


FULL = DemoSize(num_people=40, num_general=40, epochs=25, unlearn_steps=20, eval_limit=None, max_new_tokens=24)
QUICK = DemoSize(num_people=10, num_general=10, epochs=20, unlearn_steps=4, eval_limit=8, max_new_tokens=12)


def demo_data(size: DemoSize) -> DataSpec:
    return DataSpec(benchmark="synthetic", max_length=128,
                    synthetic=SyntheticConfig(seed=0, num_people=size.num_people, num_general=size.num_general))


def finetune_model(out: Path, split: str, size: DemoSize, tokenizer: str | None, quiet: bool) -> Path:
    from simu_jax.finetune import FinetuneConfig, run_finetune
    from simu_jax.runio import is_complete

    label = "target" if split == "full" else "retain"
    if is_complete(out):
        print(f"[demo] reusing {label} model in {out / 'model'}", file=sys.stderr)
        return out / "model"
    cfg = FinetuneConfig(
        model=ModelSpec(config=dict(model_type="llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                                    num_attention_heads=4, num_key_value_heads=4)),
        data=demo_data(size), split=split, tokenizer=tokenizer, batch_size=16, learning_rate=3e-3,
        epochs=size.epochs, checkpoint_every=10_000, eval_every=0)
    print(f"[demo] fine-tuning the {label} model", file=sys.stderr)
    result = run_finetune(cfg, out, overwrite=out.exists(), quiet=quiet)
    acc = {k: round(result[k]["accuracy"], 3) for k in ("forget", "retain") if k in result}
    print(f"[demo] {label}: answer-token accuracy {acc} in {result['wall_time_s']} s", file=sys.stderr)
    return out / "model"


def unlearn_method(out: Path, method: str, target: Path, reference: Path, size: DemoSize, quiet: bool,
             mask_path: Path | None = None, evaluate_only: bool = False) -> Path:
    from simu_jax.runio import is_complete
    from simu_jax.unlearn import UnlearnConfig, run_unlearn

    if is_complete(out):
        print(f"[demo] reusing {out}", file=sys.stderr)
        return out
    overrides = [f"{k}={v}" for k, v in METHOD_SETTINGS.get(method, {}).items()]
    cfg = load_config(UnlearnConfig, None, overrides)
    cfg = dataclasses.replace(
        cfg, model=ModelSpec(path=str(target)), reference=str(reference), data=demo_data(size), method=method,
        steps=size.unlearn_steps, batch_size=4,
        eval=dataclasses.replace(cfg.eval, limit=size.eval_limit, max_new_tokens=size.max_new_tokens,
                                 every=max(1, size.unlearn_steps // 5)),
        attribution=dataclasses.replace(cfg.attribution, mask_path=str(mask_path) if mask_path else None),
    )
    print(f"[demo] {method}", file=sys.stderr)
    run_unlearn(cfg, out, overwrite=out.exists(), quiet=quiet)
    return out


def evaluate_model(out: Path, label: str, model_dir: Path, reference: Path, size: DemoSize) -> Path:
    """Evaluate an existing model (the target before unlearning, the reference) as a report row."""
    from simu_jax.runio import is_complete, mark_complete, prepare_output_dir
    from simu_jax.unlearn import UnlearnConfig, evaluate_run, prepare

    if is_complete(out):
        return out
    cfg = load_config(UnlearnConfig, None, [])
    cfg = dataclasses.replace(cfg, model=ModelSpec(path=str(model_dir)), reference=str(reference), data=demo_data(size),
                              method="simu_graddiff",
                              eval=dataclasses.replace(cfg.eval, limit=size.eval_limit,
                                                       max_new_tokens=size.max_new_tokens))
    prepare_output_dir(out, overwrite=out.exists())
    prep = prepare(cfg)
    cfg = dataclasses.replace(cfg, method=label)  # the row's name in the report
    evaluate_run(cfg, prep, prep.params, out)
    mark_complete(out)
    return out


def run_demo(out: Path, quick: bool = False, quiet: bool = False) -> Path:
    from simu_jax.evaluate.report import format_table, load_run, write_report

    size = QUICK if quick else FULL
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    target = finetune_model(out / "target", "full", size, None, quiet)
    reference = finetune_model(out / "retain", "retain", size, str(target), quiet)
    runs = [evaluate_model(out / "runs" / "target", "target (before)", target, reference, size),
            evaluate_model(out / "runs" / "retain_only", "retain-only (reference)", reference, reference, size)]
    runs.append(unlearn_method(out / "runs" / "simu_graddiff", "simu_graddiff", target, reference, size, quiet))
    mask = out / "runs" / "simu_graddiff" / "mask"
    for method in ("simu_newton", "simu_ggn", "so_graddiff", "fo_graddiff"):
        runs.append(unlearn_method(out / "runs" / method, method, target, reference, size, quiet,
                             mask_path=mask if method.startswith("simu") else None))
    report = write_report(runs, out / "report")
    print(format_table([load_run(r) for r in runs]))
    print(f"\n[demo] report: {report} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return report


def cli_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="simu-jax demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory (default: ./demo_out)")
    p.add_argument("--quick", action="store_true", help="a reduced benchmark and few steps (about 2 minutes)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    run_demo(Path(args.out), quick=args.quick, quiet=args.quiet)
    return 0
