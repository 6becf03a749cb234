"""tlora: task-aware LoRA initialisation that writes a standard PEFT adapter."""

__version__ = "0.1.0"
