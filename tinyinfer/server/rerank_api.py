"""Reranking in llama-server's / Jina's shape: ``POST /v1/rerank`` and ``/rerank``.

    {"query": "...", "documents": ["...", ...], "top_n": 3}
 -> {"model": ..., "object": "list", "usage": {...}, "results": [{"index": i, "relevance_score": s}, ...]}

Results sorted by score, best first, cut to ``top_n``. The scores come from the model's
classification head (rank pooling, tinyinfer/embedding.py); a model without one is a 400.
"""

from __future__ import annotations

from typing import List, Optional

from fastapi import APIRouter, Request
from pydantic import Field
from typing_extensions import Annotated

from .core import ApiError
from .jobs import gone_response, run_to_end, submit
from .schemas import _Body

router = APIRouter(tags=["Rerank"])


class RerankRequest(_Body):
    model_config = {**_Body.model_config,
                    "json_schema_extra": {"anyOf": [      # the documents under one of the two names, not null
                        {"required": ["documents"], "properties": {"documents": {"type": "array"}}},
                        {"required": ["texts"], "properties": {"texts": {"type": "array"}}}]}}
    query: str
    documents: Optional[Annotated[List[str], Field(min_length=1)]] = Field(
        None, description="the documents to score, at least one (null: take texts)")
    texts: Optional[Annotated[List[str], Field(min_length=1)]] = Field(
        None, description="TEI's name of the documents")
    top_n: Optional[int] = Field(None, ge=0)
    model: Optional[str] = None


@router.post("/v1/rerank", summary="Rerank documents for a query (Jina / llama-server)")
@router.post("/rerank", include_in_schema=False)
async def rerank(req: RerankRequest, request: Request):
    docs = req.documents if req.documents is not None else (req.texts or [])
    if not docs:
        raise ApiError(400, "\"documents\" must be a non-empty string array", param="documents")
    from .models import manager
    state = await manager(request).get(req.model, "openai")
    state.precheck_text(req.query, *docs)

    def work(engine, job):
        from ..embedding import rerank as score
        scores, n = score(engine, req.query, docs)
        job.stats = {"embed_tokens": n, "embed_s": 0.0}
        yield scores, n

    job = submit(request, state, work)
    items, gone = await run_to_end(request, job)
    if gone:
        return gone_response()
    scores, n = items[0]
    results = sorted(({"index": i, "relevance_score": s} for i, s in enumerate(scores)),
                     key=lambda r: -r["relevance_score"])
    top = len(results) if req.top_n is None else req.top_n
    return {"model": req.model or state.model_name, "object": "list",
            "usage": {"prompt_tokens": n, "total_tokens": n}, "results": results[:top]}
