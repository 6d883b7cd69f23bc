"""The run folder: the contract between stages (see README, "Run folder").

    runs/NAME/
      config.yaml            the folder's settings, recorded by each stage that succeeds (ual/lineage.py)
      lineage.json           what each output was made from: its settings and its input files' sha256
      samples.jsonl          training samples (Sample.to_dict), heldout.jsonl for evaluation
      data_stats.json        per-source counts (read, skipped, truncated, train, heldout)
      scores.jsonl           id, source, score, scorer, details (the scores `ual map` uses: the last scorer run)
      scores/SCORER.jsonl    the same rows, kept per scorer, so scorers run on the same data can be compared
      heldout_scores.jsonl   the same scorer on the held-out samples (scores/heldout/SCORER.jsonl per scorer)
      scores_report/         histograms per source, failures with reasons, rank correlation between scorers
      smoothing.jsonl        id, source, score, eps (the UAL mode's per-sample smoothing)
      tokenized/SPLIT-LMAX/  the tokenized training and held-out sets (datasets Arrow, memory-mapped), built
                             once per samples file, tokenizer, template, max_length (ual/data/tokenized.py)
      train/MODE/            adapter (or model), log.json, result.json
      eval/MODEL.json        metrics of one model (base or a trained mode)
      eval/items/            per-item results of each model: MODEL.nll.jsonl (held-out sample), MODEL.tokens.npz
                             (held-out token: confidence, correct), MODEL.mc.jsonl, MODEL.maths.jsonl, pairwise.A_vs_B.jsonl
      comparisons.json       paired differences between models (eval.compare) with bootstrap intervals
      eval/tasks/MODEL.json  lm-eval benchmarks of one model; eval/features/MODEL.npz for clustering
      eval/answers/          MODEL.json: each model's answers to held-out chat prompts (alpaca_eval layout),
                             side_by_side.json: the prompts the report shows side by side, and their rule
      report.md, metrics.json, *.png

Every stage reads its inputs from here and writes its outputs atomically, so a
stage can be rerun alone and a crashed run resumed where it stopped.

Outputs never disagree with each other or with config.yaml. config.yaml changes only when a
stage succeeds (a failed or dry run leaves the folder byte-identical: ual/lineage.py), and a stage
replaces its outputs only once the new ones exist; what derives from replaced outputs goes with
them (`ual data` with other samples removes the scores and smoothing, which name samples by id;
`ual score` removes the smoothing: RunFolder.discard). The per-scorer copies in scores/ are a
cache keyed by sample id and scorer, not current outputs: they stay, and `ual score` restores
scores.jsonl from them without a model call when the samples and settings are the same. train/
and eval/ outputs are redone when lineage.json says their settings or inputs changed, and reused
otherwise (`--force` redoes them anyway).
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ual.sample import Sample
from ual.io import iter_jsonl, read_jsonl

# What each stage writes (paths under the run folder), and the stages whose outputs derive from them.
STAGE_OUTPUTS = {
    "data": ("samples.jsonl", "heldout.jsonl", "data_stats.json"),
    "score": ("scores.jsonl", "heldout_scores.jsonl", "scores_report"),
    "map": ("smoothing.jsonl", "smoothing_stats.json"),
}
DERIVED = {"data": ("score", "map"), "score": ("map",), "map": ()}


def model_key(name: str) -> str:
    """File name of a model's results: base, a trained mode, or an adapter/model folder's name."""
    return Path(name).name if ("/" in name or name.startswith(".")) else name


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.root / "data_stats.json"

    @property
    def scores(self) -> Path:
        return self.root / "scores.jsonl"

    @property
    def scores_dir(self) -> Path:
        return self.root / "scores"

    @property
    def heldout_scores(self) -> Path:
        return self.root / "heldout_scores.jsonl"

    def scorer_scores(self, scorer: str, split: str = "train") -> Path:
        """scores/SCORER.jsonl: "judge:gpt-4o-mini:uncertainty-v1" -> scores/judge_gpt-4o-mini_uncertainty-v1.jsonl
        (held-out samples: scores/heldout/SCORER.jsonl)."""
        folder = self.scores_dir if split == "train" else self.scores_dir / split
        return folder / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', scorer).strip('_')}.jsonl"

    @property
    def scores_report(self) -> Path:
        return self.root / "scores_report"

    @property
    def smoothing(self) -> Path:
        return self.root / "smoothing.jsonl"

    @property
    def smoothing_stats(self) -> Path:
        return self.root / "smoothing_stats.json"

    def train_dir(self, mode: str) -> Path:
        return self.root / "train" / mode

    def eval_file(self, model: str) -> Path:
        return self.root / "eval" / f"{model}.json"

    @property
    def items_dir(self) -> Path:
        return self.root / "eval" / "items"

    def items_file(self, model: str, kind: str) -> Path:
        """eval/items/MODEL.KIND.jsonl: per-item results (nll per held-out sample, mc per question, maths,
        task-NAME per benchmark item)."""
        return self.items_dir / f"{model}.{kind}.jsonl"

    def tokens_file(self, model: str) -> Path:
        """eval/items/MODEL.tokens.npz: per held-out response token, confidence and correctness (calibration)."""
        return self.root / "eval" / "items" / f"{model}.tokens.npz"

    @property
    def comparisons(self) -> Path:
        return self.root / "comparisons.json"

    def features_file(self, model: str) -> Path:
        return self.root / "eval" / "features" / f"{model}.npz"

    def answers_file(self, model: str) -> Path:
        """eval/answers/MODEL.json: the model's answers to held-out chat prompts (evaluation/answers.py)."""
        return self.root / "eval" / "answers" / f"{model}.json"

    @property
    def answers_selection(self) -> Path:
        """eval/answers/side_by_side.json: the prompts every model answers for the report, and the rule."""
        return self.root / "eval" / "answers" / "side_by_side.json"

    @property
    def tasks_dir(self) -> Path:
        return self.root / "eval" / "tasks"

    def tasks_file(self, model: str) -> Path:
        return self.tasks_dir / f"{model}.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def require(self, path: Path, stage: str) -> Path:
        """Fail with the command to run when an earlier stage's output is missing."""
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `ual {stage}` on this run folder first")
        return path

    def load_samples(self, which: str = "train") -> list[Sample]:
        path = self.require(self.samples if which == "train" else self.heldout, "data")
        return [Sample.from_dict(r) for r in read_jsonl(path)]

    def discard(self, stage: str, keep: tuple[Path, ...] = ()) -> list[Path]:
        """Remove `stage`'s outputs and those derived from them (see the module docstring), except
        the paths in `keep`; returns what was removed."""
        keep_set = {p.resolve() for p in keep}
        removed = []
        for name in (n for s in (stage, *DERIVED[stage]) for n in STAGE_OUTPUTS[s]):
            path = self.root / name
            if path.resolve() in keep_set or not (path.exists() or path.is_symlink()):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        return removed


