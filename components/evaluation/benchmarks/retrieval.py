"""Instance retrieval and place-recognition benchmarks read from their publishers' layouts.

```
roxford5k    <root>/jpg/<name>.jpg + <root>/gnd_roxford5k.pkl    Revisited Oxford (Radenovic et al. 2018)
rparis6k     <root>/jpg/<name>.jpg + <root>/gnd_rparis6k.pkl     Revisited Paris
amstertime   <root>/old/<id>.<ext> + <root>/new/<id>.<ext>       AmsterTime (Yildiz et al. 2022): each archival
                                                                 (old) image is a query, its street-view match
                                                                 (new, same file name) the one positive
pitts30k     <root>/pitts30k_test.mat (or <root>/datasets/), database images under <root>/, queries under
             <root>/queries_real/     Pittsburgh-30k's test split (NetVLAD's dbStruct): positives within the
                                      file's posDistThr (25 m) of the query's UTM position, Recall@1/5/10
```
The revisited ground-truth pickle holds `imlist` (database), `qimlist` (queries) and per query `gnd`: `bbx` (the
query's box, x1 y1 x2 y2: queries are cropped to it, as the benchmark prescribes), `easy`, `hard` and `junk` (database
indices). Scores: mAP and mP@k under the Easy, Medium and Hard protocols (`metrics.revisited_map`).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from components import storage
from components.evaluation.benchmarks.common import (
    BenchmarkData,
    LayoutError,
    image_set,
    is_image,
    list_folder,
    relative,
    require_file,
    retrieval,
    stem,
)
from components.evaluation.items import item_uri


def read_revisited(root: str, dataset: str) -> BenchmarkData:
    """Revisited Oxford (`roxford5k`) or Paris (`rparis6k`): query crops against the database, easy/hard/junk."""
    gnd_uri = require_file(storage.join(root, f"gnd_{dataset}.pkl"), f"the {dataset} ground truth")
    try:
        cfg: Any = pickle.loads(storage.read_bytes(gnd_uri))
    except (pickle.UnpicklingError, UnicodeDecodeError, EOFError) as err:
        raise LayoutError(f"{gnd_uri}: not a ground-truth pickle: {err}") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise LayoutError(f"{gnd_uri}: expected a dict with imlist, qimlist and gnd")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise LayoutError(f"{gnd_uri}: {len(qimlist)} queries but {len(gnd)} ground-truth entries")
    jpg = storage.join(root, "jpg")
    files = {relative(f, jpg).rsplit(".", 1)[0]: f for f in list_folder(jpg, what="the benchmark's .jpg images")}
    for name in [*imlist, *qimlist]:
        if name not in files:
            raise LayoutError(f"{gnd_uri}: {name} has no image {storage.join(jpg, name + '.jpg')}")
    truth = []
    for q, entry in zip(qimlist, gnd, strict=True):
        lists = {k: np.asarray(entry.get(k, ()), dtype=np.int64).ravel() for k in ("easy", "hard", "junk")}
        for k, idx in lists.items():
            if idx.size and (idx.min() < 0 or idx.max() >= len(imlist)):
                raise LayoutError(f"{gnd_uri}: query {q}'s {k} list indexes {int(idx.max())}, outside the "
                                  f"{len(imlist)} database images")  # fmt: skip
        if len(entry.get("bbx", ())) != 4:
            raise LayoutError(f"{gnd_uri}: query {q} has no 4-number bbx")
        truth.append(lists)
    boxes = [",".join(f"{float(v):g}" for v in entry["bbx"]) for entry in gnd]
    query = image_set([item_uri(files[q], "crop", box) for q, box in zip(qimlist, boxes, strict=True)],
                      range(len(qimlist)))  # fmt: skip
    database = image_set([files[n] for n in imlist], [-1] * len(imlist))
    return retrieval(query, database, qimlist, ground_truth=tuple(truth))


def read_roxford5k(root: str, train_root: str | None = None) -> BenchmarkData:
    return read_revisited(root, "roxford5k")


def read_rparis6k(root: str, train_root: str | None = None) -> BenchmarkData:
    return read_revisited(root, "rparis6k")


def read_amstertime(root: str, train_root: str | None = None) -> BenchmarkData:
    """AmsterTime: archival images (old/) as queries against street-view images (new/), matched by file name."""
    sides = {}
    for side in ("old", "new"):
        folder = storage.join(root, side)
        sides[side] = {stem(f): f for f in list_folder(folder, what=f"AmsterTime's {side} images") if is_image(f)}
    old, new = sides["old"], sides["new"]
    for a, b in (("old", "new"), ("new", "old")):
        lonely = sorted(set(sides[a]) - set(sides[b]))
        if lonely:
            raise LayoutError(f"{sides[a][lonely[0]]}: no {b}/ image of the same name ({len(lonely)} such)")
    names = sorted(old)
    return retrieval(image_set([old[n] for n in names], range(len(names))),
                     image_set([new[n] for n in names], range(len(names))), names)  # fmt: skip


def _mat_strings(field: Any) -> list[str]:
    return [str(np.asarray(f).ravel()[0]) for f in np.asarray(field).ravel()]


def read_pitts30k(root: str, train_root: str | None = None) -> BenchmarkData:
    """Pittsburgh-30k test: NetVLAD's dbStruct (scipy.io) with the database and query images and UTM positions."""
    from scipy.io import loadmat

    candidates = [storage.join(root, "pitts30k_test.mat"), storage.join(root, "datasets", "pitts30k_test.mat")]
    mat_uri = next((c for c in candidates if storage.exists(c)), None)
    if mat_uri is None:
        raise LayoutError(f"{candidates[0]}: missing (also looked in datasets/); expected NetVLAD's dbStruct")
    mat = loadmat(io.BytesIO(storage.read_bytes(mat_uri)))
    if "dbStruct" not in mat:
        raise LayoutError(f"{mat_uri}: no dbStruct variable")
    db = mat["dbStruct"].item()
    if len(db) < 8:
        raise LayoutError(f"{mat_uri}: dbStruct has {len(db)} fields, expected whichSet, dbImageFns, utmDb, "
                          "qImageFns, utmQ, numImages, numQueries, posDistThr, ...")  # fmt: skip
    db_names, q_names = _mat_strings(db[1]), _mat_strings(db[3])
    utm_db, utm_q = np.asarray(db[2], np.float64).T, np.asarray(db[4], np.float64).T  # (N, 2): stored 2 x N
    pos_thr = float(np.asarray(db[7]).ravel()[0])
    if utm_db.shape != (len(db_names), 2) or utm_q.shape != (len(q_names), 2):
        raise LayoutError(f"{mat_uri}: utmDb {utm_db.shape} / utmQ {utm_q.shape} do not match "
                          f"{len(db_names)} database and {len(q_names)} query images")  # fmt: skip
    listed = {relative(f, root) for f in list_folder(root, what="Pittsburgh's database images and queries_real/")}
    queries_root = storage.join(root, "queries_real")
    for rel in [*db_names, *(f"queries_real/{n}" for n in q_names)]:
        if rel not in listed:
            raise LayoutError(f"{mat_uri}: lists {storage.join(root, rel)}, which does not exist")
    db_uris = [storage.join(root, n) for n in db_names]
    q_uris = [storage.join(queries_root, n) for n in q_names]
    data = retrieval(image_set(q_uris, [-1] * len(q_uris)), image_set(db_uris, [-1] * len(db_uris)),
                     query_xy=utm_q, database_xy=utm_db)  # fmt: skip
    return BenchmarkData(data.datasets, data.num_images, settings={"retrieval_positive_distance": pos_thr})
