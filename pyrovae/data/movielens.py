"""MovieLens ratings as implicit feedback, split by users for collaborative filtering (Liang et al. 2018).

The GroupLens ``u.data`` file (MovieLens 100K) holds one rating per line,
``user<TAB>item<TAB>rating<TAB>timestamp``; ``ratings.dat`` (1M, ``::``) and ``ratings.csv``
(20M, a header, commas) hold the same columns and are read too. A rating of at least
``min_rating`` is an interaction (x = 1), anything else is dropped; users with fewer than
``min_user_items`` interactions are dropped.

Strong generalisation (:func:`strong_generalization`): the users, not their ratings, are split.
``valid_users`` and ``test_users`` users drawn with the seed are held out and never trained on;
the rest are training users, whose rows give all their items as ``x``. The item columns are the
items some training user has (items seen only by held-out users are dropped, as in the paper's
preprocessing). For each held-out user a random ``heldout_fraction`` of their items (at least
one) is moved to ``heldout``, and the other items are the folded-in input ``x``: the model sees
``x`` and is scored on how it ranks the ``heldout`` items among the items not in ``x``
(:mod:`pyrovae.analysis.ranking`). Training rows have an empty ``heldout``, so every split has
the same keys. Both matrices are sparse (:class:`~pyrovae.data.sparse.SparseSplits`).
"""

from __future__ import annotations

import re
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse

from pyrovae.data.sparse import SparseSplits
from pyrovae.errors import ConfigError, DataError
from pyrovae.pair import DataSpec
from pyrovae.registry import DATASETS

GROUPLENS_100K = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RATINGS_FILES = ("u.data", "ratings.dat", "ratings.csv")
_SEPARATOR = re.compile(r"::|\t|,")


def download_movielens(directory: str | Path, url: str = GROUPLENS_100K) -> Path:
    """Fetch the GroupLens MovieLens 100K zip (for users who are online) and unpack ``u.data`` and
    ``u.item`` into ``directory``; returns the path of ``u.data``."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / "ml-100k.zip"
    partial = archive.with_suffix(".part")
    try:
        urllib.request.urlretrieve(url, partial)
    except OSError as error:
        raise DataError(f"could not download {url}: {error}") from None
    partial.replace(archive)
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.namelist():
            if Path(member).name in ("u.data", "u.item"):
                (directory / Path(member).name).write_bytes(zipped.read(member))
    return directory / "u.data"


def read_ratings(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, ratings) from a GroupLens ratings file: ``user item rating [timestamp]`` per
    line, separated by tabs (``u.data``), ``::`` (``ratings.dat``) or commas (``ratings.csv``, whose
    header line is skipped). A malformed line is a :class:`DataError` naming its number."""
    path = Path(path)
    users, items, ratings = [], [], []
    try:
        handle = path.open(encoding="latin-1")
    except OSError as error:
        raise DataError(f"{path}: cannot open the ratings file ({error})") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            fields = _SEPARATOR.split(line)
            if number == 1 and fields[0].strip().lower() in ("userid", "user", "user_id"):
                continue  # the header of ratings.csv
            try:
                user, item, rating = int(fields[0]), int(fields[1]), float(fields[2])
            except (IndexError, ValueError):
                raise DataError(f"{path} line {number}: expected 'user item rating timestamp', got {line[:60]!r}") from None
            users.append(user)
            items.append(item)
            ratings.append(rating)
    if not users:
        raise DataError(f"{path} holds no ratings")
    return np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64), np.asarray(ratings, dtype=np.float64)


def interaction_matrix(users: np.ndarray, items: np.ndarray) -> tuple[scipy.sparse.csr_matrix, np.ndarray, np.ndarray]:
    """(matrix, user_ids, item_ids): a 0/1 users x items CSR matrix (a pair listed twice counts
    once), rows and columns in the order of the sorted original ids."""
    user_ids, rows = np.unique(users, return_inverse=True)
    item_ids, columns = np.unique(items, return_inverse=True)
    matrix = scipy.sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, columns)), shape=(len(user_ids), len(item_ids)))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix, user_ids, item_ids


