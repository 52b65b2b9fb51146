"""Library messages a user cannot act on, silenced here and nowhere else, each with the reason.

Entry points call :func:`silence_known_noise` (the CLI, and every flow as it starts): nothing deeper
changes logging or warning filters. Anything not listed here is shown.
"""

from __future__ import annotations

import logging
import warnings

# bitsandbytes 0.50 looks for an optional accelerated CPU kernel in the `kernels` package (a Hub
# download loraflow never makes) and logs a warning when it is absent; it then uses its own kernel,
# which is the one loraflow is measured and tested with.
_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR}

# peft 0.21's PeftModel reads `is_gradient_checkpointing`, which transformers 5 deprecated in favour of
# `is_activation_checkpointing`; loraflow itself never calls it, and peft's next release stops.
WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]


def silence_known_noise() -> None:
    for name, level in _LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
