"""The search stage: the searches' drivers (driver.py), the fitness builds that score candidates
(fitness.py), accuracy recovery (recovery.py) and finetuning (finetune/).

Re-exports driver.py, the module that was `flexiq_tvm.search`."""
from .driver import *  # noqa: F401,F403
