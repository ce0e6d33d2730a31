"""Every registered model family, T2V and I2V, held to one suite (issue 20's conformance cases).

The variants come from the registry and the presets (tests/family_conformance.py): the own DiT,
Wan 2.1 T2V and I2V, HunyuanVideo T2V and I2V, Wan 2.2 T2V/I2V-A14B (both experts, routed by
timestep) and TI2V-5B, HunyuanVideo 1.5 T2V and I2V, each at test size. For each, module-scoped, a
random diffusers model per network is saved as the family's diffusers folder (a pipeline folder
where the family has a pipeline layout) and read into imontage's model by the importer. Then:

- forward: one sample, and samples of different shapes packed, equal diffusers' run of each
  sample alone (fp32, 1e-5 of the largest value);
- gradients: of every input of the packed batch and of every parameter, equal diffusers';
- export then diffusers' ``from_pretrained``: the same tensors and outputs; import then export:
  every tensor bit for bit, the same config;
- TP=2, TP=2+SP and Ulysses=2 on 2 gloo ranks (one launch per variant): outputs and gradients equal
  one process's;
- LoRA: fresh adapters (B = 0) change nothing; the adapters ``export-lora`` writes load with
  diffusers' ``load_lora_adapter`` and give the output of the weights merged by ``export-diffusers``
  (and imontage's);
- each preset's parameter count within 1% of what it states (equal to diffusers' class's).

The own DiT has no diffusers class (its record's ``diffusers_classes`` is empty, checked here):
its references are itself, honestly stated per case: a sample packed with others equals it run
alone (outputs and gradients), its own export (``export_diffusers``, class ``ImontageDiT``) loads
back equal, and its LoRA file loads through PEFT, the library diffusers' LoRA loader runs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import family_conformance as fc
import pytest
import torch
from distributed import run_ranks
from family_conformance import Case, close
from omegaconf import OmegaConf
from safetensors.torch import load_file

from imontage.checkpoint import convert
from imontage.checkpoint.diffusers import (
    DIFFUSERS_VERSION,
    build_diffusers_model,
    export_folder,
    import_folder,
    model_weights,
)
from imontage.checkpoint.lora import export_lora
from imontage.checkpoint.pipeline import export_pipeline, import_pipeline
from imontage.checkpoint.tensors import weight_sources
from imontage.config.schema import ModelConfig
from imontage.models import build_model, count_parameters, registry
from imontage.models.common.experts import TimestepExperts
from imontage.models.lora import LoraConfig, is_adapter, merge_lora
from imontage.parallel.parallelize import tensor_split
from imontage.untrusted import ConversionError

VARIANTS = fc.variants()
# What issue 20 names: the own DiT, Wan 2.1, HunyuanVideo, Wan 2.2 A14B and TI2V-5B, HunyuanVideo 1.5,
# T2V and I2V where both exist (as the presets that state their public shapes).
NAMED = {
    "dit_14b", "wan2.1_t2v_14b", "wan2.1_i2v_14b", "hunyuan_video_t2v_13b", "hunyuan_video_i2v_13b",
    "wan2.2_t2v_a14b", "wan2.2_i2v_a14b", "wan2.2_ti2v_5b", "hunyuan_video_1.5_t2v", "hunyuan_video_1.5_i2v",
}  # fmt: skip
INPUT_GRAD_RTOL = 1e-5  # of each gradient tensor's largest magnitude
# A weight's gradient sums over every token of the batch, in another order than diffusers' per-sample
# runs: measured up to 1.1e-5 of its largest magnitude (Wan's cross-attention queries).
PARAM_GRAD_RTOL = 1e-4
PARALLEL_RTOL, PARALLEL_ATOL = 1e-4, 2e-5  # as the other 2-rank tests: fp32 sums over ranks


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, busy cores


def test_variants_cover_every_family_and_preset() -> None:
    """Every registered family has a variant; every full-size preset is in one, of its kind; every
    family with a diffusers class has its inputs' layout here."""
    assert {v.family for v in VARIANTS} == set(registry.FAMILIES)
    presets = [p for v in VARIANTS for p in v.presets]
    assert sorted(presets) == fc.full_presets() and set(presets) >= NAMED
    for variant in VARIANTS:
        for preset in variant.presets:
            assert fc.kind(fc.preset_config(preset)) == fc.kind(variant.cfg), preset
    for record in registry.FAMILIES.values():
        assert all(name in fc.DIFFUSERS_INPUTS for name in record.diffusers_classes), record.name
    kinds = {(v.family, fc.kind(v.cfg)["inputs"]["channel_condition"] != "") for v in VARIANTS}
    for family in ("wan", "hunyuan_video", "hunyuan_video_15"):  # both T2V and I2V
        assert {(family, False), (family, True)} <= kinds, family


