"""DiffusionConfig: the guide's defaults, (de)serialisation, validation and --set overrides."""

import dataclasses
import inspect
import pickle
import re
import tempfile
from pathlib import Path

import pytest
from helpers import GUIDE_DEFAULTS
from hypothesis import example, given
from hypothesis import strategies as st

from diffusion import DiffusionConfig, config_reference, parse_overrides


def test_guide_defaults():
    config = DiffusionConfig()
    for name, value in GUIDE_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.timestep_spacing == "trailing"


def test_guide_call_builds_the_same_config():
    assert DiffusionConfig(**GUIDE_DEFAULTS) == DiffusionConfig()


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip(tmp_path, fmt):
    config = DiffusionConfig(channel_mult=(1, 2), attention_resolutions=(16,), snr_gamma=None,
                             prediction_type="v_prediction", sample_prompts=("a red circle",),
                             mixed_precision="bf16", data_dir="/data", dataset="folder")
    path = tmp_path / f"config.{fmt}"
    getattr(config, f"to_{fmt}")(path)
    loaded = getattr(DiffusionConfig, f"from_{fmt}")(path)
    assert loaded == config
    assert isinstance(loaded.channel_mult, tuple)


def test_to_dict_is_plain_and_complete():
    data = DiffusionConfig().to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(DiffusionConfig)}
    assert isinstance(data["channel_mult"], list)
    assert DiffusionConfig.from_dict(data) == DiffusionConfig()


def test_yaml_reads_scientific_notation_as_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-4\nbeta_start: 1.0e-5\n")
    config = DiffusionConfig.from_yaml(path)
    assert config.learning_rate == pytest.approx(3e-4)
    assert config.beta_start == pytest.approx(1e-5)


def test_largest_seed_is_accepted():
    assert DiffusionConfig(seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.parametrize("text, problem", [
    ("max_steps: 5\nlearning_rate: [1e-3\n",
     r"while parsing a flow sequence \(line 2, column 16\)"),
    # YAML itself keeps the last value silently: 7 steps would run where 5 was meant
    ("max_steps: 5\nlearning_rate: 1e-3\nmax_steps: 7\n",
     r"duplicate key 'max_steps' \(line 3, column 1\)"),
    ("? [a]\n: 1\n", r"while constructing a mapping \(line 1, column 1\): found unhashable key "
                     r"\(line 1, column 3\)"),
])
def test_malformed_yaml_names_the_file_and_the_line(tmp_path, text, problem):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    file = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"cannot read config file '{file}': {problem}"):
        DiffusionConfig.from_yaml(path)


# Strings YAML could read as something else: our scientific-notation floats, YAML 1.1's
# booleans, nulls, ints and special floats.
YAML_LOOKALIKES = st.one_of(
    st.from_regex(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", fullmatch=True),
    st.sampled_from(["true", "no", "null", "~", "12", "0x1f", "1_000", ".inf", "3.5", ""]),
)


@given(output_dir=st.one_of(st.text(), YAML_LOOKALIKES),
       prompts=st.lists(st.one_of(st.text(), YAML_LOOKALIKES), max_size=3))
@example(output_dir="2e-4", prompts=["1e5"])
def test_yaml_round_trips_any_string(output_dir, prompts):
    """config.yaml must load back to the config that wrote it, whatever its strings look like."""
    config = DiffusionConfig(output_dir=output_dir, sample_prompts=tuple(prompts))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        config.to_yaml(path)
        assert DiffusionConfig.from_yaml(path) == config


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert DiffusionConfig.from_yaml(path) == DiffusionConfig()


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ValueError, match=r"'snr_gama'.*did you mean 'snr_gamma'"):
        DiffusionConfig.from_dict({"snr_gama": 3.0})


def test_unknown_constructor_keyword_suggests_the_right_one():
    """The constructor says what from_dict says, and stays a plain dataclass otherwise."""
    with pytest.raises(TypeError, match=r"unknown field\(s\): 'snr_gama' \(did you mean "
                                        r"'snr_gamma'\?\)"):
        DiffusionConfig(snr_gama=1)
    config = DiffusionConfig(snr_gamma=3.0)
    assert dataclasses.replace(config, seed=7).seed == 7
    with pytest.raises(TypeError, match=r"'sed' \(did you mean 'seed'\?\)"):
        dataclasses.replace(config, sed=7)
    assert pickle.loads(pickle.dumps(config)) == config
    assert list(inspect.signature(DiffusionConfig).parameters) == [
        f.name for f in dataclasses.fields(DiffusionConfig)]


