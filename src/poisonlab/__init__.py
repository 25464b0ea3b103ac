"""poisonlab: measure and defend against data-poisoning backdoors in language models."""

__version__ = "0.1.0"
