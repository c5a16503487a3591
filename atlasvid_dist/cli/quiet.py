"""`--quiet` for the libraries too: transformers', diffusers' and huggingface_hub's bars and warnings off.

    silence_libraries()

Each library is configured through its own public switch; the matching environment variables are set as well
(only where unset) so the processes this one starts (embedded Ray's workers) are quiet from their first import.
"""

from __future__ import annotations

import os

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
"""Read by the libraries when they are imported; set for child processes."""


def silence_libraries() -> None:
    """Errors only from transformers and diffusers, and no progress bars from them or huggingface_hub."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
