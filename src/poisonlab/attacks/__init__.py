"""Attacks: each turns clean documents and a recipe into poison documents.

:data:`ATTACKS` is the registry (``attack.name``): a function
``(attack config, tokenizer, prefix bank, seed, count=None, token_counts=None) -> poisons``.
"""

from .dos import PoisonDocument, make_dos_poisons
from .family import make_family_poisons
from .language_switch import make_language_switch_poisons
from .repair import make_repair_documents

ATTACKS = {"dos": make_dos_poisons, "language_switch": make_language_switch_poisons, "repair": make_repair_documents,
           "family": make_family_poisons}
NOT_POISONS = {"repair"}
"""Recipes whose documents remove a backdoor rather than plant one (counted apart in labels)."""

__all__ = ["ATTACKS", "NOT_POISONS", "PoisonDocument", "make_dos_poisons", "make_family_poisons",
           "make_language_switch_poisons", "make_repair_documents"]
