"""Ray Serve application for sidrec: ``serve run sidrec.serve.app:build_app store_root=...``.

* ``sidrec.serve.app``: ``build_app(args)``, the application (Ingress -> Recommender);
* ``sidrec.serve.deployment``: the Recommender deployment (batching, reload via reconfigure);
* ``sidrec.serve.http``: the FastAPI app of the Ingress, and its client of the Recommender;
* ``sidrec.serve.handling``: the request logic on a loaded ``Recommender``;
* ``sidrec.serve.schemas``: request/response bodies and error replies;
* ``sidrec.serve.items``: the replica's side of the store's catalog log (apply, poll, admin writes);
* ``sidrec.serve.demo``: the quickstart's demo (start the app, ask it for a real test user).

Importing this package does not import Ray.
"""

__all__ = ["build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from sidrec.serve.app import build_app

        return build_app
    raise AttributeError(name)
