"""Tuning (issue 12): MetaSchedule tasks of a rewritten FlexiQ model, the on-disk database, the
RPC runners of device farms, and the database's use in builds (``compile(..., tuning_db=DIR)``).

Modules: ``tasks`` (extraction), ``space`` (design spaces), ``runner`` (builders, local/RPC runners),
``database`` (layout, ledger), ``progress`` (tqdm bar), ``apply`` (builds), ``tune`` (the driver),
``report``."""
from .database import TuningDB, target_key  # noqa: F401
from .report import TaskResult, TuneReport  # noqa: F401
from .tune import DEFAULT_DB, TUNE_TARGETS, tune_model, tune_module  # noqa: F401
