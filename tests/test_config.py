import pytest

from tasks.config import ConfigError, RewardRunConfig, RunConfig, config_from_params, form_field_schemas


def test_profiles_differ_where_they_should():
    demo = RunConfig.for_profile("demo")
    production = RunConfig.for_profile("production")
    assert production.model.reward_model_name == "facebook/roberta-hate-speech-dynabench-r4-target"
    # target_modules None: peft's default for the architecture, q and v for T5 as in the seeds
    assert production.lora.r == 32 and production.lora.target_modules is None
    assert production.ppo.learning_rate == pytest.approx(1.41e-5)
    assert demo.model.policy_name.endswith("policy-base")
    assert demo.device == "cpu"


def test_dotted_and_nested_overrides():
    config = RunConfig.for_profile("demo", {"ppo.steps": 3, "eval": {"num_samples": 7}})
    assert config.ppo.steps == 3
    assert config.eval.num_samples == 7
    assert config.eval.batch_size == RunConfig.for_profile("demo").eval.batch_size


def test_unknown_fields_are_named():
    with pytest.raises(ConfigError, match=r"unknown field 'ppo\.learnin_rate'"):
        RunConfig.for_profile("demo", {"ppo.learnin_rate": 1e-4})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ppo.batch_size": 10, "ppo.mini_batch_size": 4}, "ppo.batch_size 10 must be a multiple of ppo.mini_batch"),
        ({"ppo.num_processes": 3}, "ppo.mini_batch_size 16 cannot be split into ppo.num_processes=3 x "
                                   "ppo.gradient_accumulation_steps=1 equal micro-batches"),
        ({"ppo.mini_batch_size": 8, "ppo.gradient_accumulation_steps": 3},
         "ppo.mini_batch_size 8 cannot be split into ppo.gradient_accumulation_steps=3"),
        ({"generation.top_k": 50}, "generation.top_k=50 would truncate the rollout's sampling"),
        ({"generation.top_p": 0.9}, "generation.top_p=0.9 would truncate the rollout's sampling"),
        ({"ppo.mixed_precision": "bf16"}, "ppo.mixed_precision 'bf16' needs CUDA, but device is 'cpu'"),
        ({"data.prompt_template": "no placeholder"}, "{dialogue}"),
        ({"ppo.steps": 0}, "ppo.steps"),
        ({"data.min_dialogue_chars": 500, "data.max_dialogue_chars": 100}, "min_dialogue_chars"),
    ],
)
def test_bad_values_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        RunConfig.for_profile("demo", overrides)


def test_optimizer_steps_per_epoch_do_not_depend_on_the_number_of_processes():
    # The seeds' 16 / 4: four optimizer steps per PPO epoch on 1, 2 or 4 GPUs (each with 4 / N rows of
    # every mini-batch); 3 GPUs cannot share a mini-batch of 4 and are refused before training.
    for processes in (1, 2, 4):
        config = RunConfig.for_profile("production", {"ppo.num_processes": processes})
        assert config.ppo.batch_size // config.ppo.mini_batch_size == 4
    with pytest.raises(ConfigError, match="ppo.mini_batch_size 4 cannot be split into ppo.num_processes=3"):
        RunConfig.for_profile("production", {"ppo.num_processes": 3})


def test_evaluation_samples_with_its_own_settings():
    config = RunConfig.for_profile("demo", {"eval.top_k": 50, "eval.top_p": 0.9, "eval.temperature": 0.7})
    assert (config.eval.top_k, config.eval.top_p, config.eval.temperature) == (50, 0.9, 0.7)
    assert (config.generation.top_k, config.generation.top_p, config.generation.temperature) == (0, 1.0, 1.0)


def test_params_map_onto_config():
    config = config_from_params({"profile": "demo", "ppo_steps": 4, "learning_rate": None,
                                 "overrides": {"ppo.seed": 9}})
    assert config.ppo.steps == 4 and config.ppo.seed == 9
    assert config.ppo.learning_rate == RunConfig.for_profile("demo").ppo.learning_rate
    with pytest.raises(ConfigError, match="unknown parameter"):
        config_from_params({"profile": "demo", "ppo_stepz": 4})


def test_form_schema_carries_bounds_and_descriptions():
    schemas = form_field_schemas()
    assert schemas["ppo_steps"]["type"] == ["null", "integer"]
    assert schemas["ppo_steps"]["exclusiveMinimum"] == 0
    assert schemas["max_rouge_l_drop"]["maximum"] == 1
    assert all(schema["description"] for schema in schemas.values())


def test_run_dir_is_run_scoped_and_safe(tmp_path):
    config = RunConfig.for_profile("demo", {"artifact_root": str(tmp_path)})
    first = config.run_dir("manual__2026-11-21T05:00:00+00:00")
    second = config.run_dir("scheduled__2026-11-21T05:00:00+00:00")
    assert first != second
    assert first.parent == tmp_path and ":" not in first.name


def test_the_tinyllama_profile_is_the_third_seeds_qlora_setup():
    config = RunConfig.for_profile("production-tinyllama")
    assert config.profile == "production-tinyllama"
    assert config.model.policy_family == "causal" and config.model.load_in_4bit
    assert config.model.eos_token == "<|im_end|>"
    assert config.data.prompt_template.endswith("<|im_start|>assistant\n")
    assert (config.lora.r, config.lora.alpha) == (16, 16)
    assert config.model.reward_model_name == RunConfig.for_profile("production").model.reward_model_name
    assert config.registered_model_name != RunConfig.for_profile("production").registered_model_name
    with pytest.raises(ConfigError, match="unknown profile 'production-tinyllama'"):
        RewardRunConfig.for_profile("production-tinyllama")  # a retraining profile only
    with pytest.raises(ConfigError, match="unknown profile 'staging'"):
        RunConfig.for_profile("production", {"profile": "staging"})
