"""The demo page (``GET /ui``) and the two listings it needs that the scoring API does not give.

* ``index.html``: one self-contained page (inline CSS and JS, nothing fetched but this app's own API):
  pick a test user or compose a history by title, see the top-K, add or retire items as admin;
* ``sidrec.serve.ui.listing``: ``GET /v1/users`` (test users of the store) and ``GET /v1/items?q=``
  (title substring search over a replica's live catalog), with their response models.

Importing this package does not import Ray or torch.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

PAGE = "index.html"


@cache
def page_html() -> str:
    """The demo page, read once from the installed package (shipped as package data)."""
    return resources.files(__name__).joinpath(PAGE).read_text(encoding="utf-8")
