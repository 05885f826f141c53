"""`kedit ui`: the MLflow UI on kedit's tracking store, bound to 127.0.0.1."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the tracking store (127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--runs", default="runs", help="the directory holding run directories (its mlflow.db)")
    p.add_argument("--tracking-uri", default=None, help="another store (default: sqlite in --runs)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from kedit_core.errors import BadInputError
    from pipelines.tracking import serve_ui

    uri = args.tracking_uri
    if uri is None:
        db = Path(args.runs).resolve() / "mlflow.db"
        if not db.is_file():
            raise BadInputError("no MLflow store here yet (run `kedit edit` or `kedit quickstart` first)",
                                file=str(db))
        uri = f"sqlite:///{db}"
    return serve_ui(uri, args.port)
