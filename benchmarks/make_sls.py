"""The second data set of issue 16: UCI "Sentiment Labelled Sentences" (Kotzias et al., KDD 2015, CC BY
4.0): 3,000 review sentences, 1,000 each from Amazon, IMDB and Yelp, 500 positive and 500 negative per
source. Copied from the public GitHub repository nthuandrew/DM2023-Lab1-Master (folder "sentiment
labelled sentences", unchanged there). This script splits it once, reproducibly, into
``.devdata/sls-{train,valid,test}.csv`` (70/15/15, stratified by source and label, seed 0):

    python benchmarks/make_sls.py FOLDER_WITH_THE_THREE_TXT_FILES
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pandas as pd

SOURCES = ("amazon_cells_labelled.txt", "imdb_labelled.txt", "yelp_labelled.txt")
NAMES = {"0": "negative", "1": "positive"}


def main(folder: str, out: str = str(Path(__file__).resolve().parents[1] / ".devdata")) -> None:
    rng = random.Random(0)
    splits: dict[str, list] = {"train": [], "valid": [], "test": []}
    for name in SOURCES:
        rows = [line.rstrip("\n").rsplit("\t", 1) for line in
                (Path(folder) / name).read_text(encoding="utf-8").split("\n") if line.strip()]
        for label in NAMES:
            group = [(text.strip(), NAMES[label]) for text, lab in rows if lab.strip() == label]
            rng.shuffle(group)
            n_valid = n_test = round(0.15 * len(group))
            splits["valid"] += group[:n_valid]
            splits["test"] += group[n_valid: n_valid + n_test]
            splits["train"] += group[n_valid + n_test:]
    Path(out).mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        rng.shuffle(rows)
        pd.DataFrame(rows, columns=["text", "label"]).to_csv(Path(out) / f"sls-{split}.csv", index=False)
        print(split, len(rows))


if __name__ == "__main__":
    main(*sys.argv[1:])
