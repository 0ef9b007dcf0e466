"""Metric histories of many runs, read in bulk.

``MlflowClient`` reads one history (one run, one key) per call, and against a tracking server each
call is a round trip. MLflow's SQL store reads one key of many runs in one query
(``get_metric_history_bulk``), and its server answers the same question for up to 100 runs per
request (``metrics/get-history-bulk``, the route its UI plots with); other stores are read run by run.
On a SQL store the query asks for the columns rather than ORM objects, a fifth of the time; should
MLflow's table models change, the store's own bulk method is used.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable, Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

History = dict[str, list[tuple[int, float]]]  # key → (step, value) in step order
Point = tuple[int, int, float]  # step, timestamp, value
Reader = Callable[[str, list[str]], dict[str, list[Point]]]  # key, run ids → each run's points

SQL_RUNS_PER_QUERY = 500  # run ids in one IN (...) list
SERVER_RUNS_PER_REQUEST = 100  # the server's limits on metrics/get-history-bulk
SERVER_MAX_RESULTS = 25_000
BULK_ROUTE = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"


def read_histories(client: MlflowClient, keys_of: Mapping[str, Iterable[str]]) -> dict[str, History]:
    """``{run_id: {key: [(step, value), ...]}}`` for each run's ``keys_of[run_id]``, in step order
    (values logged at one step in the order of their timestamps), as ``get_metric_history`` reads them."""
    runs_of: dict[str, list[str]] = defaultdict(list)
    for run_id, keys in keys_of.items():
        for key in keys:
            runs_of[key].append(run_id)
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if hasattr(store, "get_metric_history_bulk"):
        read = _sql_reader(store)
    elif hasattr(store, "get_host_creds"):
        read = _server_reader(client, store)
    else:
        read = _reader_run_by_run(client)
    out: dict[str, History] = {run_id: {} for run_id in keys_of}
    for key, run_ids in runs_of.items():
        for run_id, points in read(key, run_ids).items():
            out[run_id][key] = [(step, value) for step, _, value in sorted(points, key=_order)]
    return out


def _order(point: Point) -> tuple:
    step, timestamp, value = point
    return step, timestamp, 0.0 if math.isnan(value) else value  # (the store keeps NaN as 0 and a flag)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _sql_reader(store) -> Reader:
    try:
        from mlflow.store.tracking.dbmodels.models import SqlMetric

        columns = (SqlMetric.run_uuid, SqlMetric.step, SqlMetric.timestamp, SqlMetric.value, SqlMetric.is_nan)
        sessions = store.ManagedSessionMaker
    except (ImportError, AttributeError):
        columns = None

    def read(key: str, run_ids: list[str]) -> dict[str, list[Point]]:
        found: dict[str, list[Point]] = defaultdict(list)
        for chunk in _chunks(run_ids, SQL_RUNS_PER_QUERY):
            if columns is not None:
                with sessions() as session:
                    rows = session.query(*columns).filter(SqlMetric.key == key, SqlMetric.run_uuid.in_(chunk)).all()
                for run_id, step, timestamp, value, is_nan in rows:
                    found[run_id].append((step, timestamp, math.nan if is_nan else value))
            else:
                for m in store.get_metric_history_bulk(chunk, key, max_results=2**62):
                    found[m.run_id].append((m.step, m.timestamp, m.value))
        return found

    return read


def _server_reader(client: MlflowClient, store) -> Reader:
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    one_by_one = _reader_run_by_run(client)
    supported = True

    def request(key: str, run_ids: list[str]) -> dict[str, list[Point]] | None:
        # None: the answer may be cut at the server's limit (split the request), or no such route.
        nonlocal supported
        params = [("run_id", r) for r in run_ids] + [("metric_key", key), ("max_results", SERVER_MAX_RESULTS)]
        try:
            response = verify_rest_response(http_request(store.get_host_creds(), BULK_ROUTE, "GET", params=params),
                                            BULK_ROUTE)
        except MlflowException:
            supported = False  # an older or another server: run by run from here on
            return None
        rows = response.json().get("metrics", [])
        if len(rows) >= SERVER_MAX_RESULTS:
            return None
        found: dict[str, list[Point]] = defaultdict(list)
        for m in rows:
            found[m["run_id"]].append((int(m.get("step", 0)), int(m["timestamp"]), float(m["value"])))
        return found

    def read(key: str, run_ids: list[str]) -> dict[str, list[Point]]:
        found: dict[str, list[Point]] = {}
        pending = list(_chunks(run_ids, SERVER_RUNS_PER_REQUEST))
        while pending:
            chunk = pending.pop()
            answer = request(key, chunk) if supported else None
            if answer is not None:
                found.update(answer)
            elif supported and len(chunk) > 1:
                pending += [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
            else:  # one run with more points than a request returns, or no bulk route
                found.update(one_by_one(key, chunk))
        return found

    return read


def _reader_run_by_run(client: MlflowClient) -> Reader:
    def read(key: str, run_ids: list[str]) -> dict[str, list[Point]]:
        return {run_id: [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)]
                for run_id in run_ids}

    return read
