"""The ratio search predicts each trial's params and MACs from kept widths instead of pruning a copy."""

from __future__ import annotations

import copy

import pytest
import torch

from dpcli import pruning
from dpcli.inspection import macs_of
from dpcli.jobs.prune import measure
from dpcli.macs_table import SizePredictor
from dpcli.plugins import get_registry
from dpcli.pruning import PruneOptions, collect_scores, prune_in_place, prune_to_target
from dpcli.testing import TINY_UNET_CONFIG as TINY_CONFIG
from dpcli.testing import make_unet, tiny_loaded


def magnitude_scores(loaded, options):
    criterion = get_registry().criterion("magnitude")
    return collect_scores(loaded, loaded.adapter, criterion, None, 0, options)


def assert_predictions_match_pruned_copies(loaded, options, ratios):
    adapter = loaded.adapter
    scores = magnitude_scores(loaded, options)
    predictor = SizePredictor(loaded, adapter, scores, options, macs_of(loaded))
    assert predictor.base == measure(loaded)
    for ratio in ratios:
        predicted = predictor.predict(ratio)
        pruned = copy.copy(loaded)
        pruned.model = copy.deepcopy(loaded.model)
        prune_in_place(pruned, adapter, scores, ratio, options)
        assert predicted == measure(pruned), f"ratio {ratio}"  # (params, fvcore MACs) of the real thing
    predictor.close()


@pytest.mark.slow
def test_predicted_sizes_equal_fvcore_on_the_pruned_unet2d():
    assert_predictions_match_pruned_copies(tiny_loaded(), PruneOptions(), [0.3, 0.7, 0.9])
    wide = tiny_loaded(config={**TINY_CONFIG, "norm_num_groups": 4})
    assert_predictions_match_pruned_copies(wide, PruneOptions(round_to=4), [0.6])


@pytest.mark.slow
def test_predicted_sizes_equal_fvcore_on_the_pruned_sd_unet(tmp_path):
    pytest.importorskip("transformers")
    from helpers.latent import write_text_pipeline

    from dpcli.loading import load_model

    folder = write_text_pipeline(tmp_path / "sd", tmp_path / "tokenizer")
    # cross-attention (sdpa), GEGLU, LayerNorm, upsampling; with and without whole heads removed
    assert_predictions_match_pruned_copies(load_model(str(folder)), PruneOptions(), [0.3016, 0.8])
    assert_predictions_match_pruned_copies(load_model(str(folder)), PruneOptions(head_ratio=0.25), [0.5])


def search(loaded, target_macs):
    scores = magnitude_scores(loaded, PruneOptions())
    base = measure(loaded)
    return prune_to_target(
        loaded, loaded.adapter, scores, measure, base, PruneOptions(), target_macs=target_macs
    )


@pytest.mark.slow
def test_search_makes_no_copy_and_picks_the_ratio_of_the_copy_search(monkeypatch):
    def copies_taken(loaded, target):
        made = []
        real_deepcopy = copy.deepcopy

        def counting(value, *args):
            if isinstance(value, torch.nn.Module):
                made.append(type(value).__name__)
            return real_deepcopy(value, *args)

        monkeypatch.setattr(pruning.copy, "deepcopy", counting)
        try:
            ratio, trials, _ = search(loaded, target)
        finally:
            monkeypatch.setattr(pruning.copy, "deepcopy", real_deepcopy)
        return ratio, trials, made

    config = {**TINY_CONFIG, "norm_num_groups": 4}
    predicted = tiny_loaded(config=config)
    ratio, trials, made = copies_taken(predicted, 0.6)
    assert made == [] and len(trials) > 3
    assert (predicted.model is not None) and measure(predicted)[1] == [t for t in trials if t.ratio == ratio][
        0
    ].macs

    # Today's search over pruned copies (no predictor) lands on the same ratio through the same trials.
    monkeypatch.setattr("dpcli.macs_table.SizePredictor.predict", lambda self, r: None)
    copied = tiny_loaded(config=config)
    ratio_copied, trials_copied, made_copied = copies_taken(copied, 0.6)
    assert len(made_copied) == len(trials_copied)
    assert (ratio_copied, trials_copied) == (ratio, trials)
    assert torch.equal(copied.model.conv_in.weight, predicted.model.conv_in.weight), (
        "the same channels are pruned"
    )


