"""fedlora: federated LoRA fine-tuning; the `fedlora` command lives in `fedlora.cli`."""

__version__ = "0.1.0"
