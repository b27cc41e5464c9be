"""Ray Serve application for sidrec: ``serve run sidrec.serve.app:build_app store_root=...``.

``sidrec.serve.app`` holds the deployments and the FastAPI routes; ``sidrec.serve.items`` turns new catalog
items into SIDs with the store's text encoder and quantizer. Importing this package does not import Ray.
"""

__all__ = ["build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from sidrec.serve.app import build_app

        return build_app
    raise AttributeError(name)
