"""Standard web-data quality filters, as the ``datatrove`` library implements them, run on the
same documents as the scanners: Gopher quality and repetition (Rae et al. 2021), C4 (Raffel
et al. 2020) and FineWeb (Penedo et al. 2024) rules, with datatrove's default settings.

Each returns the set of document ids it would drop. datatrove is an optional dependency
(``pip install 'poisonlab[defenses]'``).
"""

from __future__ import annotations

from ..corpus import Document
from ..errors import PoisonlabError

BASELINES = ("gopher_quality", "gopher_repetition", "c4", "fineweb")


def _filters() -> dict:
    try:
        from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                                GopherRepetitionFilter)
    except ImportError as e:
        raise PoisonlabError(f"the baseline filters need datatrove and spacy ({e}); pip install 'poisonlab[defenses]'") from None
    return {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
            "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}


def run_baselines(docs: list[Document], names=BASELINES, cache: dict | None = None) -> dict[str, dict[str, str]]:
    """name -> {dropped document id: the filter's reason}.

    ``cache`` (a dict kept by the caller) remembers verdicts by filter and content hash, so the
    clean documents shared by several evaluations are judged once.
    """
    from datatrove.data import Document as DTDocument

    classes = _filters()
    cache = {} if cache is None else cache
    out: dict[str, dict[str, str]] = {}
    for name in names:
        f = classes[name]()
        dropped = {}
        for d in docs:
            key = (name, d.sha256)
            if key not in cache:
                verdict = f.filter(DTDocument(text=d.text, id=d.id))
                keep, reason = verdict if isinstance(verdict, tuple) else (verdict, name)
                cache[key] = None if keep else (reason or name)
            if cache[key] is not None:
                dropped[d.id] = cache[key]
        out[name] = dropped
    return out
