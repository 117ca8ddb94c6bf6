"""experiments/paper/*_unlearn.yaml: the paper's unlearning runs plan offline from a config.json alone.

For each config, every mesh and every method command its header documents is dry-run through
the CLI (`simu-jax unlearn --dry-run`, HF_HUB_OFFLINE=1, model.path = the config-only copy in
experiments/paper/models/): exit 0, the mesh and method printed, nothing written, and the peak
equal to `memory.per_device(memory_estimate(...))` computed here from memory.PRESETS. The
config-only copies have PRESETS' shapes. A dry run refuses what the run's layout check refuses.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import jax
import pytest

from simu_jax import memory as M
from simu_jax.cli import main
from simu_jax.engine import StepSettings, get_method
from simu_jax.models import ModelConfig, abstract_model, split_params
from simu_jax.optim import OptimSpec

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "paper"
GIB = 2**30

# what each config must say, restated here so that the estimate below does not read the plan's inputs
CONFIGS = {
    "llama2_7b_tofu_unlearn.yaml": dict(model="llama-2-7b-chat-hf", preset="LLaMA-2-7B", benchmark="tofu",
                                        meshes={"fsdp=8", "fsdp=16"}, batch_size=16, seq_len=512, remat="full",
                                        attribution_batch_size=16, steps=125),
    "olmo1b_lume_unlearn.yaml": dict(model="olmo-1b-0724-hf", preset="OLMo-1B", benchmark="lume",
                                     meshes={"fsdp=8", "fsdp=16", "data=2,fsdp=8"}, batch_size=16, seq_len=512,
                                     remat="dots", attribution_batch_size=16, steps=170),
}
# the configs' optim keys (SOUL's trainer-side values); the methods' own --set values go on top
OPTIM = dict(schedule="linear", grad_clip_norm=1.0, weight_decay=0.1, weight_decay_mask="no_norm_bias")
METHODS = {"fo_graddiff", "so_graddiff", "simu_graddiff", "simu_npo", "simu_newton", "simu_ggn", "simu_influence"}
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def header(name: str) -> str:
    return "\n".join(line for line in (PAPER / name).read_text().splitlines() if line.startswith("#"))


def documented_meshes(name: str) -> set[str]:
    return set(re.findall(r"--mesh ([\w=,-]+)", header(name))) - {"MESH"}


def documented_methods(name: str) -> dict[str, list[str]]:
    """method -> its --set overrides, from the header's `simu-jax unlearn $C ...` lines."""
    out = {}
    for line in header(name).splitlines():
        line = line.lstrip("# ")
        if not line.startswith("simu-jax unlearn $C"):
            continue
        tokens = shlex.split(line.split("  #")[0])
        sets = tokens[tokens.index("--set") + 1:] if "--set" in tokens else []
        method = next((s.split("=", 1)[1] for s in sets if s.startswith("method=")), "simu_graddiff")
        out[method] = sets
    return out


def dry_run(capsys, tmp_path, name: str, *overrides: str, flags=()) -> tuple[int, str, str]:
    spec = CONFIGS[name]
    code = main(["unlearn", "--config", str(PAPER / name), "--dry-run", "--out", str(tmp_path / "never"), *flags,
                 "--set", f"model.path={PAPER / 'models' / spec['model']}", *overrides])
    out, err = capsys.readouterr()
    assert not (tmp_path / "never").exists()
    return code, out, err


def expected_peak(name: str, method: str, mesh: str, **optim) -> int:
    spec = CONFIGS[name]
    masked = get_method(method).trainable.mlp == "masked"
    est = M.memory_estimate(M.PRESETS[spec["preset"]], method, batch_size=spec["batch_size"], seq_len=spec["seq_len"],
                            dtype="float32", compute_dtype="bfloat16", remat=spec["remat"],
                            attribution_batch_size=spec["attribution_batch_size"] if masked else None,
                            attribution_steps=3, settings=StepSettings(optim=OptimSpec(**{**OPTIM, **optim}),
                                                                  total_steps=spec["steps"]))
    return M.per_device(est, mesh)["peak"]


def peak_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip().startswith("peak ")]
    assert len(lines) == 1, out
    return lines[0]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name, preset", [("llama-2-7b-chat-hf", "LLaMA-2-7B"), ("olmo-1b-0724-hf", "OLMo-1B")])
