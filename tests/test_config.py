import pytest
import yaml

from smolbox.config import CONFIG_DIR, LENGTH_KEYS, WEIGHT_KEYS, ConfigError, cli_fields, load_config, parse_scalar, read_dotenv

RECIPE_TARGETS = ["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"]


def test_seed_config_is_the_reference_recipe():
    cfg = load_config("seed", env={}, dotenv=None)
    assert cfg.model.id == "HuggingFaceTB/SmolVLM-Instruct"
    assert cfg.model.attn_implementation == "flash_attention_2"
    assert cfg.model.dtype == "bfloat16"
    assert (cfg.quant.load_in_4bit, cfg.quant.quant_type, cfg.quant.double_quant, cfg.quant.compute_dtype) == (True, "nf4", True, "bfloat16")
    a = cfg.adapter
    assert (a.r, a.alpha, a.dropout, a.use_dora, a.init_lora_weights) == (8, 8, 0.1, True, "gaussian")
    assert sorted(a.target_modules) == sorted(RECIPE_TARGETS)
    assert (cfg.data.id, cfg.data.train_split, cfg.data.eval_split) == ("HuggingFaceH4/rlaif-v_formatted", "train[:6%]", "test[:1%]")
    assert cfg.data.image_max_size == 512
    t = cfg.train
    # the recipe's micro-batch 1 x accumulation 32 on one GPU
    assert (t.global_batch_size, t.per_device_train_batch_size, t.per_device_eval_batch_size) == (32, 1, 1)
    assert t.num_train_epochs == 5 and t.max_steps == -1
    assert (t.bf16, t.gradient_checkpointing, t.logging_steps) == (True, True, 10)
    # TRL 1.16 / Trainer defaults the recipe leaves alone
    assert (t.learning_rate, t.beta, t.lr_scheduler_type, t.warmup_steps, t.save_steps) == (1e-6, 0.1, "linear", 0, 500)
    assert t.eval_steps is None and t.max_length is None


def test_seed_matches_trl_defaults_for_values_the_recipe_does_not_set():
    from trl import DPOConfig

    cfg = load_config("seed", env={}, dotenv=None)
    # activation_checkpointing: transformers 5.23's name for TRL's default gradient_checkpointing=True (which warns)
    trl_defaults = DPOConfig(output_dir="unused", use_cpu=True, bf16=False, activation_checkpointing=True)
    assert cfg.train.learning_rate == trl_defaults.learning_rate
    assert cfg.train.beta == trl_defaults.beta
    assert cfg.train.lr_scheduler_type == str(trl_defaults.lr_scheduler_type.value)
    assert cfg.train.weight_decay == trl_defaults.weight_decay
    assert cfg.train.max_grad_norm == trl_defaults.max_grad_norm
    assert cfg.train.save_steps == trl_defaults.save_steps
    assert trl_defaults.loss_type == ["sigmoid"]


@pytest.mark.parametrize("name", ["seed", "default", "lowmem", "tiny"])
def test_shipped_configs_validate(name):
    cfg = load_config(name, env={}, dotenv=None)
    assert cfg.fingerprint() == load_config(name, env={}, dotenv=None).fingerprint()


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"learning_rat": 1e-5}}))
    with pytest.raises(ConfigError, match="train.learning_rat"):
        load_config(p, env={}, dotenv=None)


def test_unknown_section_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  x: 1\n")
    with pytest.raises(ConfigError, match="'trainer'"):
        load_config(p, env={}, dotenv=None)


def test_wrong_type_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  per_device_train_batch_size: four\n")
    with pytest.raises(ConfigError, match="train.per_device_train_batch_size"):
        load_config(p, env={}, dotenv=None)


