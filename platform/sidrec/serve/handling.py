"""Request logic of a Recommender replica, on a loaded ``Recommender``: request dicts (validated HTTP
bodies) in, response bodies or error replies (``schemas.error``) out. No Ray here: the deployment calls
these, one batch at a time, in a thread.

* ``run_recommend`` / ``run_search``: a batch of /v1/recommend or /v1/items/search bodies, each validated
  on its own (a bad request gets its 4xx, the others their answers), decoded together.
* ``item_info``: GET /v1/items/{item_id}.
* ``check_api_key``: the admin endpoints' X-API-Key check against ``ServeSettings``.
* ``catalog_error`` / ``upsert_reply`` / ``retire_reply``: the admin catalog writes' replies (the writes
  themselves are ``sidrec.catalog.writer``'s).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from sidrec.catalog.state import CatalogState
from sidrec.catalog.writer import CatalogError, WriteResult
from sidrec.config import NEW_ITEM_RANKING, NewItemRanking
from sidrec.decode.beam import Hit
from sidrec.llm.instructions import TEMPLATES, next_item_prompt
from sidrec.llm.sft import encode_prompt, prompt_length
from sidrec.recommender import Recommender
from sidrec.serve.schemas import error
from sidrec.serve.settings import ServeSettings

log = logging.getLogger("ray.serve")

Reply = dict[str, Any]  # a response body, or an error reply (schemas.error)


# ============================================================================================ helpers
def check_k(rec: Recommender, k: int) -> Reply | None:
    """422 unless 1 <= k <= num_beams."""
    nb = rec.decoder.num_beams
    if not 1 <= k <= nb:
        return error(422, "k_out_of_range", f"k must be between 1 and {nb} (num_beams), got {k}", k=k, max_k=nb)
    return None


def flatten(rec: Recommender, hits: Sequence[Hit], k: int) -> list[dict[str, Any]]:
    """The first ``k`` items of the hits (a SID may hold several items), with titles."""
    out = [{"item_id": i, "title": rec.titles.get(i, ""), "sid": h.sid, "score": float(h.score)}
           for h in hits for i in h.items]
    return out[:k]


def prompt_truncated(rec: Recommender, history: Sequence[str], profile: str) -> bool:
    """True when the token budget cuts the prompt (on top of the max_history cap)."""
    prompt = next_item_prompt("", list(history), rec.catalog.history_sids, profile, rec.icfg)
    return prompt_length(prompt, rec.tokenizer) > rec.max_prompt_tokens


def _profile(request: Mapping[str, Any]) -> str:
    return (request.get("profile") or "").strip()


# ========================================================================================= recommend
def recommend_problem(rec: Recommender, request: Mapping[str, Any]) -> Reply | None:
    """The 422 of one /v1/recommend body, or None when it can be decoded."""
    hist = request["history"]
    if (bad := check_k(rec, request["k"])) is not None:
        return bad
    known = rec.catalog.history_sids  # retired items may stay in a history (never returned)
    unknown = list(dict.fromkeys(i for i in hist if i not in known))
    if unknown:
        more = f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""
        return error(422, "unknown_items", f"unknown item ids in history: {unknown[:20]}{more}",
                     unknown_items=unknown[:100])
    if not hist and not _profile(request):
        return error(422, "empty_history", "history is empty and no profile was given: a cold-start "
                     "request needs a profile")
    if not hist and not rec.icfg.use_profile:
        return error(422, "empty_history", "history is empty and this model was trained without "
                     "profiles: it needs at least one item")
    return None


def run_recommend(rec: Recommender, requests: Sequence[Mapping[str, Any]], new_item_slots: int = 0,
                  new_item_ranking: NewItemRanking = NEW_ITEM_RANKING) -> list[Reply]:
    """A batch of /v1/recommend bodies -> replies, via one ``Recommender.recommend`` call per
    ``exclude_history`` value present; ``new_item_slots`` (``ServeSettings``) places of each top-k are kept
    for items added after training, filled as ``new_item_ranking`` says (then one call per k as well: the
    places are those of the request's k)."""
    out: list[Reply | None] = [None] * len(requests)
    groups: dict[tuple[bool, int], list[int]] = {}
    for n, r in enumerate(requests):
        if (bad := recommend_problem(rec, r)) is not None:
            out[n] = bad
        else:
            groups.setdefault((bool(r["exclude_history"]), r["k"] if new_item_slots else 0), []).append(n)
    maxh = rec.icfg.max_history
    for (flag, _), idx in groups.items():
        for n, h in _decode_isolated(rec, requests, idx, flag, new_item_slots, new_item_ranking):
            if isinstance(h, dict):
                out[n] = h
                continue
            r = requests[n]
            hist = r["history"]
            cut = prompt_truncated(rec, hist, _profile(r))
            out[n] = {"items": flatten(rec, h, r["k"]), "k": r["k"], "model_version": rec.model_version,
                      "history_items": len(hist), "history_used": min(len(hist), maxh),
                      "history_truncated": len(hist) > maxh or cut, "prompt_truncated": cut,
                      "max_history": maxh, "cold_start": not hist, "exclude_history": flag}
    return out  # type: ignore[return-value]


def _decode_isolated(rec: Recommender, requests: Sequence[Mapping[str, Any]], idx: list[int],
                     exclude: bool, new_item_slots: int = 0,
                     new_item_ranking: NewItemRanking = NEW_ITEM_RANKING) -> list[tuple[int, list[Hit] | Reply]]:
    """(request index, hits) for a group decoded together; if the batch call fails, each request is
    decoded alone so that one failing request gets its own 500 and the others their answers."""

    def decode(rows: list[int]) -> list[list[Hit]]:
        return rec.recommend([requests[n]["history"] for n in rows], k=max(requests[n]["k"] for n in rows),
                             exclude_history=exclude, profiles=[_profile(requests[n]) for n in rows],
                             new_item_slots=new_item_slots, new_item_ranking=new_item_ranking)

    failed = error(500, "internal_error", "decoding failed; see the replica log")
    try:
        return list(zip(idx, decode(idx), strict=True))
    except Exception:
        if len(idx) == 1:
            log.exception("sidrec: decoding failed")
            return [(idx[0], failed)]
    out: list[tuple[int, list[Hit] | Reply]] = []
    for n in idx:
        try:
            out.append((n, decode([n])[0]))
        except Exception:
            log.exception("sidrec: decoding failed")
            out.append((n, failed))
    return out


# ============================================================================================ search
def title_prompt(rec: Recommender, title: str) -> str:
    """The training's first title->SID template, filled as the instruction builder fills it."""
    return TEMPLATES[rec.icfg.language]["title_to_sid"][0].format(title=title.strip())


def run_search(rec: Recommender, requests: Sequence[Mapping[str, Any]]) -> list[Reply]:
    """A batch of /v1/items/search bodies -> replies: one constrained beam search for all of them."""
    out: list[Reply | None] = [None] * len(requests)
    ok = []
    for n, r in enumerate(requests):
        if (bad := check_k(rec, r["k"])) is not None:
            out[n] = bad
        else:
            ok.append(n)
    if ok:
        prompts = [encode_prompt(title_prompt(rec, requests[n]["title"]), rec.tokenizer, rec.max_prompt_tokens)
                   for n in ok]
        hits = rec.decoder.search(prompts, k=max(requests[n]["k"] for n in ok))
        trained = rec.icfg.task_weights.get("title_to_sid", 0.0) > 0
        for n, h in zip(ok, hits, strict=True):
            out[n] = {"query": requests[n]["title"].strip(), "items": flatten(rec, h, requests[n]["k"]),
                      "k": requests[n]["k"], "model_version": rec.model_version, "title_to_sid_trained": trained}
    return out  # type: ignore[return-value]


# =========================================================================================== catalog
def item_info(rec: Recommender, item_id: str, state: CatalogState | None) -> Reply:
    """Title and SID of a present item; 404 ``retired_item`` / ``unknown_item`` otherwise."""
    sid = rec.sid_of.get(item_id)
    if sid is None:
        if item_id in rec.catalog.retired:
            version = state.retired.get(item_id) if state is not None else None
            return error(404, "retired_item", f"item {item_id!r} was retired (catalog version {version})",
                         item_id=item_id, catalog_version=version)
        return error(404, "unknown_item", f"unknown item id {item_id!r}", item_id=item_id)
    logged = state.items.get(item_id) if state is not None else None
    return {"item_id": item_id, "title": rec.titles.get(item_id, ""), "sid": sid,
            "source": logged.action if logged is not None else "catalog",
            "catalog_version": logged.version if logged is not None else None, "model_version": rec.model_version}


def catalog_error(e: CatalogError) -> Reply:
    """A refused catalog write as an error reply (nothing was written)."""
    return error(e.status, e.code, str(e), items=e.items[:100])


def upsert_reply(result: WriteResult) -> Reply:
    """POST /v1/items body (the deployment adds ``replica``)."""
    return {"items": [dataclasses.asdict(i) for i in result.items], "version": result.version, "scope": "store"}


def retire_reply(result: WriteResult) -> Reply:
    """POST /v1/items/retire body (the deployment adds ``replica``)."""
    return {"retired": result.retired, "unknown": result.unknown, "version": result.version, "scope": "store"}


def admin_key(settings: ServeSettings | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The admin key in force: ``settings.api_key``, else the ``settings.api_key_env`` variable, else None."""
    if settings is None:
        return None
    if settings.api_key is not None:
        return settings.api_key
    return (environ.get(settings.api_key_env) or None) if settings.api_key_env else None


def check_api_key(settings: ServeSettings | None, given: str | None,
                  environ: Mapping[str, str] = os.environ) -> Reply | None:
    """None when the admin call may proceed, else its 401/403. Locked by default: the key is
    ``settings.api_key``, else the replica's ``settings.api_key_env`` variable; with neither, 403. The
    comparison takes constant time, and the key is never logged or echoed."""
    expected = admin_key(settings, environ)
    if expected is None:
        where = f" or the {settings.api_key_env} environment variable" if settings and settings.api_key_env else ""
        return error(403, "admin_disabled", f"admin endpoints are disabled: no key is configured (set the "
                     f"deployment's user_config.api_key{where} on the replicas)")
    if not given:
        return error(401, "missing_api_key", "this endpoint needs an X-API-Key header")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return error(403, "invalid_api_key", "the X-API-Key header does not match")
    return None
