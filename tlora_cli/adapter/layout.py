"""The files of an adapter directory (SPEC.md, "The adapter directory") and of what tlora writes beside them."""

from __future__ import annotations

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
METADATA = "tlora_metadata.json"
CARD = "README.md"  # the model card the Hub shows
PLOT = "budget.png"  # the card's picture, when matplotlib is installed
ADAPTER_FILES = (METADATA, CONFIG, WEIGHTS)  # what every adapter tlora writes holds