def test_prune_target_through_the_cli_reports_fvcore_sizes_on_target(dp, tmp_path):
    folder = tmp_path / "wide"
    make_unet({**TINY_CONFIG, "norm_num_groups": 4}).save_pretrained(folder)
    out = tmp_path / "out"
    args = ["prune", folder, "--criterion", "magnitude", "--target-macs", "0.57", "--tolerance", "0.02"]
    report = dp(*args, "-o", out, "--json").json
    assert abs(report["macs_fraction"] - 0.57) <= 0.02 * 0.57
    chosen = [t for t in report["trials"] if t["ratio"] == report["ratio"]]
    assert (
        chosen and chosen[0]["macs"] == report["macs_after"] and chosen[0]["params"] == report["params_after"]
    )
    reloaded = dp("inspect", out, "--json").json
    assert reloaded["macs"] == report["macs_after"]


@pytest.mark.slow
def test_predicted_sizes_equal_fvcore_on_the_pruned_sdxl_unet(tmp_path):
    pytest.importorskip("transformers")
    from test_sdxl import write_sdxl_pipeline

    from dpcli.loading import load_model

    folder = write_sdxl_pipeline(tmp_path / "pipeline", tmp_path / "tokenizer-files")
    # added text_time embedding summed with the time embedding, two text encoders' context
    assert_predictions_match_pruned_copies(load_model(str(folder)), PruneOptions(head_ratio=0.25), [0.4])


def test_a_pruner_keeps_no_activations_of_its_tracing_forward():
    """torch-pruning keeps the traced autograd graph while the pruner lives; the activations of that
    forward must not live on with it (they are the UNet's size again for SDXL at 512 px)."""
    import weakref

    from dpcli.pruning import build_pruner

    loaded = tiny_loaded()
    options = PruneOptions()
    scores = magnitude_scores(loaded, options)
    outputs = []

    def keep_a_weak_reference(module, inputs, output):
        outputs.append(weakref.ref(output))

    handles = [
        m.register_forward_hook(keep_a_weak_reference)
        for m in loaded.model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm))
    ]
    pruner = build_pruner(
        loaded,
        loaded.adapter,
        pruning.SavedImportance(scores, pruning.module_names(loaded.model)),
        0.5,
        options,
    )
    for handle in handles:
        handle.remove()
    assert outputs and pruner.DG is not None
    alive = [ref for ref in outputs if ref() is not None]
    assert not alive, f"{len(alive)} of {len(outputs)} layer outputs are still held by the pruner"


def test_pruning_frees_each_replaced_weight_as_it_goes(monkeypatch):
    """The unpruned weights do not live on beside the pruned ones: once pruning has replaced a layer's
    weight, the old tensor's storage is freed (the pruner's traced graph still refers to the object)."""
    loaded = tiny_loaded()
    options = PruneOptions()
    scores = magnitude_scores(loaded, options)
    originals = dict(loaded.model.named_parameters())
    held = []
    release = pruning.release_replaced

    def spy(model, still_original):
        release(model, still_original)
        held.append(sum(p.untyped_storage().nbytes() for p in originals.values()))

    monkeypatch.setattr(pruning, "release_replaced", spy)
    prune_in_place(loaded, loaded.adapter, scores, 0.5, options)
    current = dict(loaded.model.named_parameters())
    replaced = [name for name, parameter in originals.items() if current[name] is not parameter]
    assert replaced, "pruning at 0.5 replaces weights"
    assert all(originals[name].untyped_storage().nbytes() == 0 for name in replaced)
    assert held == sorted(held, reverse=True) and held[-1] < held[0]  # freed group by group, not at the end