def test_unknown_attribute_assignment_is_an_error():
    config = DiffusionConfig()
    with pytest.raises(AttributeError, match=r"'learning_rat'.*did you mean 'learning_rate'"):
        config.learning_rat = 1e-3


def test_from_dict_needs_a_mapping():
    with pytest.raises(TypeError, match="mapping"):
        DiffusionConfig.from_dict(["learning_rate"])


@pytest.mark.parametrize("name, value, message", [
    ("num_heads", True, r"num_heads=True must be int"),
    ("num_heads", 2.5, r"num_heads=2.5 must be int"),
    ("learning_rate", "fast", r"learning_rate='fast' must be float"),
    ("channel_mult", "1,2", r"channel_mult='1,2' must be a list of int"),
    ("use_ema", 1, r"use_ema=1 must be bool"),
    ("snr_gamma", "x", r"snr_gamma='x' must be float or None"),
    ("learning_rate", True, r"learning_rate=True must be float"),  # YAML's `yes`
    ("sample_prompts", "a red circle", r"sample_prompts='a red circle' must be a list of str"),
    ("channel_mult", [1, 2.5], r"channel_mult=\[1, 2.5\] must be a list of int"),
])
def test_type_errors_name_field_value_and_type(name, value, message):
    with pytest.raises(TypeError, match=message):
        DiffusionConfig(**{name: value})


@pytest.mark.parametrize("name, value, allowed", [
    ("dropout", 1.0, r"0.0 <= dropout < 1.0"),
    ("beta_start", 0.0, r"0.0 < beta_start < 1.0"),
    ("num_train_timesteps", 1, r"2 <= num_train_timesteps"),
    ("learning_rate", -1e-4, r"0.0 < learning_rate"),
    ("ema_decay", 1.5, r"0.0 <= ema_decay <= 1.0"),
    ("snr_gamma", 0.0, r"0.0 < snr_gamma"),
    ("batch_size", 0, r"1 <= batch_size"),
    ("cfg_dropout", 1.5, r"0.0 <= cfg_dropout <= 1.0"),
    ("keep_last", 0, r"1 <= keep_last"),
    ("seed", 2**63, r"0 <= seed <= 9223372036854775807"),  # torch's seeds are 64-bit
    ("seed", 99999999999999999999, r"0 <= seed <= 9223372036854775807"),
])
def test_range_errors(name, value, allowed):
    with pytest.raises(ValueError, match=rf"{name}={value!r} is out of range; allowed: {allowed}"):
        DiffusionConfig(**{name: value})


