"""A trained SID-LLM ready to answer: model + tokenizer + SID index + catalog, loaded from the artifact store.

    rec = Recommender.from_store("artifacts/ml-100k", num_beams=20)
    rec.recommend([["50", "172", "133"]], k=10)     # -> [[Hit(sid, codes, score, items), ...]]

The evaluator's Ray Data actors and the Serve replicas both hold one of these, so offline metrics and served
answers come from the same prompt rendering and the same decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from sidrec.config import CODEBOOK_SIZE, NUM_BEAMS, TOP_K, InstructionConfig, section_from_dict
from sidrec.decode.beam import Hit, Scoring, SidDecoder
from sidrec.llm.instructions import next_item_prompt
from sidrec.llm.sft import encode_prompt
from sidrec.sids.index import SidIndex
from sidrec.sids.tokens import render_sid
from sidrec.store import ArtifactStore


class UnknownItemsError(ValueError):
    """Item ids that are not in the catalog; ``items`` lists them."""

    def __init__(self, items: Sequence[str]):
        self.items = list(items)
        shown = self.items[:10]
        more = f" (+{len(self.items) - 10} more)" if len(self.items) > 10 else ""
        super().__init__(f"unknown item ids: {shown}{more}")


class Recommender:
    """Next-item recommendation with constrained beam search over the catalog's SIDs."""

    def __init__(self, model, tokenizer, sids: pa.Table, titles: dict[str, str], icfg: InstructionConfig,
                 max_length: int, num_beams: int = NUM_BEAMS, scoring: Scoring = "raw", profiles: dict[str, str] | None = None,
                 model_version: str = "", codebook_size: int = CODEBOOK_SIZE):
        self.model, self.tokenizer = model, tokenizer
        self.icfg, self.max_length = icfg, max_length
        self.titles = titles
        self.profiles = profiles or {}
        self.model_version = model_version
        self.index = SidIndex.from_table(sids, codebook_size)
        self.sid_of = dict(zip(sids["item_id"].to_pylist(), sids["sid"].to_pylist(), strict=True))
        self.decoder = SidDecoder(model, tokenizer, self.index, num_beams=num_beams, scoring=scoring)
        # room left for the prompt once the SID tokens (and eos) are appended, as in training
        self.max_prompt_tokens = max_length - self.index.levels - 1

    @classmethod
    def from_store(cls, root: str, num_beams: int = NUM_BEAMS, scoring: Scoring = "raw", device: str | None = None,
                   dtype: torch.dtype | None = None) -> Recommender:
        """Load the published ``model``, ``sids`` and ``dataset`` stages of the store at ``root``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        store = ArtifactStore(root)
        model_manifest = store.require("model")
        model_dir = store.fetch_model_dir()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        sids = store.sid_table()
        titles, profiles = store.titles(), store.profiles()
        icfg = section_from_dict(InstructionConfig, store.require("instructions")["config"])
        max_length = int(model_manifest["config"]["train"]["max_length"])
        codebook = int(store.require("quantizer")["config"].get("codebook_size", CODEBOOK_SIZE))
        return cls(model, tokenizer, sids, titles, icfg, max_length, num_beams, scoring, profiles,
                   model_manifest["version"], codebook)

    # ------------------------------------------------------------------------------------------- queries
    def check_items(self, items: Sequence[str]) -> None:
        """Raise UnknownItemsError naming every id that has no SID."""
        unknown = list(dict.fromkeys(i for i in items if i not in self.sid_of))
        if unknown:
            raise UnknownItemsError(unknown)

    def prompt_ids(self, history: Sequence[str], profile: str = "", user_id: str = "") -> list[int]:
        """Token ids of the next-item prompt, exactly as training rendered it (history capped, left-truncated)."""
        prompt = next_item_prompt(user_id, list(history), self.sid_of, profile, self.icfg)
        return encode_prompt(prompt, self.tokenizer, self.max_prompt_tokens)

    def recommend(self, histories: Sequence[Sequence[str]], k: int = TOP_K, exclude_history: bool = False,
                  profiles: Sequence[str] | None = None, user_ids: Sequence[str] | None = None,
                  constrained: bool = True) -> list[list[Hit]]:
        """Top-``k`` items per history (oldest first). ``profiles`` default to the stored profile of each
        ``user_ids`` entry (when known). Unknown item ids raise UnknownItemsError; a request with neither
        history nor profile raises ValueError (a cold user needs a profile)."""
        n = len(histories)
        user_ids = list(user_ids) if user_ids is not None else [""] * n
        if profiles is None:
            profiles = [self.profiles.get(u, "") for u in user_ids]
        if len(profiles) != n or len(user_ids) != n:
            raise ValueError("histories, profiles and user_ids must have the same length")
        self.check_items([i for h in histories for i in h])
        empty = [r for r, (h, p) in enumerate(zip(histories, profiles, strict=True)) if not h and not p.strip()]
        if empty:
            raise ValueError(f"requests {empty[:10]} have an empty history and no profile: nothing to recommend from")
        prompts = [self.prompt_ids(h, p, u) for h, p, u in zip(histories, profiles, user_ids, strict=True)]
        exclude = [set(h) for h in histories] if exclude_history and constrained else None
        return self.decoder.search(prompts, k=k, exclude=exclude, constrained=constrained)

    def top_items(self, histories: Sequence[Sequence[str]], k: int = TOP_K, **kw) -> list[list[str]]:
        """Item ids only, best first (the evaluator's view)."""
        return [[i for h in hits for i in h.items][:k] for hits in self.recommend(histories, k, **kw)]

    def add_items(self, item_ids: Sequence[str], codes: np.ndarray, titles: Sequence[str]) -> list[str]:
        """Make new catalog items recommendable at once (cold start): SIDs go to the index's delta part.
        Returns their SID strings. Codes must use tokens the model already has."""
        codes = np.asarray(codes, dtype=np.int64).reshape(len(item_ids), -1)
        dup = [i for i in item_ids if i in self.sid_of]
        if dup:
            raise ValueError(f"item ids already in the catalog: {dup[:10]}")
        if codes.shape[1] != self.index.levels:
            raise ValueError(f"new items need {self.index.levels} codes, got {codes.shape[1]}")
        tokens = self.decoder.tokens.cpu()
        lacking = [render_sid(c) for c in codes if any(int(tokens[lv, x]) < 0 for lv, x in enumerate(c))]
        if lacking:
            raise ValueError(f"SIDs need tokens the model lacks: {lacking[:5]}")
        self.index.add(codes, [str(i) for i in item_ids])
        sids = [render_sid(c) for c in codes]
        for i, s, t in zip(item_ids, sids, titles, strict=True):
            self.sid_of[str(i)] = s
            self.titles[str(i)] = t
        return sids
