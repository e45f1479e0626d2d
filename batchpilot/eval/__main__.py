"""``python -m batchpilot.eval ARGS``: lm-eval's own CLI (``lm_eval ARGS``) with the batchpilot model registered.

lm-eval discovers no third-party model types by itself (its registry holds its own lazy entries), so
``--model batchpilot`` needs this module imported first; every other argument is lm-eval's.
"""

import batchpilot.eval.lm_eval_model  # noqa: F401 - registers "batchpilot" with lm-eval's registry
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