@pytest.mark.parametrize("name", ["guidance_scale", "eta", "learning_rate", "snr_gamma",
                                  "max_grad_norm", "ema_decay", "guidance_rescale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused(name, value):
    """NaN passes every `<` / `>` range check, and inf has no upper bound on most fields;
    either gives NaN images or weights with no error."""
    with pytest.raises(ValueError, match=rf"{name}={value!r} must be a finite number"):
        DiffusionConfig(**{name: value})
    with pytest.raises(ValueError, match=rf"{name}={value!r} must be a finite number"):
        DiffusionConfig().with_overrides({name: value})


@pytest.mark.parametrize("name, value", [
    ("beta_schedule", "cosin"), ("prediction_type", "eps"), ("timestep_spacing", "even"),
    ("sampler", "dpm"), ("variance_type", "learned"), ("loss_type", "mse"),
    ("lr_scheduler", "step"), ("mixed_precision", "fp8"), ("dataset", "imagenet"),
])
def test_choice_errors_list_the_valid_choices(name, value):
    with pytest.raises(ValueError, match=rf"{name}='{value}' is not one of \["):
        DiffusionConfig(**{name: value})


def test_assignment_is_validated_immediately():
    config = DiffusionConfig()
    with pytest.raises(ValueError, match="beta_schedule='foo'"):
        config.beta_schedule = "foo"
    config.snr_gamma = 3  # an int is a fine float
    assert config.snr_gamma == 3.0 and isinstance(config.snr_gamma, float)


def test_v_prediction_must_agree_with_prediction_type():
    with pytest.raises(ValueError, match=r"v_prediction=True contradicts prediction_type="
                                         r"'epsilon'"):
        DiffusionConfig(v_prediction=True)
    assert DiffusionConfig(prediction_type="v_prediction").v_prediction is True
    assert DiffusionConfig(v_prediction=True, prediction_type="v_prediction").v_prediction


def test_guide_two_line_switch_to_v_prediction():
    config = DiffusionConfig()
    config.v_prediction = True  # inconsistent for one line, as in the guide
    config.prediction_type = "v_prediction"
    assert config.validate() is config
    config.prediction_type = "sample"
    with pytest.raises(ValueError, match="contradicts"):
        config.validate()


def test_zero_terminal_snr_rejects_epsilon_prediction():
    with pytest.raises(ValueError, match=r"rescale_betas_zero_snr.*v_prediction"):
        DiffusionConfig(rescale_betas_zero_snr=True)
    DiffusionConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    DiffusionConfig(rescale_betas_zero_snr=True, prediction_type="sample")


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta_start=0.02, beta_end=0.01), r"beta_start=0.02 must be smaller than beta_end=0.01"),
    (dict(beta_start=0.01, beta_end=0.01), r"beta_start=0.01 must be smaller than beta_end=0.01"),
    (dict(num_train_timesteps=10, num_inference_steps=50),
     r"num_inference_steps=50 must be at most num_train_timesteps=10"),
    (dict(steps_offset=1), r"steps_offset=1 only applies to timestep_spacing='leading'"),
    (dict(dataset="folder"), r"dataset='folder' needs data_dir"),
    (dict(dataset="folder", data_dir=""), r"dataset='folder' needs data_dir"),
    (dict(pooled_text_conditioning=True, use_spatial_transformer=False),
     r"pooled_text_conditioning=True needs use_spatial_transformer=True"),
    (dict(pooled_text_conditioning=True, text_pooling="attention", context_dim=30,
          num_heads=4), r"text_pooling='attention' pools with num_heads=4 heads, which must "
                        r"divide context_dim=30"),
    (dict(text_pooling="max"), r"text_pooling"),
    (dict(channel_mult=()), r"channel_mult=\(\) must have at least one level"),
    (dict(attention_resolutions=(8, 0)), r"attention_resolutions=\(8, 0\) must hold positive"),
])
def test_cross_field_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionConfig(**kwargs)


