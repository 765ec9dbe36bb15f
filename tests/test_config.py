import pytest

from alignloop.config import ConfigError, dump_config, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_embedded_default_is_valid_and_round_trips(tmp_path):
    config = load_config(None)
    assert config.policy == "smollm2-135m-instruct"
    assert config.loss.name == "dpo" and config.feedback.mode == "max"
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(write(tmp_path, "optim:\n  learning_rate: 0.1\n"))


def test_ill_typed_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"samples_per_prompt: .*integer"):
        load_config(write(tmp_path, "samples_per_prompt: lots\n"))


def test_set_overrides_nested_keys_with_yaml_types():
    config = load_config(None, ["optim.lr=1e-5", "sampler.stop=['###']", "loss.beta=0.2", "feedback.threshold=0.25"])
    assert config.optim.lr == 1e-5
    assert config.sampler.stop == ["###"]
    assert config.loss.params == {"beta": 0.2, "label_smoothing": 0.0}  # defaults filled in
    assert config.feedback.threshold == 0.25


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optim.lr"])


def test_unknown_loss_and_unknown_loss_parameter():
    with pytest.raises(ConfigError, match="unknown loss 'dpoo'"):
        load_config(None, ["loss.name=dpoo"])
    with pytest.raises(ConfigError, match="loss 'dpo' has no parameter 'tau'"):
        load_config(None, ["loss.tau=0.1"])


def test_feedback_must_fit_the_loss():
    with pytest.raises(ConfigError, match="needs pairwise feedback"):
        load_config(None, ["feedback.type=binary", "feedback.threshold=mean"])
    config = load_config(None, ["loss.name=kto", "feedback.type=binary", "feedback.threshold=median"])
    assert config.feedback.threshold == "median"
    with pytest.raises(ConfigError, match="'mean'/'median' is for type 'binary'"):
        load_config(None, ["feedback.threshold=mean"])


def test_file_prompt_source_needs_a_path():
    with pytest.raises(ConfigError, match="prompts: source 'file' needs 'path'"):
        load_config(None, ["prompts.source=file"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [1, 2\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