def test_config_only_copies_have_the_presets_shapes(name, preset):
    cfg, ref = ModelConfig.from_pretrained(PAPER / "models" / name), M.PRESETS[preset]
    assert {f: getattr(cfg, f) for f in SHAPE_FIELDS} == {f: getattr(ref, f) for f in SHAPE_FIELDS}

    def shapes(c):
        return jax.tree.map(lambda x: (x.shape, x.dtype), split_params(abstract_model(c))[1])

    assert shapes(cfg) == shapes(ref) and M.param_counts(cfg) == M.param_counts(ref)
    assert (PAPER / "models" / name).is_dir() and sorted(p.name for p in (PAPER / "models" / name).iterdir()) == [
        "config.json"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_documented_mesh_plans_offline(name, capsys, tmp_path):
    spec = CONFIGS[name]
    assert documented_meshes(name) == spec["meshes"]
    assert f"model.path=experiments/paper/models/{spec['model']}" in header(name)  # the documented dry run
    for mesh in sorted(spec["meshes"]):
        code, out, err = dry_run(capsys, tmp_path, name, f"mesh={mesh}")
        assert code == 0, err
        n = math.prod(int(axis.split("=")[1]) for axis in mesh.split(","))
        assert n in (8, 16) and f"memory estimate (bytes) per device, mesh {mesh} ({n} devices)" in out
        assert f"method: simu_graddiff " in out and f"benchmark: {spec['benchmark']}" in out
        assert f"{spec['batch_size']} forget + {spec['batch_size']} retain rows x {spec['seq_len']} tokens" in out
        assert f"remat {spec['remat']}" in out and "float32 params, bfloat16 compute" in out
        assert "the run's check_layout passes" in out
        peak = expected_peak(name, "simu_graddiff", mesh)
        line = peak_line(out)
        assert f"{peak:,d}" in line and f"{peak / GIB:.2f} GiB" in line, (mesh, line, peak)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_documented_method_plans_offline_on_every_mesh(name, capsys, tmp_path):
    """Each method x each documented mesh (8 GPUs; v5e-16 / v4-32), as its header's command line."""
    methods = documented_methods(name)
    assert set(methods) == METHODS
    for method, sets in sorted(methods.items()):
        optim = {k.removeprefix("optim."): float(v) for k, v in (s.split("=", 1) for s in sets)
                 if k.startswith("optim.")}
        for mesh in sorted(CONFIGS[name]["meshes"]):
            code, out, err = dry_run(capsys, tmp_path, name, *sets, flags=("--mesh", mesh))
            assert code == 0, (method, mesh, err)
            assert out.startswith(f"method: {method} "), out
            n = math.prod(int(axis.split("=")[1]) for axis in mesh.split(","))
            assert f"mesh {mesh} ({n} devices)" in out and "the run's check_layout passes" in out
            peak = expected_peak(name, method, mesh, **optim)
            assert f"{peak:,d}" in peak_line(out), (method, mesh, peak_line(out), peak)


@pytest.mark.parametrize("name, folder", [("llama2_7b_tofu_unlearn.yaml", "tofu"), ("olmo1b_lume_unlearn.yaml", "lume")])
def test_one_config_file_per_method(name, folder, capsys, tmp_path):
    """experiments/paper/<benchmark>/<method>.yaml (``base:`` the shared config) is exactly the
    shared config with the method's documented --set values, and plans offline."""
    from simu_jax.config import load_config
    from simu_jax.unlearn import UnlearnConfig

    files = {p.stem: p for p in (PAPER / folder).glob("*.yaml")}
    assert set(files) == METHODS
    for method, sets in documented_methods(name).items():
        assert load_config(UnlearnConfig, files[method]) == load_config(UnlearnConfig, PAPER / name, sets), method
        assert f"--config experiments/paper/{folder}/{method}.yaml" in files[method].read_text()
    spec = CONFIGS[name]
    code = main(["unlearn", "--config", str(files["simu_newton"]), "--dry-run", "--out", str(tmp_path / "never"),
                 "--mesh", "fsdp=8", "--set", f"model.path={PAPER / 'models' / spec['model']}"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("method: simu_newton "), err
    assert f"{expected_peak(name, 'simu_newton', 'fsdp=8', trust_radius=0.5, damping=1e-3):,d}" in peak_line(out)
    assert not (tmp_path / "never").exists()


def test_dry_run_refuses_what_the_run_refuses(capsys, tmp_path):
    name = "llama2_7b_tofu_unlearn.yaml"
    # 16 rows split over data x fsdp = 32 devices: every row would be computed twice
    code, out, err = dry_run(capsys, tmp_path, name, "mesh=data=2,fsdp=16")
    assert code == 1 and "batch_size = 16 rows do not divide the batch axes" in err and not out
    # LLaMA-2's vocabulary (32000) and 32 heads do not divide tensor=3
    code, out, err = dry_run(capsys, tmp_path, name, "mesh=fsdp=4,tensor=3", "batch_size=4")
    assert code == 1 and "does not divide tensor=3" in err and not out
    code, out, err = dry_run(capsys, tmp_path, name, "mesh=fsdp=8,sequence=2")
    assert code == 1 and "unknown axis 'sequence'" in err
    # without a model (no config.json to read) the batch is still checked
    assert main(["unlearn", "--dry-run", "--out", str(tmp_path / "never"), "--set", "mesh=fsdp=16", "batch_size=8"]) == 1
    assert "use a multiple of 16" in capsys.readouterr().err
    # ... and so are the attribution's and the final evaluation's batches
    assert main(["unlearn", "--dry-run", "--out", str(tmp_path / "never"), "--set", "mesh=fsdp=16", "batch_size=16",
                 "attribution.batch_size=8"]) == 1
    assert "attribution.batch_size = 8 rows do not divide" in capsys.readouterr().err
    assert main(["unlearn", "--dry-run", "--out", str(tmp_path / "never"), "--set", "mesh=fsdp=16", "batch_size=16",
                 "attribution.batch_size=16", "eval.batch_size=12"]) == 1
    assert "eval.batch_size = 12 rows do not divide" in capsys.readouterr().err
    assert main(["unlearn", "--dry-run", "--out", str(tmp_path / "never"), "--set", "mesh=fsdp=16", "batch_size=16",
                 "attribution.batch_size=16", "eval.batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert ("layout: batch_size and attribution.batch_size and eval.batch_size divide their axes of the mesh fsdp=16"
            in out and "memory estimate unavailable" in out)
    assert not (tmp_path / "never").exists()
