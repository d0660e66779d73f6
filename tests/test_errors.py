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
