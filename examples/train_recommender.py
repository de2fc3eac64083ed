"""Train a recommender on the training export and print a user's top products.

    interactions export training --out train.parquet --half-life 30d
    python examples/train_recommender.py train.parquet --user user-42

Reads the export (.parquet, .csv or .jsonl: columns user_id, product_id,
weight, ...; docs/analytics.md) into a sparse user x product matrix of the
`weight` column, and recommends the products the user has not interacted with:

- `--method als` (default when the `implicit` package is installed): implicit's
  alternating least squares for implicit feedback, confidence 1 + alpha * weight;
- `--method item-item`: plain numpy, item-item cosine similarity of the weight
  columns; a product's score is the sum of its similarities to the user's
  products, weighted by the user's weights.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Matrix:
    """The weight matrix: weights[u, p] for users[u] and products[p]."""

    users: list[str]
    products: list[str]
    rows: npt.NDArray[np.int32]
    cols: npt.NDArray[np.int32]
    weights: npt.NDArray[np.float64]

    def dense(self) -> npt.NDArray[np.float64]:
        matrix = np.zeros((len(self.users), len(self.products)))
        np.add.at(matrix, (self.rows, self.cols), self.weights)
        return matrix


def read_triples(path: Path) -> list[tuple[str, str, float]]:
    """(user_id, product_id, weight) of each row of the export file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["user_id", "product_id", "weight"]).to_pydict()
        return list(zip(table["user_id"], table["product_id"], table["weight"], strict=True))
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as file:
            return [(r["user_id"], r["product_id"], float(r["weight"])) for r in map(json.loads, file)]
    with path.open(newline="", encoding="utf-8") as file:
        return [(r["user_id"], r["product_id"], float(r["weight"])) for r in csv.DictReader(file)]


def load(path: Path) -> Matrix:
    triples = read_triples(path)
    users = sorted({u for u, _, _ in triples})
    products = sorted({p for _, p, _ in triples})
    user_index = {u: i for i, u in enumerate(users)}
    product_index = {p: i for i, p in enumerate(products)}
    return Matrix(
        users,
        products,
        np.array([user_index[u] for u, _, _ in triples], dtype=np.int32),
        np.array([product_index[p] for _, p, _ in triples], dtype=np.int32),
        np.array([w for _, _, w in triples], dtype=np.float64),
    )


def recommend_item_item(matrix: Matrix, user: int, top: int) -> list[tuple[int, float]]:
    weights = matrix.dense()
    norms = np.linalg.norm(weights, axis=0)
    normalized = weights / np.where(norms == 0, 1.0, norms)
    # score_j = sum_i w_ui * cos(i, j), computed without the product x product matrix.
    scores = normalized.T @ (normalized @ weights[user])
    scores[weights[user] > 0] = -np.inf  # only products the user has not interacted with
    order = np.argsort(-scores, kind="stable")[:top]
    return [(int(j), float(scores[j])) for j in order if np.isfinite(scores[j]) and scores[j] > 0]


def recommend_als(
    matrix: Matrix, user: int, top: int, *, factors: int, iterations: int, alpha: float, seed: int
) -> list[tuple[int, float]]:
    import scipy.sparse
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    user_items = scipy.sparse.csr_matrix(
        (matrix.weights, (matrix.rows, matrix.cols)), shape=(len(matrix.users), len(matrix.products))
    )
    model = AlternatingLeastSquares(
        factors=factors, iterations=iterations, alpha=alpha, random_state=seed, num_threads=1
    )
    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, not BLAS's
        model.fit(user_items, show_progress=False)
    liked = set(user_items[user].indices)
    candidates = min(top, len(matrix.products) - len(liked))
    if candidates <= 0:
        return []
    ids, scores = model.recommend(user, user_items[user], N=candidates, filter_already_liked_items=True)
    return [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i not in liked and np.isfinite(s)]


def main(argv: Sequence[str] | None = None) -> int:
    has_implicit = importlib.util.find_spec("implicit") is not None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="the training export: .parquet, .csv or .jsonl")
    parser.add_argument("--user", required=True, help="the user to recommend for")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--method", choices=("als", "item-item"), default="als" if has_implicit else "item-item")
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=10.0, help="ALS confidence per unit of weight")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    matrix = load(args.export)
    if args.user not in matrix.users:
        sys.stderr.write(f"{args.user} has no row in {args.export}\n")
        return 1
    user = matrix.users.index(args.user)
    if args.method == "als":
        if not has_implicit:
            parser.error("--method als needs the implicit package: pip install implicit")
        factors = min(args.factors, len(matrix.products))
        picks = recommend_als(
            matrix, user, args.top, factors=factors, iterations=args.iterations, alpha=args.alpha, seed=args.seed
        )
    else:
        picks = recommend_item_item(matrix, user, args.top)
    print(f"{args.method}: {len(matrix.users)} users x {len(matrix.products)} products, {len(matrix.weights)} pairs")
    print(f"recommendations for {args.user}:")
    for rank, (product, score) in enumerate(picks, 1):
        print(f"{rank:3}. {matrix.products[product]}  {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
