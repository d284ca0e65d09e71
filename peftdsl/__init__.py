"""peftdsl: compose PEFT adapters with arithmetic, declared in versioned recipes."""

__version__ = "0.1.0"
