"""The wire format of the HTTP API: pydantic request/response bodies, and the error replies that the
Recommender replicas return to the ingress.

A replica answers every call with either a response body (a dict of the matching ``*Response`` model) or
an error reply made by ``error()``: ``{"status": <http status>, "error": {"error": <code>, "detail":
<message>, ...}}``. The ingress sends the inner ``error`` dict as the JSON body with that status.
Pydantic is used for HTTP bodies only; the service's settings are ``sidrec.config`` dataclasses.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

MAX_HISTORY_ITEMS = 5000     # per request, before truncation to the model's max_history
MAX_NEW_ITEMS = 100          # per POST /v1/items
MAX_RETIRE_ITEMS = 1000      # per POST /v1/items/retire


def error(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """An error reply: HTTP ``status`` with the JSON body ``{"error": code, "detail": detail, **extra}``."""
    return {"status": status, "error": {"error": code, "detail": detail, **extra}}


def is_error(reply: dict[str, Any]) -> bool:
    """True for a reply made by ``error()``."""
    return "error" in reply and "status" in reply


# ============================================================================================ requests
class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"history": ["50", "172", "133"], "k": 10, "exclude_history": True}]})

    history: list[StrictStr | StrictInt] = Field(
        default_factory=list, max_length=MAX_HISTORY_ITEMS,
        description="item ids, oldest first; only the model's max_history most recent are used")
    profile: str | None = Field(None, max_length=2000, description="free-text user profile (cold start)")
    k: StrictInt = Field(10, ge=1, description="number of items, 1..num_beams")
    exclude_history: StrictBool = Field(True, description="never recommend items of the history")

    def to_request(self) -> dict[str, Any]:
        """The dict the Recommender replica takes: item ids as strings."""
        req = self.model_dump()
        req["history"] = [str(i) for i in self.history]
        return req


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: StrictStr = Field(..., min_length=1, max_length=1000)
    k: StrictInt = Field(5, ge=1)

    @field_validator("title")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("title must not be blank")
        return v


class NewItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: StrictStr | StrictInt
    title: StrictStr = Field(..., min_length=1, max_length=1000)
    brand: StrictStr = Field("", max_length=500)
    categories: StrictStr | list[StrictStr] = Field("", description="a string or a list (joined with ' > ')")
    description: StrictStr = Field("", max_length=5000)

    @field_validator("item_id")
    @classmethod
    def _id(cls, v: str | int) -> str:
        v = str(v)
        if not v.strip() or len(v) > 256:
            raise ValueError("item_id must be a non-blank string of at most 256 characters")
        return v

    @field_validator("title")
    @classmethod
    def _title(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("title must not be blank")
        return v


class AddItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[NewItemIn] = Field(..., min_length=1, max_length=MAX_NEW_ITEMS)


class RetireRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_ids: list[StrictStr | StrictInt] = Field(..., min_length=1, max_length=MAX_RETIRE_ITEMS)

    def ids(self) -> list[str]:
        return [str(i) for i in self.item_ids]


# =========================================================================================== responses
class ScoredItem(BaseModel):
    item_id: str
    title: str
    sid: str
    score: float = Field(description="sum of the SID tokens' log-probabilities")


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    k: int
    model_version: str
    history_items: int = Field(description="items in the request's history")
    history_used: int = Field(description="most recent items put in the prompt (<= max_history)")
    history_truncated: bool = Field(description="true when older items were left out of the prompt")
    prompt_truncated: bool = Field(description="true when the token budget cut the prompt further")
    max_history: int
    cold_start: bool = Field(description="empty history: answered from the profile alone")
    exclude_history: bool
    replica: str | None = Field(None, description="the Recommender replica that answered")


class SearchResponse(BaseModel):
    query: str
    items: list[ScoredItem]
    k: int
    model_version: str
    title_to_sid_trained: bool


class ItemInfo(BaseModel):
    item_id: str
    title: str
    sid: str
    source: Literal["catalog", "added", "updated"] = Field(
        description="the published catalog, or a catalog change: a new item, or a published one changed")
    catalog_version: int | None = Field(None, description="the catalog change that last added or updated it")
    model_version: str
    replica: str | None = Field(None, description="the Recommender replica that answered")


class UpsertedItem(BaseModel):
    item_id: str
    title: str
    sid: str
    exact: bool = Field(description="false when the quantizer's own codes used tokens the model lacks (or were "
                                    "taken) and the nearest free codes it knows were used")
    action: Literal["added", "updated", "unchanged"] = Field(
        description="a new id; a known id with new text (new SID unless the text quantizes to the same); "
                    "the same text as now (nothing written)")


class AddItemsResponse(BaseModel):
    items: list[UpsertedItem]
    version: int = Field(description="the catalog version that holds the write (durable in the store)")
    scope: Literal["store"] = Field(description="written to the store's catalog log: every replica applies it")
    replica: str


class RetireResponse(BaseModel):
    retired: list[str] = Field(description="ids retired now or before: never recommended again")
    unknown: list[str] = Field(description="ids that were never in the catalog")
    version: int
    scope: Literal["store"]
    replica: str


class CatalogVersion(BaseModel):
    version: int = Field(description="the latest catalog version in the store")
    applied: int = Field(description="the version the answering replica has applied (catches up within "
                                     "catalog_poll_s)")
    replica: str


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    error: str
    detail: str
