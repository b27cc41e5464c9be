"""The demo page's listings: test users of the store (``GET /v1/users``) and a title substring search over a
replica's live catalog (``GET /v1/items?q=``).

Users come from the published ``dataset`` stage's test split (each row: a user, the history before their
held-out item, and that item), read once per dataset version. Titles are searched in the replica's
``Recommender`` (``sid_of`` / ``titles``), not in the store: items an admin added show up at once and
retired ones do not, exactly as ``/v1/recommend`` sees the catalog.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from sidrec.store import ArtifactStore

MAX_USERS_PAGE = 200       # GET /v1/users?limit=
MAX_ITEMS_PAGE = 100       # GET /v1/items?limit=
MAX_QUERY_CHARS = 200      # GET /v1/items?q=


# =========================================================================================== responses
class ListedUser(BaseModel):
    user_id: str
    profile: str | None = Field(description="the dataset's free-text profile; null when it has none")
    history: list[str] = Field(description="item ids before the held-out one, oldest first")
    target: str = Field(description="the held-out next item (what an evaluation scores)")


class UsersResponse(BaseModel):
    users: list[ListedUser]
    total: int = Field(description="test users in the store")


class ListedItem(BaseModel):
    item_id: str
    title: str
    sid: str


class ItemsResponse(BaseModel):
    items: list[ListedItem]


# ============================================================================================== users
class HeldOutUsers:
    """The store's test split as plain lists, for paging (one row per test user)."""

    def __init__(self, store_root: str, dataset_version: str | None):
        self.key = (store_root, dataset_version)
        rows = ArtifactStore(store_root).split("test", columns=["user_id", "history", "target"]).to_pydict()
        self.user_ids: list[str] = [str(u) for u in rows["user_id"]]
        self.histories: list[list[str]] = [[str(i) for i in h] for h in rows["history"]]
        self.targets: list[str] = [str(t) for t in rows["target"]]

    def __len__(self) -> int:
        return len(self.user_ids)

    def page(self, limit: int, offset: int, profiles: Mapping[str, str]) -> dict[str, Any]:
        """``limit`` users from ``offset`` (split order), with their profiles when the dataset has them."""
        end = min(len(self), offset + limit)
        users = [{"user_id": u, "profile": profiles.get(u) or None, "history": self.histories[n],
                  "target": self.targets[n]} for n, u in zip(range(offset, end), self.user_ids[offset:end],
                                                             strict=True)]
        return {"users": users, "total": len(self)}


# ============================================================================================== items
def search_titles(sid_of: Mapping[str, str], titles: Mapping[str, str], q: str, limit: int) -> dict[str, Any]:
    """Items of the live catalog whose title contains ``q`` (case-insensitive): titles that start with it
    first, then by where it occurs, then catalog order. An empty ``q`` lists the catalog from the start."""
    needle = q.strip().casefold()
    # a snapshot taken by one C-level call under the GIL, so a catalog change applied meanwhile (in another
    # thread) cannot make it fail; titles are then read with .get(). No model lock: searching must not wait
    # behind beam searches.
    live = list(sid_of.items())
    found: list[tuple[int, int, str, str]] = []
    for n, (item_id, sid) in enumerate(live):
        if not needle:
            if len(found) == limit:
                break
            found.append((0, n, item_id, sid))
            continue
        pos = titles.get(item_id, "").casefold().find(needle)
        if pos >= 0:
            found.append((pos, n, item_id, sid))
    found.sort()
    return {"items": [{"item_id": i, "title": titles.get(i, ""), "sid": s} for _, _, i, s in found[:limit]]}