# ------------------------------------------------------------------------------- the built models
@dataclass
class Built:
    variant: fc.Variant
    cfg: Any
    networks: list[tuple[str, float, float]]  # (name, t_min, t_max): its experts, or one transformer
    references: dict[str, Any]  # diffusers' model per network (none for the DiT)
    folder: Path  # the diffusers folder (pipeline or model folder); the DiT's own export
    model: Any  # imontage's, read from the folder

    def network_folder(self, name: str) -> Path:
        return self.folder / name if (self.folder / "model_index.json").is_file() else self.folder

    def network(self, name: str) -> Any:
        return self.model.get_submodule(name) if isinstance(self.model, TimestepExperts) else self.model

    def prefix(self, name: str) -> str:
        return f"{name}." if isinstance(self.model, TimestepExperts) else ""


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.name)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    variant: fc.Variant = request.param
    cfg = variant.cfg
    root = tmp_path_factory.mktemp(variant.name)
    networks = fc.expert_ranges(cfg)
    if not variant.has_diffusers:
        # The record says it has no diffusers class, and the diffusers side refuses it.
        with pytest.raises(ConversionError, match="has no diffusers class"):
            build_diffusers_model(cfg)
        model = fc.imontage_model(cfg, seed=1)
        file = fc.write_consolidated(model, cfg, root / "model.safetensors")
        return Built(variant, cfg, networks, {}, convert.export_diffusers(file, root / "exported"), model)
    references = {}
    for k, (name, _, _) in enumerate(networks):
        torch.manual_seed(k)
        references[name] = fc.randomised(build_diffusers_model(cfg), seed=10 + k).eval()
    mapping = variant.record.diffusers_config()  # type: ignore[misc]
    if hasattr(mapping, "pipeline_transformers"):  # the family's pipeline layout
        folder = root / "pipeline"
        index: dict[str, Any] = {**mapping.pipeline_config(cfg), "_diffusers_version": DIFFUSERS_VERSION}
        for name, reference in references.items():
            reference.save_pretrained(folder / name, max_shard_size="40KB")
            index[name] = ["diffusers", type(reference).__name__]
        (folder / "model_index.json").write_text(json.dumps(index))
    else:
        folder = root / "transformer"
        references["transformer"].save_pretrained(folder, max_shard_size="40KB")
    model = build_model(cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in model_weights(folder, cfg):  # the importer's path, every name checked
            params.pop(name).copy_(tensor)
    assert not params, sorted(params)[:3]
    return Built(variant, cfg, networks, references, folder, model.eval())


def cases(cfg: Any, t_range: tuple[float, float], seed: int, uneven: bool = False) -> list[Case]:
    """Three samples of other shapes and text lengths, at timesteps inside ``t_range``: a clip of
    2 x 2 x 2 patches, one of 3 x 2 x 3 and an image of 1 x 1 x 4 (``uneven``: 1 x 2 x 2, 3 x 2 x 3
    and 1 x 3 x 1, 25 visual rows and 17 text rows, odd, so the parallel layouts pad)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = t_range
    grids = [(1, 2, 2), (3, 2, 3), (1, 3, 1)] if uneven else [(2, 2, 2), (3, 2, 3), (1, 1, 4)]
    return [
        Case(cfg, g, grid, text_len=n, t=lo + f * (hi - lo), glyph_len=glyph, guidance=3.0 + k)
        for k, (grid, n, f, glyph) in enumerate(
            zip(grids, (3, 9, 5), (0.2, 0.8, 0.5), (2, 0, 3), strict=True)
        )
    ]


def single_case(cfg: Any, t_range: tuple[float, float]) -> Case:
    lo, hi = t_range
    return Case(cfg, torch.Generator().manual_seed(1), (3, 2, 3), text_len=5, t=lo + 0.6 * (hi - lo))


def own_export(built: Built, tmp_path: Path) -> Any:
    """The DiT read back from its own export (export_diffusers -> import_diffusers)."""
    file = convert.import_diffusers(built.folder, tmp_path / "imported.safetensors")
    return convert.load_consolidated(file)[0].eval()


# ----------------------------------------------------------------------------------------- forward
def test_forward_single_sample_equals_diffusers(built: Built, tmp_path: Path) -> None:
    """diffusers' run of one sample; the DiT: its own export read back, bit for bit."""
    for name, lo, hi in built.networks:
        case = single_case(built.cfg, (lo, hi))
        batch = fc.packed([case])
        with torch.no_grad():
            out = built.model(batch)
            rows = out[fc.visual_rows(batch, 0)]
            if not built.variant.has_diffusers:
                assert torch.equal(own_export(built, tmp_path)(batch), out)
                continue
            assert not bool(out[batch.is_text].any()), "text rows must output zeros"
            class_name = type(built.references[name]).__name__
            expected = fc.diffusers_rows(
                built.references[name], fc.diffusers_kwargs(case, class_name), case.patch
            )
        close(rows, expected, what=f"{name} output")


def test_forward_packed_samples_each_equal_their_own_run(built: Built) -> None:
    """Each sample of a packed batch equals diffusers' run of it alone; the DiT: its own run of it
    alone (in a batch of one)."""
    for name, lo, hi in built.networks:
        samples = cases(built.cfg, (lo, hi), seed=2)
        batch = fc.packed(samples)
        with torch.no_grad():
            out = built.model(batch)
            for index, case in enumerate(samples):
                if built.variant.has_diffusers:
                    class_name = type(built.references[name]).__name__
                    kwargs = fc.diffusers_kwargs(case, class_name)
                    expected = fc.diffusers_rows(built.references[name], kwargs, case.patch)
                else:
                    alone = fc.packed([case])
                    expected = built.model(alone)[fc.visual_rows(alone, 0)]
                close(out[fc.visual_rows(batch, index)], expected, what=f"{name} sample {index}")


def test_input_and_parameter_gradients_equal_diffusers(built: Built) -> None:
    """The packed batch's input gradients per sample, and every parameter's gradient, equal the sum
    of diffusers' runs of the samples one by one (the DiT: of its own runs of each alone)."""
    model = built.model
    for name, lo, hi in built.networks:
        samples = cases(built.cfg, (lo, hi), seed=3)
        batch = fc.packed(samples, requires_grad=True)
        model.zero_grad()
        out = model(batch)
        # The visual rows only: diffusers has no text rows (the DiT's are not zero, and not compared).
        weights = (
            torch.randn(out.shape, generator=torch.Generator().manual_seed(4)) * batch.target_mask[:, None]
        )
        (out * weights).sum().backward()
        reference = built.references.get(name) or copy.deepcopy(built.network(name))
        reference.zero_grad()
        for index, case in enumerate(samples):
            rows = fc.visual_rows(batch, index)
            if built.variant.has_diffusers:
                class_name = type(reference).__name__
                kwargs = fc.diffusers_kwargs(case, class_name, requires_grad=True)
                expected = fc.diffusers_rows(reference, kwargs, case.patch)
                (expected * weights[rows]).sum().backward()
                want = fc.input_gradients(case, class_name, kwargs)
            else:
                alone = fc.packed([case], requires_grad=True)
                own = fc.visual_rows(alone, 0)
                (reference(alone)[own] * weights[rows]).sum().backward()
                want = fc.batch_gradients(alone, [case], 0)
            got = fc.batch_gradients(batch, samples, index)
            assert got.keys() == want.keys(), (sorted(got), sorted(want))
            for field, grad in want.items():
                close(
                    got[field], grad, INPUT_GRAD_RTOL, what=f"{name} sample {index}: gradient of its {field}"
                )
        expected_grads = {n: p.grad for n, p in reference.named_parameters()}
        largest = max(float(g.abs().max()) for g in expected_grads.values() if g is not None)
        prefix = built.prefix(name)
        for param_name, p in built.network(name).named_parameters():
            want_grad = expected_grads[param_name]
            if want_grad is None:  # reaches no output (HunyuanVideo 1.5's last text-stream outputs)
                assert p.grad is None or not bool(p.grad.any()), param_name
                continue
            assert p.grad is not None, f"{prefix}{param_name}"
            # Or 1e-6 of the model's largest: the refiners' key biases shift every score of a query
            # alike, so their true gradient is 0 and both sides hold fp32 noise (measured 1e-9).
            error = float((p.grad - want_grad).abs().max())
            bound = max(PARAM_GRAD_RTOL * float(want_grad.abs().max()), 1e-6 * largest)
            assert error <= bound, f"gradient of {prefix}{param_name}: max error {error:.3g} > {bound:.3g}"
        if isinstance(model, TimestepExperts):  # the other expert did not run
            for other, _, _ in built.networks:
                if other != name:
                    assert all(p.grad is None for p in built.network(other).parameters()), other
    model.zero_grad()


# ------------------------------------------------------------------------------- export / import
def test_export_then_from_pretrained_equals(built: Built, tmp_path: Path) -> None:
    """imontage's model (other random weights than the folder's) exported through the family's
    export (a pipeline folder of every network where it has one) and loaded by diffusers'
    ``from_pretrained``: the same tensors, the same outputs."""
    cfg = built.cfg
    model = fc.imontage_model(cfg, seed=7)
    file = fc.write_consolidated(model, cfg, tmp_path / "model.safetensors")
    if not built.variant.has_diffusers:
        loaded = convert.load_consolidated(
            convert.import_diffusers(
                convert.export_diffusers(file, tmp_path / "out"), tmp_path / "back.safetensors"
            )
        )[0]
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(t, model.state_dict()[n]) for n, t in loaded.state_dict().items())
        batch = fc.packed(cases(cfg, (0.0, 1.0), seed=5))
        with torch.no_grad():
            assert torch.equal(loaded.eval()(batch), model(batch))
        return
    if (built.folder / "model_index.json").is_file():
        sources = {"" if isinstance(model, TimestepExperts) else "transformer": file}
        out = export_pipeline(sources, tmp_path / "pipeline", cfg, weights="live")
    else:
        out = export_folder(file, tmp_path / "transformer", weights="live")
    for name, lo, hi in built.networks:
        folder = out / name if (out / "model_index.json").is_file() else out
        cls = type(built.references[name])
        loaded = cls.from_pretrained(folder).eval()
        network = model.get_submodule(name) if isinstance(model, TimestepExperts) else model
        state = network.state_dict()
        assert loaded.state_dict().keys() == state.keys()
        assert all(torch.equal(t, state[n]) for n, t in loaded.state_dict().items()), name
        case = single_case(cfg, (lo, hi))
        batch = fc.packed([case])
        with torch.no_grad():
            expected = model(batch)[fc.visual_rows(batch, 0)]
            close(fc.diffusers_rows(loaded, fc.diffusers_kwargs(case, cls.__name__), case.patch), expected)


def stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({source.file for source in weight_sources(folder).values()}):
        tensors.update(load_file(file))
    return tensors


def configs(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in ("_diffusers_version",)}


def test_import_then_export_is_bit_identical(built: Built, tmp_path: Path) -> None:
    """The folder through the family's importer and exporter: every tensor of every network bit for
    bit in its dtype, the same config.json (and model_index.json); the DiT: its own export's folder
    through import_diffusers and export_diffusers."""
    folder = built.folder
    if not built.variant.has_diffusers:
        back = convert.export_diffusers(
            convert.import_diffusers(folder, tmp_path / "c.safetensors"), tmp_path / "out"
        )
        pairs = [(folder, back)]
    elif (folder / "model_index.json").is_file():
        files, cfg = import_pipeline(folder, tmp_path / "imported")
        assert fc.kind(cfg) == fc.kind(built.cfg) and cfg.hidden_size == built.cfg.hidden_size
        back = export_pipeline(files, tmp_path / "out", cfg, weights="live")
        index, back_index = (json.loads((f / "model_index.json").read_text()) for f in (folder, back))
        assert {k: back_index.get(k) for k in index} == index
        pairs = [(folder / name, back / name) for name, _, _ in built.networks]
    else:
        file, _ = import_folder(folder, tmp_path / "imported.safetensors")
        pairs = [(folder, export_folder(file, tmp_path / "out", weights="live"))]
    for before, after in pairs:
        original, exported = stored(before), stored(after)
        assert original.keys() == exported.keys()
        for name, tensor in original.items():
            assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
        assert configs(after) == configs(before)


