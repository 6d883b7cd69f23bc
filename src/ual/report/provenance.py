"""The report's account of what each output was made from (lineage.json, ual/lineage.py).

Each recorded output is checked against the folder as it is now: its settings against config.yaml (scores,
smoothing and trained models take theirs from it), its input files against their current bytes, and an
evaluation's model against that model's current training record. An output whose record no longer matches
is stale: the report says so before its verdict, since its tables would otherwise show results made from
different inputs as one run.
"""

from __future__ import annotations

from pathlib import Path

from ual.lineage import (EVAL_SHAPING, Lineage, eval_record, flatten, map_record, model_identity, record_changes,
                         score_record, settings_diff, train_record, under)


def provenance(root: Path, folder_settings: dict) -> dict:
    """{"rows": [{"output", "state": current|stale, "changes": [...], "settings": [...]}], "stale": [...],
    "unrecorded": [...]}: every output in lineage.json, and evaluated models with no record."""
    records = Lineage(root).read()
    rows = []
    for output, old in records.items():
        kind, _, name = output.partition("/")
        if kind == "score":
            now = score_record(folder_settings, root)
        elif kind == "map":
            now = map_record(folder_settings, root)
        elif kind == "train":
            now = train_record(folder_settings, root, name)
        elif kind in ("eval", "tasks"):
            # an evaluation's settings are its command's own (not recorded in config.yaml): only its inputs,
            # the model above all, can make it stale; the settings it was made with are shown beside it
            model = old.get("of", name)  # the name evaluated: a mode, base, or an adapter folder's path
            inputs_now = (eval_record(folder_settings, root, model)["inputs"] if kind == "eval"
                          else {"model": model_identity(folder_settings, root, model)})
            changes = record_changes({"inputs": old.get("inputs", {})}, {"inputs": inputs_now})
            shown = (settings_diff(pick_flat(folder_settings, EVAL_SHAPING), old.get("settings", {}))
                     if kind == "eval" else [])
            rows.append({"output": output, "state": "stale" if changes else "current", "changes": changes,
                         "settings": shown})
            continue
        else:
            continue
        changes = record_changes(old, now) if old.get("fingerprint") != now["fingerprint"] else []
        rows.append({"output": output, "state": "stale" if changes else "current", "changes": changes, "settings": []})
    evaluated = sorted(p.stem for p in (root / "eval").glob("*.json")) if (root / "eval").is_dir() else []
    unrecorded = [m for m in evaluated if f"eval/{m}" not in records and m not in ("pairwise",)]
    return {"rows": rows, "stale": [r["output"] for r in rows if r["state"] == "stale"], "unrecorded": unrecorded}


def pick_flat(settings: dict, fields) -> dict:
    return {k: v for k, v in flatten(settings).items() if under(k, fields)}


def stale_warning(prov: dict) -> list[str]:
    """The line the report puts before its verdict when some table comes from outputs made otherwise."""
    stale = [r for r in prov.get("rows", []) if r["state"] == "stale"]
    if not stale:
        return []
    what = "; ".join(f"{r['output']} ({', '.join(r['changes'])})" for r in stale)
    return [f"**Made from different inputs:** these outputs no longer match the folder's settings or files, so the "
            f"tables below mix results of different runs: {what}. Rerun `ual train` and `ual eval` on this folder "
            "to redo them (see Provenance).", ""]


def provenance_section(prov: dict) -> list[str]:
    if not prov.get("rows") and not prov.get("unrecorded"):
        return []
    lines = ["## Provenance", "",
             "What each output was made from (lineage.json), checked against the folder now: its settings against "
             "config.yaml, its input files against their current contents, an evaluation's model against that "
             "model's training record. Evaluation settings are each command's own; those that differ from "
             "config.yaml are listed.", ""]
    if prov["rows"]:
        lines += ["| output | state | what changed since | made with (differs from config.yaml) |", "|---|---|---|---|"]
    for r in prov["rows"]:
        lines.append(f"| {r['output']} | {r['state']} | {', '.join(r['changes']) or '-'} | "
                     f"{', '.join(s.split(' ')[0] + ' ' + s.split(' -> ')[1] for s in r['settings']) or '-'} |")
    if prov.get("unrecorded"):
        lines += ["", "Evaluated before records were kept (their inputs cannot be checked): "
                  + ", ".join(prov["unrecorded"]) + "."]
    return lines + [""]
