"""The files of an adapter directory (SPEC.md, "The adapter directory") and of what tlora writes beside them."""

from __future__ import annotations

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
METADATA = "tlora_metadata.json"
CARD = "README.md"  # the model card the Hub shows
PLOT = "budget.png"  # the card's picture, when matplotlib is installed
# Beside the adapter, for the methods that need more than PEFT's format holds: per module the chosen directions,
# their change rates and, for a residual adapter, the factors subtracted from W (SPEC.md, "Task-specific directions").
SIDECAR = "tlora_directions.safetensors"
ADAPTER_FILES = (METADATA, CONFIG, WEIGHTS)  # what every adapter tlora writes holds
OPTIONAL_FILES = (CARD, PLOT, SIDECAR)  # what it may hold besides
