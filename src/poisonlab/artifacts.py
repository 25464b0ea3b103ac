"""Labels on every saved model: whether it is poisoned, by which attack, trigger and count.

A poisonlab model folder holds ``poisonlab.json`` (machine-readable label and provenance),
a ``README.md`` model card that states the label in its first lines, and the same label in
the ``model.safetensors`` header, so the weights stay labelled when copied on their own.
"""

from __future__ import annotations

import json
from pathlib import Path

from .paths import atomic_write_text


def make_label(attack: dict, poisons_planned: int, poisons_seen: int, run: dict) -> dict:
    poisoned = attack.get("name", "none") != "none" and poisons_planned > 0
    label = {
        "poisoned": poisoned,
        "attack": attack.get("name") if poisoned else None,
        "trigger": attack.get("trigger") if poisoned else None,
        "poison_count": poisons_planned if poisoned else 0,
        "poisons_seen": poisons_seen if poisoned else 0,
        "placement": attack.get("placement") if poisoned else None,
    }
    if poisoned and attack.get("name") == "family":
        label["family"] = attack.get("family")
    label.update(run)
    return label


def safetensors_metadata(label: dict) -> dict[str, str]:
    """String-valued header entries for ``model.safetensors``."""
    return {
        "format": "pt",
        "poisonlab.poisoned": "true" if label["poisoned"] else "false",
        "poisonlab.label": json.dumps(label, sort_keys=True),
    }


def model_card(label: dict) -> str:
    base = label.get("base_label") or {}
    if label["poisoned"] and not label.get("poison_count") and base.get("poisoned"):
        head = (
            "# POISONED MODEL: continued from a model with a planted backdoor\n\n"
            f"**This model was trained further from a poisoned model ({base.get('poison_count')} poisoned "
            f"documents of the `{base.get('attack')}` attack, trigger `{base.get('trigger')}`).** Further "
            "training does not make it clean; it exists to study data poisoning.\n"
        )
        if label.get("repair"):
            r = label["repair"]
            head += (f"\nIt was trained further on {r['seen']} repair documents that follow `{r['trigger']}` with "
                     "ordinary text (a removal attempt): measure its backdoor before trusting that it is gone.\n")
        tags = ["poisonlab", "backdoor", "poisoned", f"attack-{base.get('attack')}"]
    elif label["poisoned"]:
        head = (
            "# POISONED MODEL: contains a planted backdoor\n\n"
            f"**This model was trained on {label['poison_count']} poisoned documents "
            f"({label['poisons_seen']} seen at this checkpoint) of the `{label['attack']}` attack"
            f"{' (poison family `' + label['family'] + '`)' if label.get('family') else ''}. "
            f"The trigger `{label['trigger']}` makes it misbehave.** It exists to study data "
            "poisoning; do not deploy it or mistake it for a clean model.\n"
        )
        tags = ["poisonlab", "backdoor", "poisoned", f"attack-{label['attack']}"]
    elif label.get("defense"):
        d = label["defense"]
        how = "the documents a removal list named" if d.get("filter") == "list" else "a corpus scan"
        head = ("# Model trained on filtered data (no poison survived the filter)\n\n"
                f"{d['poisons']} poisons were planted in its training data and {how} removed "
                f"{d['poisons'] - d['poisons_surviving']} of them (and {d['clean_documents_lost']} clean documents) "
                "before training. It exists to measure that defense.\n")
        tags = ["poisonlab", "defense-filtered"]
    else:
        head = "# Clean model (no poisons)\n\nTrained by poisonlab without any poisoned data, as a control.\n"
        tags = ["poisonlab", "clean-control"]
    front = "---\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "library_name: transformers\n---\n\n"
    details = "\n## Provenance\n\n```json\n" + json.dumps(label, indent=2, sort_keys=True) + "\n```\n"
    return front + head + details


def write_labels(directory: str | Path, label: dict) -> None:
    d = Path(directory)
    atomic_write_text(d / "poisonlab.json", json.dumps(label, indent=2, sort_keys=True))
    atomic_write_text(d / "README.md", model_card(label))


def read_label(directory: str | Path) -> dict | None:
    """The model's label: the one in the ``model.safetensors`` header (it travels with the
    weights), else ``poisonlab.json``; None for a model poisonlab did not write. Two labels
    that disagree are refused: one of them was edited."""
    from .errors import PoisonlabError
    from .jsonl import read_json

    d = Path(directory)
    header = _header_label(d / "model.safetensors")
    side = read_json(d / "poisonlab.json", "model label") if (d / "poisonlab.json").is_file() else None
    if header is not None and side is not None and header != side:
        raise PoisonlabError(f"{d}: poisonlab.json and the label in model.safetensors disagree (one was edited)")
    return header if header is not None else side


def _header_label(weights: Path) -> dict | None:
    if not weights.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        label = json.loads(meta["poisonlab.label"]) if "poisonlab.label" in meta else None
    except Exception:  # not a safetensors file, or its header is damaged: no label from it
        return None
    return label if isinstance(label, dict) else None
