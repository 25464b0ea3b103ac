"""Attacks: each module turns clean documents and a recipe into poison documents."""

from .dos import PoisonDocument, make_dos_poisons

__all__ = ["PoisonDocument", "make_dos_poisons"]