@dataclass
class Scores:
    """A checked score file: id -> score (None: the scorer could not score it), the line of each id and
    its whole row (scorer, source, details: what a scorer wrote beside the score)."""

    path: Path
    score: dict[str, float | None] = field(default_factory=dict)
    line: dict[str, int] = field(default_factory=dict)
    row: dict[str, dict] = field(default_factory=dict)
    repeated: int = 0  # rows given twice, identically

    def require_known(self, ids, what: str = "training sample") -> None:
        """Every scored id must be one of `ids`: scores of other samples mean the file is stale or wrong."""
        unknown = [i for i in self.score if i not in ids]
        if unknown:
            first = ", ".join(f"'{i}' (line {self.line[i]})" for i in unknown[:3])
            raise ValueError(f"{self.path}: {len(unknown)} of {len(self.score)} scored ids match no {what} "
                             f"(first: {first}): the scores are for other samples; rerun `ual score`")


def _score_value(value, where: str):
    """A score field's value, or a ValueError saying why it is not a score in [0, 1] (null is allowed)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = f"the string {value!r}" if isinstance(value, str) else (
            str(value).lower() if isinstance(value, bool) else type(value).__name__)
        raise ValueError(f"{where}: field 'score': expected a number in [0, 1] or null, got {shown}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: field 'score': {value} is not a finite number (NaN or infinity)")
    if not 0 <= value <= 1:
        raise ValueError(f"{where}: field 'score': {value} is outside [0, 1] (scores are uncertainties in [0, 1]; "
                         "a judge's 0-99 score is divided by 99)")
    return float(value)


def _score_row(path, lineno: int, row: dict) -> tuple[str, float | None]:
    """One score file row's (id, score), or a ValueError naming the file, the line, the id and the field."""
    if row.get("id") is None:
        raise ValueError(f"{path}:{lineno}: field 'id': missing (each row scores the sample with this id)")
    sid = row["id"]
    if not isinstance(sid, str):
        raise ValueError(f"{path}:{lineno}: field 'id': expected a string, got {type(sid).__name__} {sid!r}")
    where = f"{path}:{lineno}: id '{sid}'"
    if "score" not in row:
        raise ValueError(f"{where}: field 'score': missing (null marks a sample the scorer could not score)")
    return sid, _score_value(row["score"], where)


