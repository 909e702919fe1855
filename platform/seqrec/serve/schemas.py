"""Request and response bodies of the HTTP API (pydantic; they also make the OpenAPI docs at /docs).

Types are strict (no "5" -> 5 coercion) and unknown fields are rejected, so a malformed request gets a 422
naming the field instead of being half-understood. Size limits that depend on the deployment's config
(history length, k, text length) are checked by the ingress (app.py) with the configured values.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

ItemRef = Union[StrictInt, StrictStr]  # an item_idx or an item_id (ASIN)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Strict):
    history: list[ItemRef] = Field(..., description="the user's items, oldest first: item_idx ints or item_id strings")
    k: StrictInt = Field(10, description="number of items to return (1..limits.max_k)")
    critique: Optional[StrictStr] = Field(None, description="free-text feedback (models with critique support)")
    exclude_history: StrictBool = Field(False, description="drop items already in the history from the results")


class ScoredItem(BaseModel):
    item_idx: int
    item_id: str
    title: str
    score: float


class ModelInfo(BaseModel):
    name: str
    version: str
    checkpoint: str


class Generation(BaseModel):
    text: str
    logprob: float = Field(..., description="sequence log-probability under the (untempered) model")


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model: ModelInfo
    catalog_version: int
    generations: Optional[list[Generation]] = Field(
        None, description="generative models (CALRec) only: the sampled item texts the items were retrieved from")


class SearchRequest(_Strict):
    query: StrictStr = Field(..., description="free text, matched with BM25 against the item texts")
    k: StrictInt = Field(10, description="number of items to return (1..limits.max_k)")


class SearchResponse(BaseModel):
    items: list[ScoredItem]
    catalog_version: int


class ItemIn(_Strict):
    item_id: StrictStr = Field(..., description="the item's id (ASIN); a known id updates that item")
    title: StrictStr
    text: Optional[StrictStr] = Field(None, description="the item text; default: built from title/categories/brand/price")
    categories: Optional[list[StrictStr]] = None
    brand: Optional[StrictStr] = None
    price: Optional[StrictStr] = None


class ItemsRequest(_Strict):
    items: list[ItemIn]


class ItemsResponse(BaseModel):
    added: list[ScoredItem] = Field(..., description="new items with their item_idx (score is 0)")
    updated: list[ScoredItem]
    catalog_version: int
    visible_within_s: float = Field(..., description="replicas pick up catalog changes within this time")


class ErrorBody(BaseModel):
    error: str
    status: int
