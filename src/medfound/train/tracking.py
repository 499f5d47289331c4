"""MLflow tracking for a training run: params, per-epoch metrics, artifacts, run status.

Where runs go (the ``uri`` key of configs/tracking/*.yaml, or `Tracker.start`'s `tracking_uri`):

- None: an embedded store in ``out_dir/mlruns`` — ``mlflow.db`` (SQLite) plus ``artifacts/``.
  Browse it with ``mlflow ui --backend-store-uri sqlite:///OUT_DIR/mlruns/mlflow.db``.
- a folder path (or ``file:/folder``): the same layout in that folder, so several runs can
  share one store.
- ``sqlite:///file.db``: that database, artifacts in ``artifacts/`` beside it.
- ``http(s)://host:port``: a tracking server, which also decides where artifacts go. It is
  probed first: an unreachable server is one `MedfoundError` line, not minutes of retries.

Several recipes share one store by giving each the same ``tracking.uri`` (``make demo`` passes
``tracking.uri=$(DEMO_OUT)/mlruns``); one ``mlflow ui --backend-store-uri sqlite:///…/mlflow.db``
then shows every run. Each run is named and tagged from its config (`describe_run`): ``task``,
``role`` (pooled / local / federated / center / evaluation), ``center`` (a center's own run),
``centers``, ``data`` (data.root and the centers) and ``git_commit`` (of the medfound checkout,
"unknown" outside one; also MLflow's ``mlflow.source.git.commit``); a recipe's `tags` and the
``tags`` key of the tracking config add to them or override them.

Use the tracker as a context manager: the run ends FINISHED, or FAILED if the block raised
(KILLED on Ctrl-C). The run id is printed and written to ``out_dir/mlflow_run.json``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfound.errors import MedfoundError

__all__ = ["RUN_FILE", "Tracker", "describe_run", "flatten_config", "git_commit"]

RUN_FILE = "mlflow_run.json"
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
_MAX_TAG = 5000  # characters of a tag value MLflow stores
_KEYS = ("uri", "experiment", "run_name", "tags")
# A config's task (federate's task.name, a center's task) → the task name of model packages.
_TASKS = {"detect": "lung_nodule_detection", "pretrain": "foundation_encoder"}


class Tracker:
    """One MLflow run, opened by the constructor; `fit` calls `log_metrics` once per epoch.

    ``Tracker(cfg.tracking, out_dir=OUT, config=cfg)`` takes the keys of configs/tracking/*.yaml:
    ``uri`` (see above), ``experiment``, ``run_name`` (None: `describe_run`'s) and ``tags``
    (a mapping added to the run's tags). ``resume=True`` reopens the run named in
    ``out_dir/mlflow_run.json`` when it is in the same store, so a resumed training continues its
    metric history in one run. Under torchrun only rank 0 tracks: on the other ranks every
    method does nothing and `run_id` is None.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None, *, out_dir: str | Path = ".",
                 config: Mapping[str, Any] | None = None, resume: bool = False,
                 tags: Mapping[str, Any] | None = None):
        settings = dict(_plain(settings) or {})
        unknown = sorted(set(settings) - set(_KEYS))
        if unknown:
            raise MedfoundError(f"tracking config: unknown key(s) {unknown}",
                                hint=f"valid keys are {list(_KEYS)}")
        extra = settings.get("tags") or {}
        if not isinstance(extra, Mapping):
            raise MedfoundError(f"tracking.tags must be a mapping of tag names to values, got {extra!r}",
                                hint="e.g. +tracking.tags.study=pilot")
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri: str | None = None
        if int(os.environ.get("RANK", 0)) != 0:
            return
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        experiment = settings.get("experiment") or "medfound"
        out_dir = Path(out_dir)
        uri, artifact_root = _resolve_store(settings.get("uri"), out_dir)
        name, described = describe_run(config or {})
        all_tags = {**described, **dict(tags or {}), **dict(extra)}
        all_tags = {str(k): str(v) for k, v in all_tags.items() if v is not None}
        if "git_commit" in all_tags:
            all_tags.setdefault("mlflow.source.git.commit", all_tags["git_commit"])
        run_name = settings.get("run_name") or name
        try:
            client = MlflowClient(tracking_uri=uri)
            run_id = _previous_run(out_dir, uri) if resume else None
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
                experiment_id = client.get_run(run_id).info.experiment_id
            else:
                experiment_id = _experiment_id(client, experiment, artifact_root)
                run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
            self.client, self.run_id = client, run_id
            self.set_tags(all_tags)  # a resumed run too: its commit may have moved on
        except MlflowException as err:
            raise MedfoundError(f"MLflow store {uri} refused the run: {str(err).splitlines()[0]}",
                                hint="check tracking.uri and tracking.experiment") from err
        self.client, self.run_id, self.experiment_id, self.tracking_uri = client, run_id, experiment_id, uri
        if config is not None:
            self.log_params(config)
        run = client.get_run(run_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RUN_FILE).write_text(json.dumps({
            "run_id": run_id, "run_name": run.info.run_name, "experiment_id": experiment_id,
            "experiment": experiment, "tracking_uri": uri, "artifact_uri": run.info.artifact_uri,
        }, indent=2) + "\n")
        print(f"MLflow run {run_id} ('{run.info.run_name}') in experiment '{experiment}' at {uri}", flush=True)

    @classmethod
    def start(cls, experiment: str, run_name: str | None = None, tracking_uri: str | None = None,
              out_dir: str | Path = ".", *, config: Mapping[str, Any] | None = None,
              resume: bool = False) -> Tracker:
        """The constructor with the tracking keys spelled out."""
        return cls({"uri": tracking_uri, "experiment": experiment, "run_name": run_name},
                   out_dir=out_dir, config=config, resume=resume)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or update) the run's tags."""
        from mlflow.entities import RunTag

        if self.client is None or not tags:
            return
        items = [RunTag(str(k), str(v)[:_MAX_TAG]) for k, v in tags.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + _PARAMS_PER_BATCH])

    def log_params(self, config: Mapping[str, Any]) -> None:
        """Log `config` flattened ("trainer.lr"); keys this run already has are left as they are."""
        from mlflow.entities import Param

        if self.client is None:
            return
        have = self.client.get_run(self.run_id).data.params
        flat = flatten_config(config)
        changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
        if changed:  # MLflow params are write-once; a resumed run keeps the values it started with
            print(f"MLflow run {self.run_id} keeps its logged value of {', '.join(changed)}", flush=True)
        params = [Param(k, v) for k, v in flat.items() if k not in have]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        if self.client is None:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, into the run's artifacts (under `artifact_path`)."""
        if self.client is None:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise MedfoundError("no such file or folder to log as an MLflow artifact", path=path)

    log_artifact = log_artifacts  # MLflow's name for a single file: the same here

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        if self.client is not None:
            self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def describe_run(config: Mapping[str, Any]) -> tuple[str | None, dict[str, str]]:
    """(run name, tags) of a run from its config: a center's run (a ``center`` key), a federation
    (a ``fed`` section), an evaluation (a ``model`` and ``data.centers``), or a training on
    ``data.train_centers`` (pooled: several centers, local: one). A config that is none of them
    gets only ``git_commit`` and no name (MLflow draws one)."""
    config = _plain(config) or {}
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    task = config.get("task")
    task = task.get("name") if isinstance(task, Mapping) else task
    tags: dict[str, str] = {"git_commit": git_commit()}
    if task:
        tags["task"] = _TASKS.get(str(task), str(task))
    fed = config.get("fed") if isinstance(config.get("fed"), Mapping) else None
    if config.get("center"):
        role, centers = "center", [str(config["center"])]
        tags["center"] = centers[0]
    elif fed is not None:
        role, centers = "federated", list(fed.get("centers") or [])
    elif config.get("model") and data.get("centers") is not None:
        role, centers = "evaluation", list(data.get("centers") or [])
    elif data.get("train_centers") is not None:
        centers = list(data.get("train_centers") or [])
        role = "pooled" if len(centers) > 1 else "local"
    else:
        return None, tags
    tags["role"] = role
    joined = "+".join(map(str, centers))
    tags["centers"] = ",".join(map(str, centers))
    if data.get("root") is not None:
        tags["data"] = f"{Path(str(data['root'])).resolve()} [{tags['centers']}]"
    if role == "federated":
        strategy = fed.get("strategy")
        strategy = strategy.get("name") if isinstance(strategy, Mapping) else strategy
        name = f"federated {strategy} {joined}" if strategy else f"federated {joined}"
    elif role == "evaluation":
        name = f"evaluation of {Path(str(config['model'])).parent.name or config['model']} on {joined}"
    else:
        name = f"{role} {joined}"
    return name.strip(), tags


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the medfound checkout this code runs from (with "+dirty" when tracked files
    differ from it), or "unknown" outside a checkout or without git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"trainer": {"lr": 0.001}} → {"trainer.lr": "0.001"}; values cut to MLflow's length limit."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    config = _plain(config)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        value = _plain(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= MAX_PARAM_VAL_LENGTH else text[:MAX_PARAM_VAL_LENGTH - 3] + "..."
    return flat


def _resolve_store(tracking_uri: str | None, out_dir: Path) -> tuple[str, Path | None]:
    """(MLflow tracking URI, local artifact folder or None when a server decides)."""
    if tracking_uri is None or str(tracking_uri).strip() in ("", "None", "null"):
        root = out_dir / "mlruns"
    elif str(tracking_uri).startswith(("http://", "https://")):
        _probe_server(str(tracking_uri))
        return str(tracking_uri), None
    elif str(tracking_uri).startswith("sqlite:///"):
        db = Path(str(tracking_uri)[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        return str(tracking_uri), db.parent / "artifacts"
    elif str(tracking_uri).startswith("file:"):
        # MLflow's spelling of a local folder (file:/path, file:///path): that folder, in this
        # layout — not a folder named "file:..." under the working directory.
        root = Path(urllib.parse.urlparse(str(tracking_uri)).path)
    elif "://" in str(tracking_uri):
        raise MedfoundError(f"tracking.uri = {tracking_uri!r} is not supported",
                            hint="use null (a store in out_dir), a folder, sqlite:///FILE.db or http(s)://HOST:PORT")
    else:
        root = Path(tracking_uri)
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", root / "artifacts"


def _probe_server(uri: str, timeout_s: float = 5.0) -> None:
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # something answered: let MLflow deal with it
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise MedfoundError(f"MLflow tracking server {uri} is unreachable ({reason})",
                            hint="start the server, or set tracking.uri=null to track in out_dir") from err


def _experiment_id(client: Any, name: str, artifact_root: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        location = (artifact_root / name).as_uri() if artifact_root is not None else None
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a parallel job of the same sweep
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _previous_run(out_dir: Path, uri: str) -> str | None:
    try:
        info = json.loads((out_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info.get("run_id") if info.get("tracking_uri") == uri else None


def _plain(values: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(values, (DictConfig, ListConfig)):
            return OmegaConf.to_container(values, resolve=True)
    except ImportError:
        pass
    return values