def _fold_in(rows: scipy.sparse.csr_matrix, fraction: float, rng: np.random.Generator):
    """Each row's items split at random into (fold-in x, heldout): round-down ``fraction`` of them,
    at least one, are held out. Rows with fewer than two items cannot be split and are dropped."""
    x_rows, x_cols, h_rows, h_cols = [], [], [], []
    kept = 0
    for row in range(rows.shape[0]):
        columns = rows.indices[rows.indptr[row] : rows.indptr[row + 1]]
        if len(columns) < 2:
            continue
        held = np.zeros(len(columns), dtype=bool)
        held[rng.choice(len(columns), size=max(1, int(fraction * len(columns))), replace=False)] = True
        x_cols.append(columns[~held])
        h_cols.append(columns[held])
        x_rows.append(np.full(int((~held).sum()), kept))
        h_rows.append(np.full(int(held.sum()), kept))
        kept += 1
    shape = (kept, rows.shape[1])

    def matrix(r, c):
        r, c = (np.concatenate(r), np.concatenate(c)) if r else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        return scipy.sparse.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=shape)

    return matrix(x_rows, x_cols), matrix(h_rows, h_cols), rows.shape[0] - kept


def strong_generalization(
    interactions: scipy.sparse.csr_matrix,
    name: str = "interactions",
    *,
    valid_users: int = 100,
    test_users: int = 100,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> SparseSplits:
    """Split a users x items 0/1 matrix by users (see the module docstring): ``train`` rows give all
    their items as ``x``; ``valid`` and ``test`` rows give their fold-in items as ``x`` and the rest
    as ``heldout``. Columns are the items some training user has. Held-out users left with fewer
    than two items after that are dropped (the splits then have fewer rows than asked)."""
    users = interactions.shape[0]
    if valid_users < 1 or test_users < 1:
        raise ConfigError(f"data.valid_users and data.test_users must be >= 1, got {valid_users} and {test_users}")
    if valid_users + test_users >= users:
        raise DataError(f"{name}: {valid_users} + {test_users} held-out users leave no training users of {users}")
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    interactions = scipy.sparse.csr_matrix(interactions, dtype=np.float32)
    order = np.random.default_rng(seed).permutation(users)
    valid_index, test_index = order[:valid_users], order[valid_users : valid_users + test_users]
    train = interactions[order[valid_users + test_users :]]
    items = np.flatnonzero(train.getnnz(axis=0) > 0)  # items some training user has
    train = train[:, items]
    # A stream of its own: the fold-in draw does not shift when the user order does not change.
    rng = np.random.default_rng([seed, 1])
    valid_x, valid_heldout, _ = _fold_in(interactions[valid_index][:, items], heldout_fraction, rng)
    test_x, test_heldout, _ = _fold_in(interactions[test_index][:, items], heldout_fraction, rng)
    if valid_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise DataError(f"{name}: no held-out user has two or more items among those the training users have")
    spec = DataSpec(name, (len(items),), "binary")
    empty = scipy.sparse.csr_matrix(train.shape, dtype=np.float32)
    return SparseSplits(
        spec=spec,
        train={"x": train, "heldout": empty},
        valid={"x": valid_x, "heldout": valid_heldout},
        test={"x": test_x, "heldout": test_heldout},
    )


@DATASETS.register("movielens")
def movielens(
    dir: Path = "~/.cache/pyrovae/ml-100k",
    download: bool = False,
    min_rating: float = 4.0,
    min_user_items: int = 5,
    valid_users: int = 100,
    test_users: int = 100,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> SparseSplits:
    """MovieLens ratings in ``dir`` (``u.data``, or ``ratings.dat`` / ``ratings.csv``) as 0/1
    interactions (rating >= ``min_rating``), users with at least ``min_user_items`` of them, split
    by users for strong generalisation (see the module docstring). ``download = true`` fetches
    MovieLens 100K from GroupLens when ``dir`` has no ratings file."""
    directory = Path(dir).expanduser()
    found = [directory / name for name in RATINGS_FILES if (directory / name).exists()]
    if not found and download:
        found = [download_movielens(directory)]
    if not found:
        raise DataError(
            f"movielens: no {', '.join(RATINGS_FILES)} in {directory.resolve()}; set data.dir to the folder of a "
            "GroupLens ratings file, or data.download = true to fetch MovieLens 100K"
        )
    if min_user_items < 1:
        raise ConfigError(f"data.min_user_items must be >= 1, got {min_user_items}")
    users, items, ratings = read_ratings(found[0])
    liked = ratings >= min_rating
    matrix, _, _ = interaction_matrix(users[liked], items[liked])
    matrix = matrix[np.flatnonzero(matrix.getnnz(axis=1) >= min_user_items)]
    return strong_generalization(
        matrix, "movielens", valid_users=valid_users, test_users=test_users, heldout_fraction=heldout_fraction, seed=seed
    )
