"""Library errors name settings fields; the CLI shows the flags that set them."""

import pytest

from dpcli.cli.errors import flag, message
from dpcli.errors import EXIT_USAGE, BadInput, BadSetting
from dpcli.jobs.finetune.settings import FinetuneSettings
from dpcli.jobs.prune import PruneSettings, validate_prune_settings
from dpcli.testing import run_dp


def test_a_library_user_sees_the_field_name_not_the_flag():
    with pytest.raises(BadSetting) as caught:
        validate_prune_settings(PruneSettings(target_macs=1.5))
    assert caught.value.field == "target_macs"
    assert str(caught.value) == "target_macs is a fraction of the original and must be in (0, 1), got 1.5"
    assert isinstance(caught.value, BadInput) and caught.value.exit_code == EXIT_USAGE


def test_a_setting_that_needs_another_names_both_fields():
    with pytest.raises(BadSetting) as caught:
        FinetuneSettings(data="builtin:digits", steps=10, distill_weight=0.5).validate()
    assert str(caught.value) == "distill_weight needs teacher MODEL"
    assert message(caught.value) == "--distill-weight needs --teacher MODEL"


def test_the_cli_shows_each_field_as_its_flag():
    assert message(BadSetting("threshold", "{threshold} must be in [0, 1]", got=1.5)) == (
        "--threshold must be in [0, 1], got 1.5"
    )
    assert flag("grad_accum") == "--grad-accum"
    assert flag("batch") == "--latency-batch"  # LatencySettings.batch


def test_a_value_with_braces_is_shown_as_given():
    error = BadSetting("sampler", "{sampler} must be one of ddim, ddpm", got=repr("{x}"))
    assert message(error) == "--sampler must be one of ddim, ddpm, got '{x}'"


def test_user_values_inside_a_message_are_shown_as_given(tmp_path):
    import torch

    from dpcli.metrics import load_stats
    from dpcli.pruning import resolve_ignored

    with pytest.raises(BadSetting) as caught:
        resolve_ignored(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), ["{up}*"])
    assert str(caught.value) == "ignore '{up}*' matches no module (see dp inspect for names)"
    assert message(caught.value) == "--ignore '{up}*' matches no module (see dp inspect for names)"
    missing = tmp_path / "{stats}.safetensors"
    with pytest.raises(BadSetting) as caught:
        load_stats(missing)
    assert str(caught.value) == f"fid_stats {missing}: file not found"
    assert message(caught.value) == f"--fid-stats {missing}: file not found"


def test_hints_name_the_setting_to_change(tmp_path):
    from dpcli.io.files import prepare_output

    output = tmp_path / "out"
    output.mkdir()
    (output / "model.safetensors").write_bytes(b"x")
    with pytest.raises(BadSetting) as caught:
        prepare_output(output, force=False)
    assert str(caught.value) == f"output folder {output} exists and is not empty (use force to replace it)"
    assert (
        message(caught.value) == f"output folder {output} exists and is not empty (use --force to replace it)"
    )
    assert (output / "model.safetensors").read_bytes() == b"x"


def test_a_resume_with_other_settings_names_the_setting():
    from dpcli.jobs.finetune.checkpoints import check_resumable

    record = {"model_signature": "s", "model_fingerprint": "f", "settings": {"lr": 1e-4, "global_batch": 8}}
    state = {**record, "settings": {"lr": 2e-4, "global_batch": 8}}
    with pytest.raises(BadSetting) as caught:
        check_resumable(state, "ckpt", record)
    assert message(caught.value) == (
        "--resume: the checkpoint was written with --lr 0.0002, this run has --lr 0.0001 "
        "(use the same settings, or start over with --force)"
    )
    state["settings"] = {"lr": 1e-4, "global_batch": 16}
    with pytest.raises(BadSetting) as caught:
        check_resumable(state, "ckpt", record)
    assert "written with global batch 16, this run has global batch 8" in message(caught.value)


def test_dp_prints_the_flag_and_exits_2():
    result = run_dp("finetune", "no-such-model", "--data", "builtin:digits", "--steps", "0")
    assert result.exit_code == 2
    assert "--steps must be at least 1, got 0" in result.stderr


@pytest.mark.parametrize(
    "args, text",
    [
        (
            ["prune", "--criterion", "magnitude", "--ratio", "0.3", "--threshold", "1.5"],
            "--threshold must be",
        ),
        (
            ["score", "--criterion", "diff-taylor", "--threshold", "-1"],
            "--threshold must be in [0, 1], got -1",
        ),
        (["finetune", "--data", "builtin:digits", "--steps", "5", "--resume"], "--resume: no checkpoint in"),
        (
            ["finetune", "--data", "builtin:digits", "--steps", "5", "--distill-weight", "0.5"],
            "--distill-weight needs --teacher MODEL",
        ),
    ],
)
def test_settings_are_checked_before_the_model_is_loaded(tmp_path, args, text):
    command, *options = args
    out = tmp_path / "out"
    result = run_dp(command, tmp_path / "no-such-model", *options, "-o", out)
    assert result.exit_code == 2, result.stderr
    assert text in result.stderr
    assert not out.exists()
