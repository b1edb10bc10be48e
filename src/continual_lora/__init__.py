"""continual-lora: update models with LoRA adapters over a sequence of datasets without
forgetting, and measure what was kept and what was lost.

Importing this package has no side effects: nothing is downloaded, no model is loaded.
"""

__version__ = "0.1.0"
