"""The run configuration: the schema, built from one function per section (:mod:`.schema`); the
check of a whole config, one call per section to the check its consumer owns (:mod:`.checks`);
the keyword arguments a config gives the loss, the queue and the theory monitor
(:mod:`.options`); configs on disk and the config of a finished run (:mod:`.files`); the command
line of the tools that take a config file (:mod:`.flags`).

``python -m hscl_jax.config --list [--config=FILE]`` prints every field with its default (or the
file's value) and its help.
"""

from hscl_jax.config.checks import (
    check_across_sections,
    check_batch_has_negatives,
    check_data_dir_reachable,
    check_knn,
    check_queue,
    check_run,
    validate_config,
)
from hscl_jax.config.files import (
    RESUME_SENSITIVE,
    check_field_path,
    config_from_file,
    load_config,
    resume_mismatches,
    to_json_ready,
)
from hscl_jax.config.flags import CONFIG_FLAG_HELP, check_config_flags, parse_flags
from hscl_jax.config.options import (
    QUEUE_LOSS_OPTIONS,
    num_devices_for,
    queue_options,
    reference_size_for,
    theory_hyperparameters,
    theory_monitor_options,
    total_steps_for,
)
from hscl_jax.config.schema import (
    SECTIONS,
    ConfigError,
    base_config,
    documented_fields,
    field_help,
    knn_config,
    list_fields,
    loss_config,
    model_config,
    optim_config,
    queue_config,
    run_fields,
    theory_config,
)

__all__ = [
    "CONFIG_FLAG_HELP",
    "QUEUE_LOSS_OPTIONS",
    "RESUME_SENSITIVE",
    "SECTIONS",
    "ConfigError",
    "base_config",
    "check_across_sections",
    "check_batch_has_negatives",
    "check_config_flags",
    "check_data_dir_reachable",
    "check_field_path",
    "check_knn",
    "check_queue",
    "check_run",
    "config_from_file",
    "documented_fields",
    "field_help",
    "knn_config",
    "list_fields",
    "load_config",
    "loss_config",
    "model_config",
    "num_devices_for",
    "optim_config",
    "parse_flags",
    "queue_config",
    "queue_options",
    "reference_size_for",
    "resume_mismatches",
    "run_fields",
    "theory_config",
    "theory_hyperparameters",
    "theory_monitor_options",
    "to_json_ready",
    "total_steps_for",
    "validate_config",
]