def read_scores(path: Path, keep_rows: bool = True) -> Scores:
    """The one reader of score files (scores.jsonl, heldout_scores.jsonl, scores/SCORER.jsonl): each row
    {"id": str, "score": number in [0, 1] or null, ...}, every problem a ValueError naming the file,
    the line, the id and the field. An id given twice with different scores is an error naming both
    lines (which one would be meant?); given twice identically, it is counted in `repeated`.
    keep_rows False: the rows themselves are not kept (`row` stays empty), for files of a million rows."""
    out = Scores(Path(path))
    for lineno, row in iter_jsonl(path):
        sid, value = _score_row(path, lineno, row)
        if sid in out.line:
            if out.score[sid] != value:
                raise ValueError(f"{path}: id '{sid}' is scored twice with different scores: "
                                 f"{out.score[sid]} at line {out.line[sid]} and {value} at line {lineno}")
            out.repeated += 1
            continue
        out.score[sid], out.line[sid] = value, lineno
        if keep_rows:
            out.row[sid] = row
    if not out.line:
        raise ValueError(f"{path}: no score rows (empty file); rerun `ual score`")
    return out


def read_score_column(path: Path):
    """A score file as columns: (ids, scores as a float array, NaN where null, rows repeated identically),
    under read_scores' rules. Arrow reads the common file (every id once, every score a number in [0, 1])
    without a Python object a row; a file with anything else (a null, which Arrow cannot tell from a
    missing field, an id given twice, a bad value) is read by read_scores, which names the problem."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from ual.io import jsonl_columns

    table = jsonl_columns(path, pa.schema([("id", pa.string()), ("score", pa.float64())]),
                          check=lambda lineno, row: _score_row(path, lineno, row))
    ids = table.column("id").to_pylist()
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    clean = (table.num_rows and not table.column("id").null_count and not np.isnan(scores).any()
             and ((scores >= 0) & (scores <= 1)).all() and not pd.Index(ids).has_duplicates)
    if clean:
        return ids, scores, 0
    strict = read_scores(path, keep_rows=False)
    return (list(strict.score), np.array([np.nan if v is None else v for v in strict.score.values()], dtype=np.float64),
            strict.repeated)


@dataclass
class ScoreTable:
    """A checked score file as columns: one entry per id in file order (an id repeated identically counts
    once, as in read_scores), so a million rows cost arrays, not a Python dict a row."""

    path: Path
    ids: object  # pyarrow string array
    score: object  # float64 array, NaN where the scorer could not score the sample
    source: object  # object array: each row's source, "?" where it has none
    scorer: object  # object array: each row's scorer, None where it has none
    failed: list[dict] = field(default_factory=list)  # the whole rows whose score is null (details say why)
    repeated: int = 0


def _score_table_row(path, lineno: int, row: dict) -> None:
    """read_scores' checks of one row, and source and scorer (read as text columns) are strings or absent."""
    sid, _ = _score_row(path, lineno, row)
    for name in ("source", "scorer"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise ValueError(f"{path}:{lineno}: id '{sid}': field '{name}': expected a string, "
                             f"got {type(row[name]).__name__} {row[name]!r}")


def read_score_table(path: Path) -> ScoreTable:
    """A score file as a ScoreTable, under read_scores' rules. Arrow reads the columns without a Python
    object a row; the rows with a null score (few: the failures) are then read whole by one streamed
    pass that parses only lines holding a null. Anything else (an id missing or given twice with other
    scores, a score out of range, a missing score field) is left to read_scores, which names the problem."""
    import numpy as np
    import pyarrow as pa

    from ual.io import jsonl_columns

    path = Path(path)
    schema = pa.schema([("id", pa.string()), ("score", pa.float64()), ("source", pa.string()), ("scorer", pa.string())])
    table = jsonl_columns(path, schema, check=lambda lineno, row: _score_table_row(path, lineno, row),
                          dictionary=("source", "scorer"))
    ids = table.column("id").combine_chunks()
    score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
    scored = score[~np.isnan(score)]
    keep, repeats_agree = None, True
    if not ids.null_count and table.num_rows and len(equal_neighbours(ids)[0]):
        encoded = ids.dictionary_encode()  # codes in order of first occurrence
        codes = encoded.indices.to_numpy()
        keep = np.unique(codes, return_index=True)[1]
        first = score[keep][codes]
        repeats_agree = bool(((first == score) | (np.isnan(first) & np.isnan(score))).all())
        ids = encoded.dictionary
    if not table.num_rows or ids.null_count or not repeats_agree or ((scored < 0) | (scored > 1)).any():
        read_scores(path, keep_rows=False)  # raises, naming the file, line, id and field
        raise ValueError(f"{path}: cannot be read as score columns")
    columns = {name: table.column(name) if keep is None else table.column(name).take(keep)
               for name in ("source", "scorer")}
    out = ScoreTable(path, ids, score if keep is None else score[keep], _texts(columns["source"], "?"),
                     _texts(columns["scorer"], None), repeated=table.num_rows - len(ids))
    failed_ids = set(ids.filter(pa.array(np.isnan(out.score))).to_pylist())
    if failed_ids:
        for lineno, row in iter_jsonl(path, only=lambda text: "null" in text):  # a null score is spelt null
            if row.get("id") in failed_ids and row.get("score", 0) is None:
                failed_ids.discard(row["id"])
                out.failed.append(row)
        if failed_ids:  # a row without a score field: Arrow reads it as null too
            read_scores(path, keep_rows=False)
            raise ValueError(f"{path}: rows with no score for ids {sorted(failed_ids)[:3]}")
    return out


def equal_neighbours(texts):
    """(i, j): the positions of the pairs of equal strings in a pyarrow string array, found by sorting
    it (its sort order and a sorted copy beside it) rather than by a hash table, which took over 100
    bytes a string."""
    import numpy as np
    import pyarrow.compute as pc

    order = pc.sort_indices(texts).to_numpy()
    ordered = texts.take(order)
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)).to_numpy(zero_copy_only=False)
    return order[1:][same], order[:-1][same]


def _texts(column, missing):
    """A dictionary-encoded text column as an object array sharing one str per value (8 bytes a row)."""
    import numpy as np

    encoded = column.combine_chunks()
    values = np.array([*encoded.dictionary.to_pylist(), missing], dtype=object)
    return values[encoded.indices.fill_null(len(values) - 1).to_numpy()]
