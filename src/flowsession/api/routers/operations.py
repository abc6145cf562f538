"""Long operations: poll one, or stream its events (server-sent events). A failed one's error
is told as its caller may see it (``api/public.py``)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from flowsession.access.accounts import Principal
from flowsession.api.context import principal

router = APIRouter(tags=["operations"])


@router.get("/operations/{op_id}")
def get_operation(op_id: str, request: Request, who: Principal = Depends(principal)) -> dict:
    ops = request.app.state.operations
    op = ops.get(op_id, owner=None if who.manages_all else who.user)
    return {**op, "error": request.app.state.public.for_caller(op["error"], who)}


@router.get("/operations/{op_id}/events")
def operation_events(op_id: str, request: Request,
                     who: Principal = Depends(principal)) -> StreamingResponse:
    ops = request.app.state.operations
    ops.get(op_id, owner=None if who.manages_all else who.user)  # 404 before streaming

    public = request.app.state.public

    async def gen():
        async for event in ops.stream(op_id):
            if event.get("error") is not None:
                event = {**event, "error": public.for_caller(event["error"], who)}
            yield f"data: {json.dumps(event, default=str)}\n\n"
        yield "event: end\ndata: {}\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")