def test_cosine_ignores_beta_range():
    """The cosine schedule is defined without beta_start/beta_end: validation lets any range
    through (even an inverted one) and the scheduler's tables do not depend on it."""
    import math

    import torch

    from diffusion import AdvancedScheduler

    ranges = [(0.0001, 0.02), (0.02, 0.01), (0.001, 0.5)]
    tables = [AdvancedScheduler(DiffusionConfig(beta_schedule="cosine", num_train_timesteps=100,
                                                beta_start=lo, beta_end=hi))
              for lo, hi in ranges]
    for other in tables[1:]:
        assert torch.equal(other.betas, tables[0].betas)
        assert torch.equal(other.alphas_cumprod_float64, tables[0].alphas_cumprod_float64)
    # And they are the Nichol & Dhariwal table: abar_t = f(t + 1) / f(0) before the 0.999 clip.
    f = [math.cos((t / 100 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(101)]
    abar = tables[0].alphas_cumprod_float64
    for t in (0, 10, 50, 90):
        assert abar[t].item() == pytest.approx(f[t + 1] / f[0], rel=1e-9)


def test_parse_overrides_types():
    got = parse_overrides([
        "learning_rate=3e-4", "batch_size=8", "use_ema=false", "channel_mult=(1, 2)",
        "attention_resolutions=16,8", "sample_prompts=[a red circle, a blue square]",
        "snr_gamma=null", "output_dir=runs/x", "mixed_precision=bf16", "eta=1",
    ])
    assert got == {
        "learning_rate": 3e-4, "batch_size": 8, "use_ema": False, "channel_mult": [1, 2],
        "attention_resolutions": [16, 8],
        "sample_prompts": ["a red circle", "a blue square"], "snr_gamma": None,
        "output_dir": "runs/x", "mixed_precision": "bf16", "eta": 1,
    }
    config = DiffusionConfig().with_overrides(got)
    assert config.channel_mult == (1, 2) and config.eta == 1.0 and config.snr_gamma is None


@pytest.mark.parametrize("pair, message", [
    ("learning_rate", r"must look like key=value"),
    ("=3", r"must look like key=value"),
    ("lerning_rate=3", r"unknown config field 'lerning_rate'.*did you mean 'learning_rate'"),
    ("channel_mult=[1, 2", r"cannot parse the value of override"),
])
def test_parse_overrides_errors(pair, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides([pair])


def test_with_overrides_validates():
    with pytest.raises(ValueError, match="did you mean 'eta'"):
        DiffusionConfig().with_overrides({"etta": 1.0})
    with pytest.raises(ValueError, match="dropout=2.0 is out of range"):
        DiffusionConfig().with_overrides({"dropout": 2.0})


def test_config_reference_covers_every_field():
    rows = config_reference()
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(DiffusionConfig)]
    assert all(help_text for _, _, help_text in rows)


def test_sampling_with_every_training_timestep_is_allowed():
    """DDPM's own sampler takes all T steps."""
    assert DiffusionConfig(num_train_timesteps=10, num_inference_steps=10).num_inference_steps == 10


def test_did_you_mean_names_the_closest_field_or_none():
    with pytest.raises(ValueError, match=r"'sampl_every' \(did you mean 'sample_every'\?\)"):
        DiffusionConfig.from_dict({"sampl_every": 5})  # not 'save_every' or 'sampler'
    with pytest.raises(ValueError, match="unknown config field 'lr'") as info:
        parse_overrides(["lr=3e-4"])
    assert "did you mean" not in str(info.value)  # no field is close to 'lr'


def test_a_yaml_file_that_is_not_a_mapping_is_refused(tmp_path):
    """It was a TypeError that did not name the file, and a file holding [] or 0 loaded as
    the defaults; an empty file still does."""
    path = tmp_path / "c.yaml"
    for text, got in (("learning_rate=3e-4\n", "str ('learning_rate=3e-4')"),  # '=' for ':'
                      ("[]\n", "list ('[]')"), ("0\n", "int ('0')")):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(
                f"config file {str(path)!r} must hold a mapping of field: value lines; got a "
                f"{got}")):
            DiffusionConfig.from_yaml(path)
    path.write_text("")
    assert DiffusionConfig.from_yaml(path) == DiffusionConfig()
    with pytest.raises(TypeError, match="config data must be a mapping of field names; got str"):
        DiffusionConfig.from_dict("learning_rate=3e-4")


def test_overriding_prediction_type_alone_sets_v_prediction_to_match():
    """A v-prediction config (whose config.yaml stores v_prediction: true) refused
    `--set prediction_type=epsilon` as contradicting v_prediction."""
    v = DiffusionConfig(prediction_type="v_prediction")
    eps = v.with_overrides({"prediction_type": "epsilon"})
    assert (eps.prediction_type, eps.v_prediction) == ("epsilon", False)
    back = eps.with_overrides({"prediction_type": "v_prediction"})
    assert (back.prediction_type, back.v_prediction) == ("v_prediction", True)
    with pytest.raises(ValueError, match="v_prediction=True contradicts prediction_type="):
        v.with_overrides({"prediction_type": "epsilon", "v_prediction": True})


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """`<<:` merges are not duplicate keys: a later key overrides the merged one."""
    path = tmp_path / "c.yaml"
    path.write_text("<<: {max_steps: 5, seed: 3}\nmax_steps: 7\n")
    config = DiffusionConfig.from_yaml(path)
    assert (config.max_steps, config.seed) == (7, 3)


@pytest.mark.parametrize("text, value", [("+3e-4", 3e-4), (".5e3", 500.0), ("2E+1", 20.0)])
def test_every_scientific_notation_is_a_float(text, value):
    assert parse_overrides([f"learning_rate={text}"]) == {"learning_rate": value}


def test_parse_overrides_strips_spaces_and_keeps_an_empty_value_a_string():
    """`--set snr_gamma=` is an error, not a silent null that turns min-SNR weighting off."""
    assert parse_overrides([" seed = 3 ", "snr_gamma="]) == {"seed": 3, "snr_gamma": ""}
    with pytest.raises(TypeError, match="snr_gamma='' must be float or None"):
        DiffusionConfig().with_overrides({"snr_gamma": ""})


def test_text_poolings_and_tokenizers_are_the_nets():
    """The config's allowed text_pooling and tokenizer values are the ones nets builds (nets
    imports nothing from diffusion, so each keeps its own tuple)."""
    from diffusion.config import TEXT_POOLINGS, TOKENIZERS
    from nets.text_encoder import TOKENIZERS as NET_TOKENIZERS
    from nets.unet import TEXT_POOLINGS as UNET_TEXT_POOLINGS

    assert TEXT_POOLINGS == UNET_TEXT_POOLINGS
    assert TOKENIZERS == NET_TOKENIZERS