# ------------------------------------------------------------------------------------------- LoRA
def lora_config(built: Built, name: str) -> Any:
    """Adapters (rank 4, alpha 8) on every linear of every block list of the family's parallel plan,
    on one network (one expert of a model of several)."""
    targets = [f"{blocks}.*" for blocks in built.variant.record.parallel_plan.blocks]
    lora = OmegaConf.merge(OmegaConf.structured(LoraConfig), {"rank": 4, "alpha": 8.0, "targets": targets})
    expert = {"expert": name} if isinstance(built.model, TimestepExperts) else {}
    return OmegaConf.merge(built.cfg, expert, {"lora": lora})


def with_adapters(built: Built, name: str) -> tuple[Any, Any]:
    """(config, the network with fresh adapters over the folder's weights)."""
    cfg = lora_config(built, name)
    model = build_model(cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for param_name, tensor in built.network(name).state_dict().items():
            params[param_name].copy_(tensor)
    return cfg, model.eval()


def randomise_adapters(model: Any) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_fresh_lora_adapters_change_nothing(built: Built) -> None:
    for name, lo, hi in built.networks:
        cfg, model = with_adapters(built, name)
        assert any(is_adapter(n) for n, _ in model.named_parameters())
        batch = fc.packed(cases(built.cfg, (lo, hi), seed=6))
        with torch.no_grad():
            assert torch.equal(model(batch), built.network(name)(batch)), name  # B = 0


def test_lora_adapters_load_into_diffusers_as_the_merged_weights(built: Built, tmp_path: Path) -> None:
    """export-lora's file, loaded by diffusers' ``load_lora_adapter`` onto the folder's model, gives
    what export-diffusers' merged weights give, and imontage's output with the adapters; the DiT:
    the file put on its base through PEFT (what that loader runs) gives its merged output."""
    for name, lo, hi in built.networks:
        cfg, model = with_adapters(built, name)
        randomise_adapters(model)
        file = fc.write_consolidated(model, cfg, tmp_path / name / "adapters.safetensors", is_adapter)
        lora_file = export_lora(file, tmp_path / name / "pytorch_lora_weights.safetensors", weights="live")
        case = single_case(built.cfg, (lo, hi))
        batch = fc.packed([case])
        rows = fc.visual_rows(batch, 0)
        with torch.no_grad():
            expected = model(batch)[rows]
            base = built.network(name)(batch)[rows]
        assert float((expected - base).abs().max()) > 1e-3 * float(base.abs().max())  # the adapters act
        if not built.variant.has_diffusers:
            loaded = peft_loaded(built.network(name), lora_file)
            merge_lora(model)
            with torch.no_grad():
                close(loaded(batch)[rows], expected)
                close(model(batch)[rows], expected)
            continue
        cls = type(built.references[name])
        kwargs = fc.diffusers_kwargs(case, cls.__name__)
        reference = cls.from_pretrained(built.network_folder(name)).eval()
        reference.load_lora_adapter(str(lora_file), prefix="transformer")
        merged_folder = export_folder(
            file, tmp_path / name / "merged", weights="live", base=built.network_folder(name)
        )
        merged = cls.from_pretrained(merged_folder).eval()
        with torch.no_grad():
            with_lora = fc.diffusers_rows(reference, kwargs, case.patch)
            close(with_lora, fc.diffusers_rows(merged, kwargs, case.patch), what=f"{name}: loaded vs merged")
        close(with_lora, expected, what=f"{name}: loaded vs imontage")


def peft_loaded(base: Any, lora_file: Path) -> Any:
    """A copy of ``base`` with the LoRA file's adapters injected by PEFT, as diffusers' loader does
    (keys under the ``transformer.`` prefix, scale folded into B: alpha = rank)."""
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    tensors = {k.removeprefix("transformer."): v for k, v in load_file(lora_file).items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    rank = next(v.shape[0] for k, v in tensors.items() if ".lora_A." in k)
    model = copy.deepcopy(base)
    config = PeftConfig(r=rank, lora_alpha=rank, target_modules=modules)
    inject_adapter_in_model(config, model, state_dict=tensors)
    result = set_peft_model_state_dict(model, tensors)
    assert not getattr(result, "unexpected_keys", None), result
    return model.eval()


# ---------------------------------------------------------------------------------- preset sizes
def test_preset_parameter_counts(built: Built) -> None:
    """On the meta device: each preset's model (one expert of a pair) within 1% of its stated size,
    and, with a diffusers class, diffusers' model of the same config: the same names and shapes."""
    for preset in built.variant.presets:
        cfg = fc.preset_config(preset)
        experts = registry.family(cfg).experts(cfg)
        if experts:
            cfg = OmegaConf.merge(cfg, {"expert": experts[0].name})
        model = build_model(cfg, device="meta")
        count = count_parameters(model)
        assert abs(count / float(cfg.stated_params) - 1) <= 0.01, (preset, count)
        if built.variant.has_diffusers:
            with torch.device("meta"):
                reference = build_diffusers_model(cfg)
            shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
            assert shapes == {name: tuple(p.shape) for name, p in reference.state_dict().items()}, preset


# ------------------------------------------------------------------------------- 2 gloo ranks
LAYOUTS = {"tp2": (2, 1, False), "tp2_sp": (2, 1, True), "ulysses2": (1, 2, False)}
FIELDS = ("tokens", "text_embeds", "image_embeds", "pooled_text", "channel_condition")


def forward_backward(model: Any, cfg: Any) -> dict[str, Any]:
    """Forward and backward of an uneven packed batch per network (each expert's timesteps)."""
    outs, input_grads = [], []
    for k, (_, lo, hi) in enumerate(fc.expert_ranges(cfg)):
        batch = fc.packed(cases(cfg, (lo, hi), seed=8 + k, uneven=True), requires_grad=True)
        out = model(batch)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(9))).sum().backward()
        outs.append(out.detach())
        input_grads.append({f: getattr(batch, f).grad for f in FIELDS if getattr(batch, f) is not None})
    return {
        "outs": outs,
        "input_grads": input_grads,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


def parallel_run(rank: int, world_size: int, values: dict[str, Any]) -> dict[str, Any]:
    """Each layout in turn on the same 2 ranks: a fresh model of the same seed, cut, run."""
    from megatron.core import parallel_state

    from imontage.parallel.parallelize import parallelize_model
    from imontage.parallel.state import ParallelLayout, init_process_groups, launch_env

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), values)
    results = {}
    for layout, (tensor, context, sequence) in LAYOUTS.items():
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        init_process_groups(ParallelLayout(tensor, context, 1), torch.device("cpu"), launch_env())
        model = parallelize_model(fc.imontage_model(cfg, seed=3).train(), tensor, context, sequence)
        results[layout] = forward_backward(model, cfg)
    return results