def test_precedence_yaml_dotenv_env_cli(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nSMOLBOX_TRAIN__LEARNING_RATE=2e-5\nexport SMOLBOX_RUN__NAME='from-dotenv'\nSMOLBOX_TRAIN__BETA=0.3\n")
    cfg = load_config("tiny", env={}, dotenv=dotenv)
    assert cfg.train.learning_rate == 2e-5 and cfg.run.name == "from-dotenv" and cfg.train.beta == 0.3
    cfg = load_config("tiny", env={"SMOLBOX_TRAIN__LEARNING_RATE": "3e-5"}, dotenv=dotenv)
    assert cfg.train.learning_rate == 3e-5 and cfg.run.name == "from-dotenv"
    cfg = load_config("tiny", overrides={"train.learning_rate": 4e-5}, env={"SMOLBOX_TRAIN__LEARNING_RATE": "3e-5"}, dotenv=dotenv)
    assert cfg.train.learning_rate == 4e-5


def test_env_selects_config_and_rejects_unknown_keys():
    assert load_config(None, env={"SMOLBOX_CONFIG": "seed"}, dotenv=None).run.name == "smolvlm-dpo-seed"
    with pytest.raises(ConfigError, match="SMOLBOX_TRAIN__LR"):
        load_config("tiny", env={"SMOLBOX_TRAIN__LR": "1"}, dotenv=None)
    with pytest.raises(ConfigError, match="train.bf16"):
        load_config("tiny", env={"SMOLBOX_TRAIN__BF16": "maybe"}, dotenv=None)


def test_cli_flags_mirror_the_schema(capsys):
    from smolbox.cli import main

    assert main(["config", "--config", "tiny", "--env-file", "", "--train.learning_rate", "1e-4", "--adapter.target_modules", "[q_proj, v_proj]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["learning_rate"] == 1e-4
    assert printed["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert main(["config", "--config", "tiny", "--env-file", "", "--train.seed", "x"]) == 2
    assert "train.seed" in capsys.readouterr().err


# Every setting that does not shape the trained weights, with another value: changing it must not stop a resume.
NOT_WEIGHTS = {
    "model.attn_implementation": "eager", "adapter.fused_dora": False, "data.eval_split": None, "data.num_proc": 2,
    "train.per_device_train_batch_size": 1, "train.per_device_eval_batch_size": 1, "train.gradient_checkpointing": True,
    "train.logging_steps": 5, "train.eval_steps": 3, "train.save_steps": 7, "train.save_total_limit": None,
    "train.dataloader_num_workers": 2, "train.precompute_ref_logps": True, "train.pack_pairs": False,
    "train.report_to": ["tensorboard"], "train.ddp_timeout_s": 60, "train.compile": True, "train.compile_backend": "aot_eager",
    "train.compile_eager_rounding": False, "train.cudnn_attention": "vision",
    "adapter.fused_dora_bias": True, "adapter.dora_norm_cache": True,
    "run.name": "elsewhere", "run.output_dir": "/somewhere/else", "run.device": "auto", "run.resume": "never",
    "run.hf_cache": "/cache", "run.min_free_disk_gb": 1.0,
}


@pytest.mark.parametrize("key", sorted(NOT_WEIGHTS))
def test_fingerprint_leaves_out_settings_that_do_not_shape_the_weights(key):
    base = load_config("tiny", env={}, dotenv=None)
    changed = load_config("tiny", overrides={key: NOT_WEIGHTS[key]}, env={}, dotenv=None)
    assert changed.to_dict() != base.to_dict()
    assert changed.fingerprint() == base.fingerprint()


@pytest.mark.parametrize("key", WEIGHT_KEYS)
def test_fingerprint_covers_every_weight_setting(key):
    base = load_config("tiny", env={}, dotenv=None)
    section, field = key.split(".")
    value = getattr(getattr(base, section), field)
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 1.5 + 0.05, str: lambda v: v + "x",
             list: lambda v: v[:1], type(None): lambda v: 512 if key == "train.max_length" else "v2"}[type(value)](value)
    other = {"quant.quant_type": "fp4", "model.dtype": "bfloat16", "quant.compute_dtype": "bfloat16",
             "adapter.init_lora_weights": "default", "data.on_bad_row": "fail"}.get(key, other)
    changed = load_config("tiny", overrides={key: other}, env={}, dotenv=None)
    assert changed.fingerprint() != base.fingerprint()


def test_every_field_is_weight_setting_length_or_not_weights():
    """A new config field must be placed: in WEIGHT_KEYS, LENGTH_KEYS or the list above (export, eval and serve never count)."""
    fields = {dotted for dotted, _ in cli_fields() if not dotted.startswith(("export.", "eval.", "serve."))}
    assert fields == set(WEIGHT_KEYS) | set(LENGTH_KEYS) | set(NOT_WEIGHTS)
    assert not set(WEIGHT_KEYS) & set(NOT_WEIGHTS)


def test_read_dotenv_rejects_garbage(tmp_path):
    p = tmp_path / ".env"
    p.write_text("NOT A PAIR\n")
    with pytest.raises(ConfigError, match=":1:"):
        read_dotenv(p)


def test_every_shipped_config_is_in_the_config_dir():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} >= {"seed", "default", "tiny"}


def test_onnxruntime_session_config_values_become_text():
    """YAML reads `1` as an int and `true` as a bool; onnxruntime session config entries are strings."""
    cfg = load_config("default", overrides={"serve.ort_session_config": parse_scalar("{ep.cuda.fpa_intb_gemm: 1, x: true}")},
                      env={}, dotenv=None)
    assert cfg.serve.ort_session_config == {"ep.cuda.fpa_intb_gemm": "1", "x": "1"}


def test_a_bad_value_names_where_it_came_from(tmp_path):
    """The YAML file, a .env line (with its path), an environment variable or a CLI flag: each is named as the origin."""
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  beta: -1\n")
    dotenv = tmp_path / "my.env"
    dotenv.write_text("# comment\nSMOLBOX_TRAIN__SEED=seven\nSMOLBOX_RUN__DEVICE=tpu\n")
    with pytest.raises(ConfigError) as err:
        load_config(yaml_file, overrides={"train.logging_steps": 0}, env={"SMOLBOX_RUN__DEVICE": "gpu"}, dotenv=dotenv)
    lines = {line.split(":")[0].strip(): line for line in str(err.value).splitlines()[1:]}
    assert f"from {yaml_file}" in lines["train.beta"]
    assert f"from line 2 of {dotenv} (SMOLBOX_TRAIN__SEED)" in lines["train.seed"]
    assert "from environment variable SMOLBOX_RUN__DEVICE" in lines["run.device"]  # the environment beats .env
    assert "from --train.logging_steps" in lines["train.logging_steps"]
    with pytest.raises(ConfigError, match=rf"line 1 of {dotenv} \(SMOLBOX_CONFIG\): config file not found: nope"):
        dotenv.write_text("SMOLBOX_CONFIG=nope\n")
        load_config(None, env={}, dotenv=dotenv)


def test_unknown_keys_list_the_valid_ones_closest_first(tmp_path):
    with pytest.raises(ConfigError, match=r"^environment variable SMOLBOX_TRAIN__LEARNING_RAT: .*closest first: learning_rate, "):
        load_config("tiny", env={"SMOLBOX_TRAIN__LEARNING_RAT": "1"}, dotenv=None)
    with pytest.raises(ConfigError, match=r"sections, closest first: train, "):
        load_config("tiny", overrides={"trian.seed": 1}, env={}, dotenv=None)
