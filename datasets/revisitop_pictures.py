"""Pictures of a revisited evaluation: one strip per query, its best results framed by their Medium label.

Apart from the metric (``datasets.revisitop``) because it reads images and draws, and apart from
``utils.visualize`` (which draws any strip) because it needs the dataset, its ground truth and the ranking.
"""
from __future__ import annotations

import os
from pathlib import Path

from datasets.oxford_paris import ImageList, RevisitedDataset, medium_label
from datasets.ranking import TopK
from utils.visualize import save_retrieval_strip


def save_query_strips(out_dir: str | os.PathLike, dataset: RevisitedDataset, best: TopK,
                      crop_queries: bool = False, distractors: ImageList | None = None) -> list[Path]:
    """One PNG per query: the query (cropped as evaluated) and its best results (rows of the database, then of the
    distractors), framed by their Medium label (positive = easy or hard, junk, negative; distractors are
    negatives)."""
    out_dir = Path(out_dir)
    queries, database = dataset.queries(crop=crop_queries), dataset.database()
    written = []
    for q, (row, scores) in enumerate(zip(best.rows.cpu().tolist(), best.scores.cpu().tolist())):
        results, captions = [], []
        for r, (i, score) in enumerate(zip(row, scores)):
            img = database.load(i) if i < dataset.n_database else distractors.load(i - dataset.n_database)
            results.append((img, medium_label(dataset.gnd[q], i)))
            captions.append(f"#{r + 1} {score:.3f}")
        name = f"{dataset.name}_q{q:03d}_{Path(dataset.qimlist[q]).name}.png"
        written.append(save_retrieval_strip(out_dir / name, queries.load(q), results, captions=captions))
    return written