@pytest.fixture(scope="module")
def parallel(built: Built) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """(per layout, each rank's results; the one process's), one 2-rank launch per variant."""
    ranks = run_ranks(parallel_run, 2, OmegaConf.to_container(built.cfg), timeout=300)
    expected = forward_backward(fc.imontage_model(built.cfg, seed=3).train(), built.cfg)
    return {layout: [r[layout] for r in ranks] for layout in LAYOUTS}, expected


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    atol = PARALLEL_ATOL * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=PARALLEL_RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
def test_tensor_parallel_equals_one_process(parallel: tuple, layout: str) -> None:
    results, expected = parallel
    ranks = results[layout]
    for rank, result in enumerate(ranks):
        for k, out in enumerate(expected["outs"]):
            assert_close(result["outs"][k], out, f"rank {rank} output {k}")
            for field, grad in expected["input_grads"][k].items():
                assert_close(result["input_grads"][k][field], grad, f"rank {rank} gradient of {field} ({k})")
    cut = 0
    for name, weight in expected["weights"].items():
        grad = expected["grads"][name]
        split = tensor_split(name)
        if grad is None:  # reaches no output
            assert all(r["grads"][name] is None for r in ranks), name
        if split is None:
            for rank, result in enumerate(ranks):
                assert torch.equal(result["weights"][name], weight), f"rank {rank} {name}"
                if grad is not None:
                    assert_close(result["grads"][name], grad, f"rank {rank} gradient of {name}")
        else:
            cut += 1
            assert torch.equal(split.unshard([r["weights"][name] for r in ranks]), weight), name
            if grad is not None:
                assert_close(
                    split.unshard([r["grads"][name] for r in ranks]), grad, f"gathered gradient of {name}"
                )
    assert cut, "nothing was cut"


def test_ulysses_equals_one_process(parallel: tuple) -> None:
    results, expected = parallel
    ranks = results["ulysses2"]
    for rank, result in enumerate(ranks):
        for k, out in enumerate(expected["outs"]):
            assert_close(result["outs"][k], out, f"rank {rank} output {k}")
        for name, weight in expected["weights"].items():
            assert torch.equal(result["weights"][name], weight), f"rank {rank} {name}"
    # Each context-parallel rank holds its tokens' share of every gradient: the shares add up.
    for k, grads in enumerate(expected["input_grads"]):
        for field, grad in grads.items():
            shares = ranks[0]["input_grads"][k][field] + ranks[1]["input_grads"][k][field]
            assert_close(shares, grad, f"gradient of {field} ({k})")
    for name, grad in expected["grads"].items():
        if grad is None:
            assert ranks[0]["grads"][name] is None and ranks[1]["grads"][name] is None, name
            continue
        assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], grad, f"summed gradient of {name}")
