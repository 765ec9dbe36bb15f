import re

import pytest
import yaml

from alignloop.config import ConfigError, dump_config, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_embedded_default_is_valid_and_round_trips(tmp_path):
    config = load_config(None)
    assert config.policy == "smollm2-135m-instruct"
    assert config.loss.name == "dpo" and config.feedback.mode == "random"
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config


def test_the_sampler_is_vllm_where_it_is_installed_and_hf_elsewhere(monkeypatch, capsys, tmp_path):
    """Left out, `sampler.backend` is vllm when vLLM is installed (as `setup.sh` installs it) and hf when it is
    not, which the sampler says once when the run starts; a run directory saved by 0.1.0 without the key (HF
    was the only default then) resumes as hf. vLLM's absence is simulated: it is installed here."""
    import importlib.util

    from alignloop.config import HFSamplerConfig, VLLMSamplerConfig, load_saved_config
    from alignloop.sampling import Sampler

    installed = importlib.util.find_spec("vllm") is not None
    assert type(load_config(None).sampler) is (VLLMSamplerConfig if installed else HFSamplerConfig)
    assert type(load_config(None, ["sampler.max_new_tokens=9"]).sampler) is type(load_config(None).sampler)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    config = load_config(None)
    assert type(config.sampler) is HFSamplerConfig
    Sampler(config.sampler, seed=0)
    assert capsys.readouterr().err.count("sampling with HF generate: vLLM is not installed") == 1
    Sampler(load_config(None, ["sampler.backend=hf"]).sampler, seed=0)  # also said when hf is asked for: vLLM would be faster
    assert "vLLM is not installed" in capsys.readouterr().err
    monkeypatch.undo()

    saved = yaml.safe_load(dump_config(load_config(None, ["sampler.backend=hf"])))
    del saved["sampler"]["backend"]
    assert type(load_saved_config(write(tmp_path, yaml.safe_dump(saved))).sampler) is HFSamplerConfig


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
    assert config.loss.params == {"beta": 0.2, "label_smoothing": 0.0, "rpo_alpha": 0.0, "length_alpha": 0.0}  # defaults filled in
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
    assert load_config(None, ["feedback.mode=random_maximal"]).feedback.mode == "random_maximal"
    for mode in ("random", "random_maximal"):
        with pytest.raises(ConfigError, match="feedback: length_balance takes pairwise feedback with mode max or min"):
            load_config(None, [f"feedback.mode={mode}", "feedback.length_balance=true"])


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


def test_sampler_and_labeler_are_one_of_several_kinds():
    """`backend` and `kind` pick the section's class; a key of another kind names the kind it needs."""
    from alignloop.config import CallableLabelerConfig, HFSamplerConfig, JudgeConfig, RewardModelConfig, VLLMSamplerConfig

    config = load_config(None)
    assert type(config.labeler) is CallableLabelerConfig
    assert type(load_config(None, ["sampler.backend=hf"]).sampler) is HFSamplerConfig
    assert type(load_config(None, ["sampler.backend=vllm"]).sampler) is VLLMSamplerConfig
    judge = load_config(None, ["labeler.kind=judge", "labeler.base_url=http://h/v1", "labeler.model=m"]).labeler
    assert type(judge) is JudgeConfig and judge.max_concurrency == 8
    assert type(load_config(None, ["labeler.kind=reward_model", "labeler.path=/rm"]).labeler) is RewardModelConfig
    for bad, message in ((["sampler.backend=vllm", "sampler.batch_size=4"], "sampler: batch_size needs backend 'hf'"),
                         (["labeler.base_url=http://h/v1"], "labeler: base_url needs kind 'judge'"),
                         (["labeler.kind=oracle"], "labeler.kind: unknown value 'oracle'; choose one of 'callable', 'judge', 'reward_model'"),
                         (["sampler.backend=jax"], "sampler.backend: unknown value 'jax'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, bad)


def test_a_verb_takes_its_sections_alone(tmp_path):
    """A stage verb validates only the sections it uses: one sample per prompt is fine for `sample`, though a run
    with pairwise feedback refuses it; flags (typed `values`) win over --set, which wins over the file."""
    from alignloop.config import load_sections

    path = write(tmp_path, "samples_per_prompt: 1\nsampler:\n  temperature: 0.7\n  top_p: 0.9\n")
    with pytest.raises(ConfigError, match="pairwise feedback needs samples_per_prompt >= 2"):
        load_config(path)
    c = load_sections(path, ["sampler.top_p=0.8"], {"sampler.max_new_tokens": 9}, ("sampler", "samples_per_prompt", "seed"))
    assert c["samples_per_prompt"] == 1 and c["seed"] == 0
    assert (c["sampler"].temperature, c["sampler"].top_p, c["sampler"].max_new_tokens) == (0.7, 0.8, 9)
    with pytest.raises(ConfigError, match=f"{path}: loss: unknown loss 'dpoo'; choose one of dpo, dpo_norm, grpo"):
        load_sections(path, [], {"loss.name": "dpoo"}, ("loss",))
    with pytest.raises(ConfigError, match="samplr: unknown key"):
        load_sections(None, ["samplr.top_p=0.5"], {}, ("sampler",))
